"""The API (``CircuitDiscovery.discover_all_circuits``) and the pipeline (``frc run``) take one path: on the same facts
and options they return the same circuits -- names, nodes, edges, attribution scores and validation."""
import json
from dataclasses import asdict

import pytest

from circuit_discovery import CircuitDiscovery
from circuit_discovery.graph.circuit import Circuit, CircuitNode, CircuitValidation, attach_validation
from circuit_discovery.graph.circuit import read_circuits_json
from circuit_discovery.pipeline import RunConfig, run_pipeline

# every fact counts as known (huge k); min_metric_gap 0: the tiny random model's faithfulness is not degenerate, so
# the validation numbers are compared, not only Nones; small transcoders, no feature contexts
OPTS = dict(known_k=10**6, quick=True, quick_facts=4, quick_held_out=3, progress=False, min_metric_gap=0.0,
            n_random=19, sae_training_tokens=2048, sae_eval_tokens=0, feature_nodes=16, feature_context_tokens=0)
RELATIONS = ["capital_city", "city_country"]


def _summary(c: Circuit) -> dict:
    return {"name": c.name, "relation": c.relation, "nodes": [asdict(n) for n in c.nodes],
            "edges": [asdict(e) for e in c.edges], "attribution_score": c.attribution_score,
            "faithfulness": c.faithfulness, "validation": None if c.validation is None else c.validation.to_dict(),
            "kind": c.extra.get("kind"), "n_facts": c.n_facts, "facts": c.facts}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_pipeline")
    cache = str(tmp / "cache")
    res = run_pipeline(RunConfig(model="tiny-gemma3", device="cpu", out=str(tmp / "run"), relations=RELATIONS,
                                 cache_dir=cache, **OPTS))
    _, from_file = read_circuits_json(res.out_dir / "circuits.json")
    api = CircuitDiscovery(model_name="tiny-gemma3", device="cpu", cache_dir=cache, **OPTS)
    components = api.discover_all_circuits(relations=RELATIONS, train_sae=False)
    features = api.discover_all_circuits(relations=RELATIONS, train_sae=True)  # transcoders from the run's cache
    return res, from_file, components + features


def test_api_and_pipeline_find_the_same_circuits(both):
    res, from_file, from_api = both
    assert [c.name for c in from_file] == [*RELATIONS, *(f"{r}/features" for r in RELATIONS)]
    assert [c.name for c in from_api] == [c.name for c in from_file]
    for a, p in zip(from_api, from_file):
        assert a.validation is not None and p.validation is not None
        assert _summary(a) == _summary(p), a.name
    assert [_summary(c) for c in res.circuits] == [_summary(c) for c in from_file]  # RunResult = circuits.json
    kinds = [c.validation.kind for c in from_file]
    assert kinds == ["component"] * len(RELATIONS) + ["feature"] * len(RELATIONS)
    assert any(c.faithfulness is not None for c in from_file)  # real numbers were compared


def test_circuits_json_validation_matches_metrics(both):
    res, from_file, _ = both
    metrics = json.loads((res.out_dir / "metrics.json").read_text())
    for c in from_file:
        m = metrics["feature_circuits" if c.extra.get("kind") == "feature" else "relations"][c.relation]
        assert c.validation.to_dict() == {k: m[k] for k in c.validation.to_dict()}
        assert c.faithfulness == m["held_out_faithfulness"]


def test_validation_round_trips_in_circuits_json_order():
    node = CircuitNode(id="mlp_out/L0/last", component="mlp_out", layer=0, role="last")
    c = Circuit(name="r", relation="r", nodes=[node], extra={"graphs": [], "kind": "feature"})
    attach_validation(c, {"faithfulness": 0.5, "held_out_faithfulness": 0.4, "held_out_ci": [0.1, 0.6],
                          "held_out_faithfulness_live": 0.3, "node_share": 0.05, "cpr": 0.7,
                          "random_baseline_p": 0.01, "validated": True, "ablation": "corrupted"}, "feature")
    d = c.to_dict()
    assert list(d)[-3:] == ["graphs", "kind", "validation"] and c.faithfulness == 0.4
    assert list(d["validation"]) == list(CircuitValidation.KEYS["feature"])
    assert d["validation"]["validated"] is True and d["validation"]["dictionary_quality"] is None
    again = Circuit.from_dict(json.loads(json.dumps(d)))
    assert again.validation == c.validation and again.to_dict() == d and "validation" not in again.extra
    comp = attach_validation(Circuit(name="q"), {"faithfulness": None, "validated": False}).to_dict()["validation"]
    assert list(comp) == list(CircuitValidation.KEYS["component"])
    with pytest.raises(Exception, match="kind"):
        CircuitValidation(kind="edges")
