"""The end-to-end run on a tiny random model (every fact counts as known with a huge k)."""
import json
import math

import pytest

from circuit_discovery.pipeline import RunConfig, run_pipeline, safe_name

BASE = dict(model="tiny-gemma3", known_k=10**6, quick=True, relations=["capital_city", "city_country"], quick_facts=4,
            quick_held_out=3,
            progress=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    return run_pipeline(RunConfig(out=str(out), **BASE))


def test_outputs(first_run):
    out = first_run.out_dir
    for f in ("report.md", "circuits.json", "config.json", "known_facts.json", "metrics.json", "hypotheses.csv",
              "index.html"):
        assert (out / f).is_file(), f
    data = json.loads((out / "circuits.json").read_text())
    assert len(data["circuits"]) >= 1
    metrics = json.loads((out / "metrics.json").read_text())
    kinds = set()
    for c in data["circuits"]:
        assert {"name", "nodes", "attribution_score", "relation", "edges", "faithfulness", "n_facts"} <= set(c)
        assert len(c["nodes"]) > 0 and len(c["edges"]) > 0
        if c.get("kind") == "feature":  # transcoder-feature circuit of the relation
            kinds.add("feature")
            assert c["name"] == f"{c['relation']}/features"
            fm = metrics["feature_circuits"][c["relation"]]
            assert c["faithfulness"] == fm["held_out_faithfulness"]
            assert any(n["id"].startswith(("feature/", "error/")) for n in c["nodes"])
            fv = json.loads((out / "stages" / "feature_circuits.json").read_text())["relations"][c["relation"]]
            if fm["feature_ablation_drop"] is not None:  # held-out prompts only
                assert len(fm["feature_ablation_drop"]) == len(fm["random_feature_ablation_drop"]) == fm["n_held_out"]
            else:  # no circuit feature active on a held-out prompt: said, not silently empty
                assert fv["validation"]["features_matter_note"]
            assert (out / "figures" / f"circuit_features_{c['relation']}.png").stat().st_size > 1000
        else:
            kinds.add("component")
            assert c["faithfulness"] == metrics["relations"][c["name"]]["held_out_faithfulness"]
            assert "cross_relation" in metrics["relations"][c["name"]]  # None with a single relation
            for f in (f"patching_{c['name']}.png", f"circuit_{c['name']}.png"):
                assert (out / "figures" / f).stat().st_size > 1000
        for g in c["graphs"]:
            assert (out / g).is_file()
    assert kinds == {"component", "feature"}
    details = json.loads((out / "stages" / "feature_circuits.json").read_text())["feature_details"]
    feats = {f"feature/L{n['layer']}/I{n['index']}" for c in data["circuits"] for n in c["nodes"]
             if n["component"] == "feature"}
    assert set(details) == feats  # top-activating contexts and promoted tokens for every circuit feature
    assert set(metrics["dictionaries"]["settings"]) >= {"k", "training_tokens", "corpus_tokens"}
    import csv

    with open(out / "hypotheses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["hypothesis_id", "relation", "statistic", "effect", "ci_low", "ci_high", "p_value",
                             "p_adjusted", "n", "verdict", "family"]
    hyp = json.loads((out / "stages" / "hypotheses.json").read_text())
    assert any(r["hypothesis_id"] == "features_matter" for r in rows) or "features_matter" in hyp["not_run"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 0 and "torch" in cfg["versions"] and cfg["model"] == "tiny-gemma3"
    report = (out / "report.md").read_text()
    assert all(c["relation"] in report for c in data["circuits"])
    assert "## Feature circuits (transcoders)" in report and "figures/circuit_features_" in report
    assert [c.name for c in first_run.circuits] == [c["name"] for c in data["circuits"]]


def test_same_seed_same_circuits(first_run, tmp_path):
    again = run_pipeline(RunConfig(out=str(tmp_path / "b"), **BASE))
    for f in ("circuits.json", "hypotheses.csv", "metrics.json"):
        assert (again.out_dir / f).read_text() == (first_run.out_dir / f).read_text(), f


def test_resume_reuses_stages_and_matches(first_run, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(first_run.out_dir, out)
    for stage in ("validation", "hypotheses"):  # as if killed during validation
        (out / "stages" / f"{stage}.json").unlink()
    for f in ("circuits.json", "metrics.json", "hypotheses.csv", "report.md"):
        (out / f).unlink()
    res = run_pipeline(RunConfig(out=str(out), resume=True, **BASE))
    for f in ("circuits.json", "metrics.json", "hypotheses.csv"):
        assert (out / f).read_text() == (first_run.out_dir / f).read_text(), f
    assert res.timings["attribution"] == json.loads((out / "stages" / "attribution.json").read_text())["_seconds"]


def test_safe_name_never_escapes():
    for evil in ("../../etc/passwd", "/abs/path", "a/b\\c", "..", "", "rel<script>"):
        s = safe_name(evil)
        assert "/" not in s and "\\" not in s and s not in ("", ".", "..")


def test_seed_api_on_tiny_model():
    from circuit_discovery import CircuitDiscovery

    dataset = {"entity_location": [
        {"clean": "The Eiffel Tower is located in Paris", "corrupted": "The Eiffel Tower is located in London"},
        {"clean": "The Colosseum is located in Rome", "corrupted": "The Colosseum is located in Paris"}]}
    d = CircuitDiscovery(model_name="tiny-gemma3", device="cpu", known_k=10**6, progress=False)
    circuits = d.discover_all_circuits(dataset, train_sae=False)
    assert [c.name for c in circuits] == ["entity_location"]
    assert len(circuits[0].nodes) > 0 and 0 < circuits[0].attribution_score <= 1


def test_seed_api_train_sae_builds_feature_circuits(tmp_path):
    from circuit_discovery import CircuitDiscovery

    dataset = {"entity_location": [
        {"clean": "The Eiffel Tower is located in Paris", "corrupted": "The Eiffel Tower is located in London"},
        {"clean": "The Colosseum is located in Rome", "corrupted": "The Colosseum is located in Paris"}]}
    d = CircuitDiscovery(model_name="tiny-gemma3", device="cpu", known_k=10**6, progress=False,
                         cache_dir=str(tmp_path), sae_training_tokens=2048, sae_eval_tokens=0, feature_nodes=16,
                         n_random=19)
    circuits = d.discover_all_circuits(dataset, train_sae=True)
    assert [c.name for c in circuits] == ["entity_location/features"]  # named as in circuits.json
    c = circuits[0]
    assert len(c.nodes) > 0 and 0 < c.attribution_score <= 1
    # the headline faithfulness is the held-out one (None here: a random tiny model barely separates the answers)
    assert c.validation.kind == "feature" and c.faithfulness == c.validation.held_out_faithfulness
    assert c.extra["kind"] == "feature" and "validation" not in c.extra
    assert all(n.id.split("/")[0] in ("feature", "error", "embed", "logit") for n in c.nodes)
    assert len(d.transcoders().transcoders) == d.model.cfg.n_layers
    assert d.transcoders().trained == list(range(d.model.cfg.n_layers))  # trained by this call
    again = CircuitDiscovery(model_name="tiny-gemma3", device="cpu", progress=False, cache_dir=str(tmp_path),
                             sae_training_tokens=2048, sae_eval_tokens=0)
    assert again.transcoders().trained == []  # from the on-disk cache
    g = d.attribution_graph("The Eiffel Tower is located in", max_feature_nodes=8)
    assert sum(nd.node.component == "feature" for nd in g.graph.nodes) == 8


@pytest.mark.parametrize("sig, after", [("SIGKILL", "circuits"), ("SIGINT", "attribution")])
def test_killed_run_resumes_to_the_same_results(tmp_path, sig, after):
    """A run killed (SIGKILL or SIGINT) right after a stage finished, rerun with --resume, writes the same
    circuits.json, metrics.json and hypotheses.csv as an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nmodel = "tiny-gemma3"\nquick = true\nrelations = ["capital_city", "city_country"]\n'
                    'quick_facts = 4\nquick_held_out = 3\nknown_k = 1000000\nprogress = false\n')
    ref = tmp_path / "ref"
    run_pipeline(RunConfig.from_toml(toml, out=str(ref)))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "circuit_discovery.cli", "run", "--config", str(toml), "--out", str(out)]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (tests pin 1 thread):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # same floats
    marker = out / "stages" / f"{after}.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (out / "report.md").exists()
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    for f in ("circuits.json", "metrics.json", "hypotheses.csv"):
        assert (out / f).read_text() == (ref / f).read_text(), f


def test_refined_circuit_search_stays_in_budget_and_reaches_its_discovery_faithfulness():
    """circuit_search="refine": the circuit is grown by exact ablation on the discovery pairs; it stays within its
    budget of the non-inert nodes, keeps the embeddings, and its recorded discovery f is what the evaluator gives."""
    from circuit_discovery import load_model
    from circuit_discovery.facts import load_builtin
    from circuit_discovery.pipeline.attribution_stage import relation_pairs
    from circuit_discovery.pipeline.circuit_stage import circuit_for_relation
    from circuit_discovery.validation.ablation import CircuitEvaluator

    model = load_model("tiny-gemma3", device="cpu")
    cfg = RunConfig(model="tiny-gemma3", circuit_search="refine", refine_budget=0.1, progress=False)
    pairs = relation_pairs(model, list(load_builtin()["capital_city"]), cfg)
    found = circuit_for_relation(model, "capital_city", pairs, cfg)
    ids = [n["id"] for n in found["circuit"]["nodes"] if not n["id"].startswith("logit")]
    ev = CircuitEvaluator(model, pairs["discovery"])
    relevant = set(ev.relevant_universe)
    grown = [i for i in ids if i in relevant and not i.startswith("embed/")]
    assert 0 < len([i for i in ids if i in relevant]) <= math.ceil(0.1 * len(relevant))
    assert all(i.startswith("embed/") or i in relevant for i in ids) and grown
    assert found["info"]["circuit_search"] == "refine" and found["ranked"][: len(grown)] != []
    f = ev.faithfulness([i for i in ids if i in set(ev.universe)])
    assert f == pytest.approx(found["info"]["refine_discovery_faithfulness"], abs=1e-6)
    with pytest.raises(Exception, match="circuit_search"):
        RunConfig(circuit_search="greedy")
