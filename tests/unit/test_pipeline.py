"""The end-to-end run on a tiny random model (every fact counts as known with a huge k)."""
import json

import pytest

from circuit_discovery.pipeline import RunConfig, run_pipeline, safe_name

BASE = dict(model="tiny-gemma3", known_k=10**6, quick=True, relations=["capital_city", "city_country"], quick_facts=3,
            progress=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    return run_pipeline(RunConfig(out=str(out), **BASE))


def test_outputs(first_run):
    out = first_run.out_dir
    for f in ("report.md", "circuits.json", "config.json", "known_facts.json"):
        assert (out / f).is_file(), f
    data = json.loads((out / "circuits.json").read_text())
    assert len(data["circuits"]) == 2
    for c in data["circuits"]:
        assert {"name", "nodes", "attribution_score", "relation", "edges", "faithfulness", "n_facts"} <= set(c)
        assert 0 < c["attribution_score"] <= 1 and len(c["nodes"]) == 12
        assert (out / "figures" / f"patching_{c['name']}.png").stat().st_size > 1000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 0 and "torch" in cfg["versions"] and cfg["model"] == "tiny-gemma3"
    report = (out / "report.md").read_text()
    assert all(c["name"] in report for c in data["circuits"])
    assert [c.name for c in first_run.circuits] == [c["name"] for c in data["circuits"]]


def test_same_seed_same_circuits(first_run, tmp_path):
    again = run_pipeline(RunConfig(out=str(tmp_path / "b"), **BASE))
    assert (again.out_dir / "circuits.json").read_text() == (first_run.out_dir / "circuits.json").read_text()


def test_resume_reuses_stages_and_matches(first_run, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(first_run.out_dir, out)
    (out / "stages" / "circuits.json").unlink()  # as if killed after the attribution stage
    (out / "circuits.json").unlink()
    res = run_pipeline(RunConfig(out=str(out), resume=True, **BASE))
    assert (out / "circuits.json").read_text() == (first_run.out_dir / "circuits.json").read_text()
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
    with pytest.raises(NotImplementedError, match="train_sae"):
        d.discover_all_circuits(dataset, train_sae=True)
