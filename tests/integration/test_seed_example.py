"""The seed README's example on the built-in model, and `python main.py --quick` end to end."""
import json
import math
import subprocess
import sys

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.integration

SEED = {
    "entity_location": [
        {"clean": "The Eiffel Tower is located in Paris", "corrupted": "The Eiffel Tower is located in London"},
        {"clean": "The Colosseum is located in Rome", "corrupted": "The Colosseum is located in Paris"},
    ],
}


def test_seed_example_on_builtin_model():
    from circuit_discovery import CircuitDiscovery

    discovery = CircuitDiscovery(model_name=None, device="cpu", progress=False, n_random=20)
    circuits = discovery.discover_all_circuits(SEED, train_sae=False)
    assert [c.name for c in circuits] == ["entity_location"]
    c = circuits[0]
    print(c.name, len(c.nodes), c.attribution_score, c.faithfulness, c.validation)
    assert len(c.nodes) > 0 and len(c.edges) > 0
    # the subjects come from aligning the two prompts ("The {} is located in": "Eiffel Tower", "Colosseum"); the
    # headline faithfulness is held out; the model knows one of the two facts, so nothing is held out and only
    # the in-sample value (one ROME-noised prompt) exists. The default 5% refined circuit recovers little of it
    # (0.04 measured; the 21%-of-nodes EAP circuit: 0.60), so the test checks that it is measured, not its size.
    v = c.validation
    assert c.faithfulness == v.held_out_faithfulness is None
    assert v.faithfulness is not None and math.isfinite(v.faithfulness)
    assert {"embed/L-1/subject_first", "embed/L-1/subject_last"} <= {n.id for n in c.nodes}


@pytest.mark.timeout(900)
def test_main_quick_runs_offline(tmp_path):
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    res = subprocess.run([sys.executable, "main.py", "--quick", "--relations", "capital_city,country_language",
                          "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(out)
    data = json.loads((out / "circuits.json").read_text())
    rels = {"capital_city", "country_language"}
    assert {c["name"] for c in data["circuits"]} == rels | {f"{r}/features" for r in rels}  # component + feature
    for c in data["circuits"]:
        assert c["faithfulness"] is not None
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["feature_circuits"]) == rels
    layers = metrics["dictionaries"]["layers"]  # quick runs measure their transcoders too (128 tokens per layer)
    assert len(layers) == 18 and all(0 < m["l0"] and m["explained_variance"] <= 1 for m in layers.values())
    for r in rels:  # dictionaries of a quick budget are below the bar: no feature circuit is a finding
        fq = metrics["feature_circuits"][r]
        assert fq["dictionary_quality"]["meets_bar"] is False and fq["validated"] is False
    assert (out / "figures" / "circuit_features_capital_city.png").is_file()
    for f in ("report.md", "metrics.json", "hypotheses.csv", "index.html", "config.json"):
        assert (out / f).is_file(), f
