"""What :func:`circuit_discovery.report.viewer.write_viewer` embeds from a run folder (no browser needed):
per-prompt graphs in compact form, position roles from the subjects, validation numbers from metrics.json,
feature details from the feature stage. Oracles: the fixture's own JSON files and hand-checked tokenizations."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from circuit_discovery.report.viewer import ViewerInputError, compact_graph, token_roles, write_viewer

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "viewer"
GRAPH = "graphs/country_currency-features-0.json"


def _payload(html: Path) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html.read_text("utf-8"), re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_fixture_is_small():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert total < 1_500_000, total


def test_token_roles_hand_checked():
    toks = ["<bos>", "The", " Los", " Angeles", " Lakers", " play", " the", " sport", " of"]
    assert token_roles(toks, "The Los Angeles Lakers play the sport of", "Los Angeles Lakers") == [
        "bos", "relation", "subject_first", "subject_middle", "subject_last", "relation_first", "relation",
        "relation", "last"]
    toks = ["<bos>", "The", " Louvre", " is", " located", " in", " the", " city", " of"]
    assert token_roles(toks, "The Louvre is located in the city of", "The Louvre") == [
        "bos", "subject_first", "subject_last", "relation_first", "relation", "relation", "relation", "relation",
        "last"]
    # one-token subject is subject_last; the final token is always "last"
    assert token_roles(["<bos>", "Paris", " is"], "Paris is", "Paris") == ["bos", "subject_last", "last"]
    # tokens that do not spell the prompt, or a subject not in it: no roles
    assert token_roles(["<bos>", "The", " Lou"], "The Louvre", "Louvre") is None
    assert token_roles(toks, "The Louvre is located in the city of", "Eiffel") is None


def test_compact_graph_keeps_nodes_strongest_links_and_supernodes():
    g = json.loads((FIXTURE / "run" / GRAPH).read_text("utf-8"))
    cg = compact_graph(g, max_links=300, subjects={g["metadata"]["prompt"]: "the United States"})
    f = {k: i for i, k in enumerate(cg["node_fields"])}
    assert [n[f["id"]] for n in cg["nodes"]] == [n["node_id"] for n in g["nodes"]]
    assert cg["n_links"] == len(g["links"]) and len(cg["links"]) == 300
    strongest = sorted((abs(ln["weight"]) for ln in g["links"]), reverse=True)[:300]
    assert [abs(w) for _, _, w in cg["links"]] == pytest.approx(strongest, rel=5e-4)
    ids = [n["node_id"] for n in g["nodes"]]
    for a, b, w in cg["links"][:20]:  # each kept link is a link of the file, weight to 4 significant digits
        src = next(ln for ln in g["links"] if ln["source"] == ids[a] and ln["target"] == ids[b])
        assert w == pytest.approx(src["weight"], rel=5e-4)
    assert cg["supernodes"] == [sn for sn in g["qParams"]["supernodes"] if len(sn) > 1]
    assert cg["tokens"] == g["metadata"]["prompt_tokens"] and cg["prompt"] == g["metadata"]["prompt"]
    assert cg["roles"][cg["tokens"].index(" States")] == "subject_last"
    logit = next(n for n in g["nodes"] if n.get("is_target_logit"))
    row = cg["nodes"][ids.index(logit["node_id"])]
    assert row[f["component"]] == "logit" and row[f["is_target_logit"]] is True
    assert row[f["token_prob"]] == pytest.approx(logit["token_prob"], rel=5e-4)
    emb = cg["nodes"][[n["layer"] for n in g["nodes"]].index("E")]
    assert emb[f["layer"]] == -1 and emb[f["component"]] == "embed"
    with pytest.raises(ViewerInputError):
        compact_graph({"nodes": [{"no_id": 1}]})
    with pytest.raises(ViewerInputError):
        compact_graph([])


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", out)
    return out, json.loads((out / "circuits.json").read_text("utf-8"))


def test_write_viewer_reads_the_run_folder(run):
    out, cj = run
    cj["circuits"][0]["validation"]["validated"] = True  # circuits.json wins over metrics.json
    html = write_viewer(out, cj)
    p = _payload(html)
    linked = [g for c in cj["circuits"] for g in c["graphs"]]
    assert sorted(p["prompt_graphs"]) == sorted(linked)
    assert p["metric"] == "logit_diff"
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    t0, t1 = p["circuits"][0]["trust"], p["circuits"][1]["trust"]
    assert t0["validated"] is True and metrics["relations"]["team_sport"]["validated"] is False
    assert t0["cmd"] == metrics["relations"]["team_sport"]["cmd"]  # only in metrics.json
    assert t1["validated"] is False and t1["cmd"] == metrics["feature_circuits"]["country_currency"]["cmd"]
    assert p["circuits"][0]["prompt_roles"][4] == "subject_last"  # ' Lakers'
    assert p["feature_details"] == {}  # not given and no stages/feature_circuits.json


def test_write_viewer_takes_feature_details_from_the_feature_stage(run):
    out, cj = run
    fd = json.loads((FIXTURE / "feature_details.json").read_text("utf-8"))
    (out / "stages").mkdir()
    (out / "stages" / "feature_circuits.json").write_text(json.dumps({"relations": {}, "feature_details": fd}))
    assert _payload(write_viewer(out, cj))["feature_details"] == fd
    given = {"feature/L1/I2": {"label": "given"}}
    assert _payload(write_viewer(out, cj, feature_details=given))["feature_details"] == given


def test_write_viewer_rejects_a_broken_graph_file(run):
    out, cj = run
    (out / GRAPH).write_text("{not json")
    with pytest.raises(ViewerInputError, match="not valid JSON"):
        write_viewer(out, cj)
    assert not (out / "index.html").exists()


def test_graph_paths_outside_the_run_are_not_read(run, tmp_path):
    out, cj = run
    secret = tmp_path / "secret.json"
    shutil.copy(out / GRAPH, secret)
    cj["circuits"][1]["graphs"] = ["../secret.json", str(secret)]
    p = _payload(write_viewer(out, cj))
    assert p["circuits"][1]["graphs"] == ["../secret.json"]
    assert sorted(p["prompt_graphs"]) == sorted(cj["circuits"][0]["graphs"])  # the secret file was not read
