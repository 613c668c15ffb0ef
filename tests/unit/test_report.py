"""Unit tests of circuit_discovery.report: figures, report.md and the offline viewer.

Oracles: matplotlib's PNG reader and Python's ``json``/``html.parser``/``hashlib`` parse what was
written independently of the writers; expected table contents are written out by hand.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from circuit_discovery.report import figures as F
from circuit_discovery.report.markdown import (
    ReportInputError,
    escape_cell,
    format_seconds,
    format_value,
    glossary_table,
    write_report,
)
from circuit_discovery.report.viewer import ViewerInputError, embed_json, write_viewer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
XSS = "</script><script>alert(1)</script>"


def _check_png(path: Path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind
    return img


def _circuit(name="capital_city", n=6):
    nodes = [{"id": f"mlp_out/L{i}/subject_last", "component": "mlp_out", "layer": i, "role": "subject_last",
              "position": None, "index": None, "label": f"L{i} MLP", "score": (-1) ** i * (i + 1) / n,
              "activation": None, "influence": 0.1} for i in range(n - 1)]
    nodes.append({"id": f"logit/L{n}/last", "component": "logit", "layer": n, "role": "last", "label": "logit",
                  "score": None})
    edges = [{"source": nodes[i]["id"], "target": nodes[i + 1]["id"], "weight": 0.5 - i * 0.3}
             for i in range(n - 1)]
    return {"name": name, "relation": name, "n_facts": 2, "attribution_score": 0.8, "faithfulness": None,
            "nodes": nodes, "edges": edges,
            "facts": [{"prompt": "The capital of France is", "answer": " Paris"}],
            "graphs": [f"graphs/{name}_0.json"]}


# ------------------------------------------------------------------------------------------ figures


def test_all_figures_written(tmp_path):
    rng = np.random.default_rng(0)
    tokens = ["<bos>", "The", " capital", " of", " France", " is"]
    outs = [
        F.patching_heatmap(rng.normal(size=(8, 6)), tokens, "resid patching", tmp_path / "a.png"),
        F.head_heatmap(rng.normal(size=(8, 4)), "heads", tmp_path / "b.png"),
        F.causal_tracing_figure(rng.random((6, 8)), rng.random((6, 8)), rng.random((6, 8)), tokens,
                                tmp_path / "c.png", subject_rows=[4], title="tracing"),
        F.circuit_drawing(_circuit(), tmp_path / "d.png"),
        F.faithfulness_curves({"attr": (np.logspace(-2, 0, 6), np.linspace(0, 1, 6)),
                               "random": ([0.0, 0.1, 1.0], [0.0, 0.05, 1.0])}, tmp_path / "e.png"),
        F.sae_metrics_per_layer({0: {"l0": 10, "explained_variance": 0.9}, 2: {"l0": 12}}, tmp_path / "f.png"),
        F.overlap_matrix(["a", "b"], np.array([[1.0, 0.25], [0.25, np.nan]]), tmp_path / "g.png"),
        F.metric_bars({"capital": {"circuit": 0.9, "random": 0.1}, "lang": {"circuit": 0.7}},
                      tmp_path / "h.png", reference=1.0, errors={"capital": {"circuit": 0.05}}),
        F.metric_bars({"a": 1.0, "b": None}, tmp_path / "sub" / "i.png"),
    ]
    for p in outs:
        assert isinstance(p, Path)
        _check_png(p)
    F.circuit_drawing({"name": "empty", "nodes": [], "edges": []}, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_diverging_scale_is_centred_at_zero():
    norm = F._symmetric_norm(np.array([[-0.5, 2.0], [np.nan, 0.1]]))
    assert norm(0.0) == pytest.approx(0.5)
    assert (norm.vmin, norm.vmax) == (-2.0, 2.0)
    zero = F._symmetric_norm(np.zeros((2, 2)))  # degenerate: still a valid, centred scale
    assert zero(0.0) == pytest.approx(0.5)


def test_patching_heatmap_colours_follow_sign(tmp_path):
    # one row: strongly negative, zero, strongly positive -> blue, white, red in RdBu_r
    path = F.patching_heatmap(np.array([[-1.0, 0.0, 1.0]]), ["a", "b", "c"], "sign", tmp_path / "s.png")
    img = imread(path)[..., :3]
    reds = img[..., 0] > img[..., 2] + 0.2
    blues = img[..., 2] > img[..., 0] + 0.2
    colour_bar = reds.any(axis=0) & blues.any(axis=0)  # the colour bar holds both colours in one column
    reds[:, colour_bar] = False
    blues[:, colour_bar] = False
    assert reds.sum() > 1000 and blues.sum() > 1000
    left, right = np.nonzero(blues)[1].max(), np.nonzero(reds)[1].min()
    assert left < right  # negative cell left of the positive one
    rows = np.nonzero(reds.any(axis=1))[0]
    middle = img[rows[len(rows) // 2], (left + right) // 2]
    assert middle.min() > 0.9  # zero maps to (near) white: the scale is centred at 0


def test_sae_metrics_per_layer_takes_layers_or_hook_names(tmp_path):
    """Hook-name keys (the pipeline's ``{hook: metrics}``) in any order draw the same PNG as sorted layer keys."""
    rows = {l: {"explained_variance": 0.7 + 0.05 * l, "ce_loss_score": 0.9, "dead_fraction": 0.02 * l, "l0": 20 + l}
            for l in range(3)}
    hooks = {f"blocks.{l}.mlp.hook_in->blocks.{l}.hook_mlp_out": rows[l] for l in (2, 0, 1)}
    a = F.sae_metrics_per_layer(hooks, tmp_path / "a.png", title="t")
    b = F.sae_metrics_per_layer(rows, tmp_path / "b.png", title="t")
    assert a.read_bytes() == b.read_bytes()
    assert imread(a).shape[:2] == (300, 1280)  # 4 panels of 3.2 x 3 inches at 100 dpi, not cropped


def test_circuit_roles_ordered_by_prompt():
    nodes = [{"id": "a", "role": "last"}, {"id": "b", "role": "subject_last"}, {"id": "c", "position": 3},
             {"id": "d", "role": "bos"}, {"id": "e"}, {"id": "f", "position": 1}]
    assert F.role_columns(nodes) == ["bos", "subject_last", "last", "P1", "P3", "all"]


@pytest.mark.parametrize("call", [
    lambda p: F.patching_heatmap(np.zeros((3, 4)), ["a", "b"], "t", p),
    lambda p: F.patching_heatmap(np.zeros(4), ["a"] * 4, "t", p),
    lambda p: F.head_heatmap([["x"]], "t", p),
    lambda p: F.causal_tracing_figure(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4)), ["a", "b"], p),
    lambda p: F.causal_tracing_figure(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), ["a"], p),
    lambda p: F.faithfulness_curves({"x": ([0.0, -1.0], [0.0, 1.0])}, p),
    lambda p: F.faithfulness_curves({"x": ([0.1, 1.0], [0.5])}, p),
    lambda p: F.faithfulness_curves({}, p),
    lambda p: F.overlap_matrix(["a", "b", "c"], np.eye(2), p),
    lambda p: F.sae_metrics_per_layer({"first": {"l0": 1}}, p),
    lambda p: F.metric_bars({"a": 1.0, "b": {"x": 1.0}}, p),
    lambda p: F.circuit_drawing({"nodes": "nope"}, p),
])
def test_figures_reject_bad_input(tmp_path, call):
    with pytest.raises(F.FigureInputError):
        call(tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------ report.md


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    assert cells[0] == "" and cells[-1] == ""
    return [c.strip() for c in cells[1:-1]]


def test_write_report_contents(tmp_path):
    fig = tmp_path / "figures" / "capital city.png"
    summary = {
        "model": {"name": "gemma-3-270m", "n_layers": 18, "nested": {"ignored": True}},
        "relations": [
            {"name": "capital|city", "n_facts": 20, "n_known": 17, "n_split": "12 / 8",
             "held_out_f": "0.81 [0.62, 0.95]", "random_p": "0.005 (200)", "node_share": "12 (4.1%)",
             "validated": "yes", "faithfulness": 0.91234, "cpr": float("nan"),
             "top_nodes": [{"label": "L3 MLP"}, "L5 head 2"], "verdicts": {"H1": "supported", "H2": "rejected"}},
            {"name": "language", "n_facts": 5},
        ],
        "definitions": ["f = (m(C) - m(empty)) / (m(N) - m(empty))"],
        "sections": [{"name": "capital|city", "text": "Mostly MLPs.",
                      "figures": [{"path": str(fig), "caption": "causal tracing"}, "figures/x.png"],
                      "metrics": {"faithfulness": 0.5}}],
        "hypotheses": [{"id": "H1", "statement": "MLPs at subject_last | matter", "p_value": 0.0001234,
                        "verdict": "supported", "extra_list": [1, 2]},
                       {"id": "H2", "statement": "x", "p_value": 0.2, "verdict": "rejected", "effect_size": 0.3}],
        "timings": {"model": 3.0, "attribution": 61.5},
        "unknown_key": {"whatever": 1},
    }
    path = write_report(tmp_path, summary)
    assert path == tmp_path / "report.md"
    text = path.read_text("utf-8")
    lines = text.splitlines()

    header_i = lines.index(next(line for line in lines if line.startswith("| circuit |")))
    header = _split_row(lines[header_i])
    assert header == ["circuit", "facts used (discovery / held out)", "held-out f [95% CI]",
                      "matched random p (draws)", "nodes (% of non-inert)", "validated", "in-sample f",
                      "held-out CPR", "top nodes", "verdicts"]
    row1 = _split_row(lines[header_i + 2])
    assert row1 == ["capital\\|city", "12 / 8", "0.81 [0.62, 0.95]", "0.005 (200)", "12 (4.1%)", "yes",
                    "0.912", "—", "L3 MLP, L5 head 2", "H1: supported; H2: rejected"]
    row2 = _split_row(lines[header_i + 3])
    assert row2 == ["language"] + ["—"] * 9  # the relation's fact count (n_facts) is not a column
    assert "- f = (m(C) - m(empty)) / (m(N) - m(empty))" in text  # definitions under the table

    assert "![causal tracing](<figures/capital city.png>)" in text  # absolute -> relative
    assert "![x](figures/x.png)" in text
    assert "## capital|city" in text and "Mostly MLPs." in text

    hyp_i = lines.index(next(line for line in lines if line.startswith("| id |")))
    assert _split_row(lines[hyp_i]) == ["id", "statement", "effect_size", "p_value", "verdict"]
    assert _split_row(lines[hyp_i + 2]) == ["H1", "MLPs at subject_last \\| matter", "—", "1.23e-04", "supported"]

    assert "| attribution | 61.5 s (1 min 2 s) |" in text  # seconds as given, then minutes
    assert "| **sum of the stages above** | 64.5 s (1 min 4 s) |" in text
    assert "unknown_key" not in text and "whatever" not in text and "nested" not in text
    assert "| n_layers | 18 |" in text


def test_format_seconds_never_shows_60_seconds():
    assert format_seconds(1079.62) == "1079.6 s (18 min 0 s)"  # not "17 min 60 s"
    assert format_seconds(3599.7) == "3599.7 s (1 h 0 min 0 s)"
    assert format_seconds(59.96) == "60.0 s" and format_seconds(None) == "—"


def test_glossary_section(tmp_path):
    gloss = [{"term": "f", "meaning": "faithfulness | ratio", "unit": "ratio", "observation": "prompt"},
             {"term": "CPR", "meaning": "area", "unit": "ratio", "observation": "curve"}]
    text = write_report(tmp_path, {"relations": [{"name": "r"}], "glossary": gloss}).read_text("utf-8")
    lines = text.splitlines()
    i = lines.index("## Glossary")
    assert _split_row(lines[i + 2]) == ["term", "meaning", "unit", "unit of observation"]
    assert _split_row(lines[i + 4]) == ["f", "faithfulness \\| ratio", "ratio", "prompt"]
    assert "[Glossary](#glossary)" in text and lines.index("## Relations") < i
    with pytest.raises(ReportInputError):
        glossary_table(gloss + [gloss[0]])


def test_write_report_omits_missing_sections(tmp_path):
    text = write_report(tmp_path, {"model": "tiny"}).read_text("utf-8")
    assert "`tiny`" in text
    for heading in ("## Relations", "## Hypotheses", "## Timings", "## Files"):
        assert heading not in text
    with pytest.raises(ReportInputError):
        write_report(tmp_path, ["not", "a", "dict"])
    with pytest.raises(ReportInputError):
        write_report(tmp_path, {"relations": ["bad row"]})


def test_format_and_escape():
    assert format_value(None) == format_value(float("nan")) == format_value("") == format_value([]) == "—"
    assert format_value(np.float32(0.5)) == "0.5"
    assert format_value(np.int64(7)) == "7"
    assert format_value(True) == "yes"
    assert escape_cell("a|b\nc") == "a\\|b c"


# ------------------------------------------------------------------------------------------ viewer


class _Scripts(HTMLParser):
    """Collect <script> elements (attrs, raw text) and every src/href attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.scripts: list[tuple[dict, str]] = []
        self.urls: list[str] = []
        self._in: dict | None = None
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script":
            self._in, self._buf = a, []

    def handle_data(self, data):
        if self._in is not None:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._in is not None:
            self.scripts.append((self._in, "".join(self._buf)))
            self._in = None


def _viewer_data(xss: str = XSS) -> dict:
    c1 = _circuit("capital_city")
    c1["facts"].append({"prompt": xss + " <!-- is in", "answer": "<img src=x onerror=alert(2)>"})
    c1["nodes"][0]["label"] = xss
    c1["nodes"][1]["score"] = float("nan")
    c1["nodes"][2]["contexts"] = ["ctx with \u2028 separator & <b>tags</b>"]
    return {"model": "gemma-3-270m", "circuits": [c1, _circuit("language", 4)]}


def test_viewer_is_self_contained(tmp_path):
    html = write_viewer(tmp_path, _viewer_data()).read_text("utf-8")
    assert html.startswith("<!DOCTYPE html>")
    p = _Scripts()
    p.feed(html)
    assert all(not re.match(r"\s*(https?:)?//", u) for u in p.urls), p.urls
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "<link" not in html.lower()
    assert all("src" not in attrs for attrs, _ in p.scripts)
    for required in ('id="node-count"', 'id="relation-select"', 'id="prune-slider"', 'id="details"'):
        assert required in html


def test_viewer_payload_escaping(tmp_path):
    data = _viewer_data()
    html = write_viewer(tmp_path, data).read_text("utf-8")
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert "<!--" not in html
    assert html.lower().count("</script") == 2  # the data block and the viewer code, nothing injected
    p = _Scripts()
    p.feed(html)
    assert [a.get("id") for a, _ in p.scripts] == ["data", "viewer-js"]
    assert p.scripts[0][0]["type"] == "application/json"
    payload = json.loads(p.scripts[0][1])
    c0 = payload["circuits"][0]
    assert c0["nodes"][0]["label"] == XSS  # round-trips exactly
    assert c0["facts"][1]["prompt"] == XSS + " <!-- is in"
    assert c0["nodes"][1]["score"] is None  # NaN -> null (JSON.parse cannot read NaN)
    assert c0["nodes"][2]["contexts"] == ["ctx with \u2028 separator & <b>tags</b>"]
    assert payload["model"] == "gemma-3-270m" and len(payload["circuits"]) == 2

    # the CSP allows exactly the viewer script, by hash
    digest = base64.b64encode(hashlib.sha256(p.scripts[1][1].encode("utf-8")).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html


def test_viewer_js_never_uses_innerhtml(tmp_path):
    html = write_viewer(tmp_path, _viewer_data()).read_text("utf-8")
    js = html.split('<script id="viewer-js">', 1)[1]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js


def test_embed_json_round_trip():
    obj = {"a": "</script><!--<script>", "b": [1.5, np.float64(2.0), np.arange(3)], "c": "\u2029&"}
    text = embed_json(obj)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2029" not in text
    assert json.loads(text) == {"a": "</script><!--<script>", "b": [1.5, 2.0, [0, 1, 2]], "c": "\u2029&"}
    assert json.loads(embed_json({"x": math.inf}))["x"] is None


def test_viewer_graph_links(tmp_path):
    data = {"circuits": [_circuit("capital_city")]}
    html = write_viewer(tmp_path, data, graphs={"capital_city": [tmp_path / "graphs" / "extra.json",
                                                                   "graphs/capital_city_0.json"]},
                        feature_details={"mlp_out/L0/subject_last": {"description": "capital cities"}})
    p = _Scripts()
    p.feed(html.read_text("utf-8"))
    payload = json.loads(p.scripts[0][1])
    assert payload["circuits"][0]["graphs"] == ["graphs/capital_city_0.json", "graphs/extra.json"]
    assert payload["feature_details"]["mlp_out/L0/subject_last"]["description"] == "capital cities"
    assert html.name == "index.html" and html.parent == tmp_path


@pytest.mark.parametrize("bad", [
    [],
    {"model": "x"},
    {"circuits": [{"nodes": [{"label": "no id"}]}]},
    {"circuits": [{"nodes": [{"id": "a"}, {"id": "a"}]}]},
    {"circuits": [{"nodes": [{"id": "a"}], "edges": [{"source": "a"}]}]},
    {"circuits": [{"nodes": [{"id": "a", "score": object()}]}]},
])
def test_viewer_rejects_bad_input(tmp_path, bad):
    with pytest.raises(ViewerInputError):
        write_viewer(tmp_path, bad)
    assert not (tmp_path / "index.html").exists()


def test_report_package_never_imports_the_model():
    pkg = Path(__file__).resolve().parents[2] / "src" / "circuit_discovery" / "report"
    for py in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text("utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("torch", "transformers", "circuit_discovery.models",
                                            "circuit_discovery.attribution", "circuit_discovery.pipeline")), (py, name)


def test_report_package_imports_no_model_code():
    """``circuit_discovery.report`` reads results only: no module of it reaches, through its imports (lazy ones
    included), the model, the packages that run it or ``circuit_discovery.facts`` (whose ``__init__`` imports model
    code); the token roles it shares with the pair builder come from the model-free
    ``circuit_discovery.token_roles``."""
    import networkx as nx

    from tests.unit.test_conventions import PKG, _is_model_running, import_graph

    g = import_graph()
    report_modules = [m for m in g if m == f"{PKG}.report" or m.startswith(f"{PKG}.report.")]
    assert f"{PKG}.report.viewer" in report_modules
    assert g.has_edge(f"{PKG}.report.viewer", f"{PKG}.token_roles")
    reached = set().union(*(nx.descendants(g, m) for m in report_modules))
    bad = sorted(m for m in reached if _is_model_running(m) or m == PKG or m == f"{PKG}.facts"
                 or m.startswith(f"{PKG}.facts."))
    assert not bad, f"report modules reach model code through their imports: {bad}"
