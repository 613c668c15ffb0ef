"""End-to-end tests of the offline viewer (``index.html``) in a real headless Chromium (Debian ``chromium``
package driven by the ``playwright`` Python package; no browser download).

Data: the committed fixture ``tests/data/viewer`` (the largest component circuit and the largest feature
circuit of a default Gemma 3 270M run, with their per-prompt graphs; ``make_fixture.py`` rebuilds it) and a
synthetic circuit carrying XSS payloads. Oracles are computed here in Python from those JSON files: node and
edge counts after each slider/search/pin, the incident edges of a hovered node, the strongest edges of a
node, the ancestors of a traced logit, the stored supernodes and the prompt tokens.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "viewer"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the 'playwright' Python package is not installed")

from circuit_discovery.report.viewer import write_viewer  # noqa: E402

pytestmark = pytest.mark.browser

XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=2">'
COMP, FEAT = 0, 1  # fixture circuit indices
COMP_NAME, FEAT_NAME = "team_sport", "country_currency/features"
FEAT_GRAPH = "graphs/country_currency-features-0.json"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A copy of the fixture run folder with its viewer written; returns (index.html path, circuits.json)."""
    out = tmp_path_factory.mktemp("viewer") / "run"
    shutil.copytree(FIXTURE / "run", out)
    cj = json.loads((out / "circuits.json").read_text("utf-8"))
    fd = json.loads((FIXTURE / "feature_details.json").read_text("utf-8"))
    return write_viewer(out, cj, feature_details=fd), cj, fd


def _open(browser, url: str, width: int = 1280, height: int = 800):
    page = browser.new_page(viewport={"width": width, "height": height})
    page._errors = []  # type: ignore[attr-defined]
    page.on("console", lambda m: page._errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page._errors.append(str(e)))
    page.on("request", lambda r: page._errors.append("request " + r.url) if not r.url.startswith("file:") else None)
    page.goto(url)
    page.wait_for_function("window.__viewerReady === true")
    return page


def _url(html: Path, **hash_: str) -> str:
    from urllib.parse import urlencode

    return html.as_uri() + ("#" + urlencode(hash_) if hash_ else "")


# ------------------------------------------------------------------------------------------ oracles
def _drawn_nodes(c: dict) -> list[dict]:
    """Circuit nodes the viewer must draw: all but the unconnected ones with score 0 or none."""
    deg: dict[str, int] = {}
    for e in c["edges"]:
        deg[e["source"]] = deg.get(e["source"], 0) + 1
        deg[e["target"]] = deg.get(e["target"], 0) + 1
    return [n for n in c["nodes"] if n["component"] == "logit" or deg.get(n["id"]) or (n.get("score") or 0) != 0]


def _top_fraction(nodes: list[dict], v: int) -> set[str]:
    free = sorted((n for n in nodes if n["component"] != "logit"), key=lambda n: -abs(n.get("score") or 0))
    k = math.ceil(v / 100 * len(free) - 1e-9)
    return {n["id"] for n in free[:k]} | {n["id"] for n in nodes if n["component"] == "logit"}


def _threshold(nodes: list[dict], v: int) -> set[str]:
    free = [n for n in nodes if n["component"] != "logit"]
    smax = max(abs(n.get("score") or 0) for n in free)
    thr = (1 - v / 100) * smax
    return {n["id"] for n in free if abs(n.get("score") or 0) >= thr} | {
        n["id"] for n in nodes if n["component"] == "logit"}


def _edges_shown(edges: list[dict], visible: set[str], v: int) -> int:
    ws = sorted((abs(e["weight"]) for e in edges), reverse=True)
    k = math.ceil(v / 100 * len(ws) - 1e-9)
    thr = ws[k - 1] if k > 0 else math.inf
    return sum(1 for e in edges if e["source"] in visible and e["target"] in visible and abs(e["weight"]) >= thr)


def _visible_ids(page) -> set[str]:
    return set(page.eval_on_selector_all("g.node:not(.hidden)", "els => els.map(g => g.dataset.id)"))


def _count(page, what: str = "node") -> int:
    return int(page.text_content(f"#{what}-count"))


def _inside(inner: dict, outer: dict, tol: float = 0.5) -> bool:
    return (inner["left"] >= outer["left"] - tol and inner["top"] >= outer["top"] - tol
            and inner["right"] <= outer["right"] + tol and inner["bottom"] <= outer["bottom"] + tol)


RECT_JS = ("e => { const r = e.getBoundingClientRect(); "
           "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; }")


def _collisions(page) -> list:
    """Pairs of drawn labels whose boxes intersect, and labels that cover another node's circle."""
    return page.evaluate("""() => {
      const box = e => e.getBoundingClientRect();
      const hit = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5
        && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
      const labels = [...document.querySelectorAll('#g-labels text, #g-super text')]
        .map(t => [t.dataset.id || t.textContent, box(t)]);
      const circles = [...document.querySelectorAll('g.node:not(.hidden) circle')]
        .map(c => [c.parentNode.dataset.id, box(c)]);
      const bad = [];
      for (let i = 0; i < labels.length; i++) {
        for (let j = i + 1; j < labels.length; j++) {
          if (hit(labels[i][1], labels[j][1])) bad.push([labels[i][0], labels[j][0]]);
        }
        for (const c of circles) {
          if (c[0] !== labels[i][0] && hit(labels[i][1], c[1])) bad.push([labels[i][0], c[0]]);
        }
      }
      return bad;
    }""")


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("which", [COMP, FEAT])
def test_layout_fits_every_width(browser, run, which):
    """At 900, 1280, 1600 and 1920 px the logit node and every circuit node lie inside the graph area,
    labels do not collide, and the node panel stays on screen after a click."""
    html, cj, _ = run
    c = cj["circuits"][which]
    expected = {n["id"] for n in _drawn_nodes(c)}
    page = _open(browser, _url(html, c=c["name"]), width=900, height=800)
    try:
        for width in (900, 1280, 1600, 1920):
            page.set_viewport_size({"width": width, "height": 900 if width > 1280 else 800})
            page.reload()
            page.wait_for_function("window.__viewerReady === true")
            assert _visible_ids(page) == expected
            assert _count(page) == len(expected) == int(page.text_content("#node-total"))
            area = page.eval_on_selector("#graph-wrap", RECT_JS)
            rects = page.eval_on_selector_all("g.node circle", f"els => els.map({RECT_JS})")
            assert len(rects) == len(expected)
            outside = [r for r in rects if not _inside(r, area)]
            assert not outside, (width, outside[:3], area)
            logit = page.eval_on_selector('g.node[data-id="logit/L18/last"] circle', RECT_JS)
            assert _inside(logit, area)
            assert page.locator("#g-labels text").count() >= 5
            assert _collisions(page) == [], width
            # the node panel is on screen after a click
            page.locator('g.node[data-id="logit/L18/last"] circle').click()
            panel = page.eval_on_selector("#details", RECT_JS)
            assert 0 <= panel["left"] < width and 0 <= panel["top"] < page.viewport_size["height"] - 100
            if width == 1280:
                page.screenshot(path=str(_artifact(f"layout-{which}-{width}.png")))
        assert page._errors == []
    finally:
        page.close()


# ------------------------------------------------------------------------------------------ interactions
def test_hover_highlights_incident_edges(browser, run):
    html, cj, _ = run
    c = cj["circuits"][COMP]
    page = _open(browser, _url(html, c=c["name"]))
    deg: dict[str, int] = {}
    for e in c["edges"]:
        deg[e["source"]] = deg.get(e["source"], 0) + 1
        deg[e["target"]] = deg.get(e["target"], 0) + 1
    hub = max(deg, key=lambda k: (deg[k], k))
    incident = sorted((e["source"], e["target"]) for e in c["edges"] if hub in (e["source"], e["target"]))
    nbrs = {s if t == hub else t for s, t in incident} | {hub}
    opac = "els => els.map(e => [e.dataset.source, e.dataset.target, +getComputedStyle(e).opacity])"
    before = page.eval_on_selector_all("path.edge:not(.hidden)", opac)
    assert all(o == 1 for _, _, o in before) and len(before) == len(c["edges"])
    page.locator(f'g.node[data-id="{hub}"] circle').hover()
    after = page.eval_on_selector_all("path.edge:not(.hidden)", opac)
    lit = sorted((s, t) for s, t, o in after if o == 1)
    assert lit == incident
    assert all(o < 0.1 for s, t, o in after if (s, t) not in set(incident))
    node_op = page.eval_on_selector_all("g.node", "els => els.map(e => [e.dataset.id, +getComputedStyle(e).opacity])")
    assert {i for i, o in node_op if o == 1} == nbrs
    page.mouse.move(2, 2)
    assert all(o == 1 for _, _, o in page.eval_on_selector_all("path.edge:not(.hidden)", opac))
    assert page._errors == []
    page.close()


def test_node_panel_of_component_and_logit_nodes(browser, run):
    html, cj, _ = run
    c = cj["circuits"][COMP]
    page = _open(browser, _url(html, c=c["name"]))
    node = max((n for n in c["nodes"] if n["role"] == "subject_last" and n["component"] != "embed"),
               key=lambda n: abs(n["score"]))
    page.locator(f'g.node[data-id="{node["id"]}"] circle').click()
    assert page.text_content("#details .node-title") == node["label"]
    details = page.text_content("#details")
    # the role's token in each prompt whose roles are known (subjects from known_facts.json)
    assert "' Lakers' @4" in details and "' Bulls' @3" in details
    assert page.locator("#details ul.ptok mark").first.text_content() == " Lakers"
    assert "The Los Angeles Lakers play the sport of" in details
    # score with unit and sign convention
    assert page.text_content("#details .score-row td:last-child") == f"{node['score']:.4g}".replace("e-0", "e-")
    unit = page.text_content("#details .unit")
    assert "logit_diff" in unit and "logits" in unit and "positive = pushes toward the answer" in unit
    # strongest incoming / outgoing edges
    ins = sorted((e for e in c["edges"] if e["target"] == node["id"]), key=lambda e: -abs(e["weight"]))
    outs = sorted((e for e in c["edges"] if e["source"] == node["id"]), key=lambda e: -abs(e["weight"]))
    assert page.locator("#details ul.nbrs.in li").count() == min(8, len(ins))
    assert page.locator("#details ul.nbrs.out li").count() == min(8, len(outs))
    first_out = page.text_content("#details ul.nbrs.out li")
    label = {n["id"]: n["label"] for n in c["nodes"]}[outs[0]["target"]]
    assert first_out.strip().endswith(label) and f"{abs(outs[0]['weight']):.3g}" in first_out
    # the logit node names target and counterfactual
    page.locator('g.node[data-id="logit/L18/last"] circle').click()
    logit = page.text_content("#details .logit-info")
    assert "' basketball'" in logit and "counterfactual" in logit and "logit_diff" in logit
    assert page._errors == []
    page.close()


def test_feature_node_panel(browser, run):
    html, cj, fd = run
    c = cj["circuits"][FEAT]
    page = _open(browser, _url(html, c=c["name"]))
    node = max((n for n in c["nodes"] if n["component"] == "feature"
                and f"feature/L{n['layer']}/I{n['index']}" in fd), key=lambda n: abs(n["score"]))
    info = fd[f"feature/L{node['layer']}/I{node['index']}"]
    page.locator(f'g.node[data-id="{node["id"]}"] circle').click()
    ft = page.text_content("#details .feature-info")
    assert info["label"] in ft
    assert f"{100 * info['density']:.{1 if info['density'] < 0.1 else 0}f}% of tokens" in ft
    assert " ".join(f"'{t}'" for t in info["promoted"]) in ft
    assert "suppressed tokens" in ft and "not recorded" in ft
    assert "not recorded" in page.text_content("#details .hist-missing")
    marks = page.eval_on_selector_all("#details ul.ctx li mark", "els => els.map(e => e.textContent)")
    import re

    assert marks == [m for ctx in info["contexts"][:12] for m in re.findall(r"«([^»]*)»", ctx)]
    lis = page.eval_on_selector_all("#details ul.ctx li", "els => els.map(e => e.textContent)")
    assert lis == [ctx.replace("«", "").replace("»", "") for ctx in info["contexts"][:12]]
    page.screenshot(path=str(_artifact("feature-panel.png")))
    assert page._errors == []
    page.close()


def test_pin_group_and_edit_supernode(browser, run):
    html, cj, _ = run
    c = cj["circuits"][COMP]
    page = _open(browser, _url(html, c=c["name"]))
    ids = [n["id"] for n in sorted(_drawn_nodes(c), key=lambda n: -abs(n.get("score") or 0))
           if n["component"] != "logit"][:3]
    for i in ids:
        page.locator(f'g.node[data-id="{i}"] circle').click(modifiers=["Control"])
    assert page.locator("g.node.pinned").count() == 3
    assert page.locator("#pins-box ul.pins li").count() == 3
    page.locator(f'g.node[data-id="{ids[2]}"] circle').click(modifiers=["Control"])  # unpin
    assert set(page.eval_on_selector_all("g.node.pinned", "els => els.map(e => e.dataset.id)")) == set(ids[:2])
    page.check("#pinned-only")
    assert _visible_ids(page) == set(ids[:2]) and _count(page) == 2
    page.uncheck("#pinned-only")
    assert _count(page) == len(_drawn_nodes(c))
    page.fill("#group-label", "my group")
    page.click("#group-btn")
    assert page.locator("g.supernode").count() == 1
    assert page.text_content("g.supernode text") == "my group"
    assert page.locator("g.node.pinned").count() == 0
    # the supernode's box encloses its members
    box = page.eval_on_selector("g.supernode rect", RECT_JS)
    for i in ids[:2]:
        assert _inside(page.eval_on_selector(f'g.node[data-id="{i}"] circle', RECT_JS), box)
    page.fill("ul.sns li input.sn-edit", "renamed <b>x</b>")
    assert page.text_content("g.supernode text") == "renamed <b>x</b>"
    assert "sn=" in page.evaluate("location.hash")
    page.click("ul.sns li button.sn-del")
    assert page.locator("g.supernode").count() == 0
    assert page._errors == []
    page.close()


def test_search_and_component_filter(browser, run):
    html, cj, _ = run
    c = cj["circuits"][COMP]
    drawn = _drawn_nodes(c)
    page = _open(browser, _url(html, c=c["name"]))
    logits = {n["id"] for n in drawn if n["component"] == "logit"}
    page.fill("#search", "L11")
    assert _visible_ids(page) == {n["id"] for n in drawn if n["layer"] == 11} | logits
    page.fill("#search", "token:lakers")
    assert _visible_ids(page) == {n["id"] for n in drawn if n["role"] == "subject_last"} | logits
    page.fill("#search", "head L15")
    assert _visible_ids(page) == {n["id"] for n in drawn if n["layer"] == 15 and n["component"] == "head"} | logits
    page.fill("#search", "")
    page.select_option("#comp-filter", "mlp_out")
    assert _visible_ids(page) == {n["id"] for n in drawn if n["component"] == "mlp_out"} | logits
    page.select_option("#comp-filter", "")
    assert _count(page) == len(drawn)
    assert page._errors == []
    page.close()


@pytest.mark.parametrize("which", [COMP, FEAT])
def test_node_and_edge_thresholds(browser, run, which):
    html, cj, _ = run
    c = cj["circuits"][which]
    drawn = _drawn_nodes(c)
    page = _open(browser, _url(html, c=c["name"]))
    counts = []
    for v in (0, 10, 30, 60, 100):
        page.locator("#prune-slider").fill(str(v))
        exp = _top_fraction(drawn, v)
        assert _visible_ids(page) == exp, v
        assert _count(page, "edge") == _edges_shown(c["edges"], exp, 100)
        counts.append(len(exp))
    assert counts == sorted(counts) and counts[-1] == len(drawn)  # right = more nodes
    # switching the mode keeps the number of shown nodes (no "2 of 38 nodes" jump)
    page.locator("#prune-slider").fill("30")
    n30 = _count(page)
    page.select_option("#prune-mode", "threshold")
    assert abs(_count(page) - n30) <= 1, (n30, _count(page))
    for v in (0, 50, 90, 100):
        page.locator("#prune-slider").fill(str(v))
        assert _visible_ids(page) == _threshold(drawn, v), v
    assert _count(page) == len(drawn)  # threshold mode at 100 shows everything, like fraction mode
    page.select_option("#prune-mode", "fraction")
    assert page.input_value("#prune-slider") == "100" and _count(page) == len(drawn)
    # edge slider: the strongest share of edges by |weight|, right = more
    ecounts = []
    visible = {n["id"] for n in drawn}
    for v in (0, 20, 50, 100):
        page.locator("#edge-slider").fill(str(v))
        ecounts.append(_count(page, "edge"))
        assert ecounts[-1] == _edges_shown(c["edges"], visible, v), v
    assert ecounts == sorted(ecounts) and ecounts[0] == 0 and ecounts[-1] == len(c["edges"])
    assert page._errors == []
    page.close()


def test_zoom_and_pan(browser, run):
    html, cj, _ = run
    page = _open(browser, _url(html, c=cj["circuits"][COMP]["name"]))
    tf = lambda: page.get_attribute("#viewport", "transform")  # noqa: E731
    assert tf() == "translate(0.00 0.00) scale(1.0000)"
    page.click("#zoom-in")
    assert "scale(1.2500)" in tf()
    page.click("#zoom-out")
    assert "scale(1.0000)" in tf()
    area = page.eval_on_selector("#graph-wrap", RECT_JS)
    page.mouse.move(area["left"] + 100, area["top"] + 100)
    page.mouse.wheel(0, -200)
    k = float(tf().split("scale(")[1].rstrip(")"))
    assert k > 1.2
    page.focus("#graph")
    before = tf()
    page.keyboard.press("ArrowLeft")
    assert tf() != before
    page.keyboard.press("+")
    assert float(tf().split("scale(")[1].rstrip(")")) == pytest.approx(k * 1.25, rel=1e-3)
    # drag on the background pans
    x0, y0 = area["left"] + 5, area["top"] + 5
    before = tf()
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + 60, y0 + 30, steps=4)
    page.mouse.up()
    t0 = [float(x) for x in before.split("(")[1].split(")")[0].split()]
    t1 = [float(x) for x in tf().split("(")[1].split(")")[0].split()]
    assert t1[0] - t0[0] == pytest.approx(60, abs=1) and t1[1] - t0[1] == pytest.approx(30, abs=1)
    # the layout check can fail: zoomed in, nodes leave the graph area; "fit" brings every node back
    rects = lambda: page.eval_on_selector_all("g.node circle", f"els => els.map({RECT_JS})")  # noqa: E731
    assert any(not _inside(r, area) for r in rects())
    page.keyboard.press("0")
    assert tf() == "translate(0.00 0.00) scale(1.0000)"
    assert all(_inside(r, area) for r in rects())
    # the collision check can fail: two labels drawn on top of each other are reported
    assert _collisions(page) == []
    page.evaluate("""() => { const g = document.getElementById('g-labels');
      for (const id of ['a', 'b']) { const t = document.createElementNS('http://www.w3.org/2000/svg', 'text');
        t.setAttribute('x', 300); t.setAttribute('y', 300); t.dataset.id = id; t.textContent = 'overlap';
        g.appendChild(t); } }""")
    assert ["a", "b"] in _collisions(page)
    page.click("#zoom-in")
    page.click("#zoom-reset")
    assert tf() == "translate(0.00 0.00) scale(1.0000)"
    assert page._errors == []
    page.close()


def test_url_state_round_trip(browser, run):
    html, cj, _ = run
    c = cj["circuits"][FEAT]
    page = _open(browser, html.as_uri())
    page.select_option("#relation-select", str(FEAT))
    drawn = sorted((n for n in _drawn_nodes(c) if n["layer"] == 1), key=lambda n: -abs(n.get("score") or 0))
    a, b = drawn[0]["id"], drawn[1]["id"]
    page.locator(f'g.node[data-id="{a}"] circle').click(modifiers=["Control"])
    page.locator(f'g.node[data-id="{b}"] circle').click(modifiers=["Control"])
    page.locator("#prune-slider").fill("60")
    page.locator("#edge-slider").fill("40")
    page.fill("#search", "L1")
    page.locator(f'g.node[data-id="{b}"] circle').click()
    page.click("#zoom-in")
    page.focus("#graph")
    page.keyboard.press("ArrowDown")
    state = page.evaluate("JSON.stringify(window.__viewer.S)")
    view = {k: page.evaluate(f"document.querySelector('{s}').{p}") for k, s, p in [
        ("nodes", "#node-count", "textContent"), ("edges", "#edge-count", "textContent"),
        ("sel", "#details .node-title", "textContent"), ("tf", "#viewport", "getAttribute('transform')"),
        ("nv", "#prune-slider", "value"), ("ev", "#edge-slider", "value"), ("q", "#search", "value"),
        ("rel", "#relation-select", "value")]}
    url = page.url
    assert "#" in url and "sel=" in url and "pins=" in url and "z=" in url
    page.close()
    page2 = _open(browser, url)
    assert page2.evaluate("JSON.stringify(window.__viewer.S)") == state
    view2 = {k: page2.evaluate(f"document.querySelector('{s}').{p}") for k, s, p in [
        ("nodes", "#node-count", "textContent"), ("edges", "#edge-count", "textContent"),
        ("sel", "#details .node-title", "textContent"), ("tf", "#viewport", "getAttribute('transform')"),
        ("nv", "#prune-slider", "value"), ("ev", "#edge-slider", "value"), ("q", "#search", "value"),
        ("rel", "#relation-select", "value")]}
    assert view2 == view and view["rel"] == str(FEAT) and view["nv"] == "60"
    assert set(page2.eval_on_selector_all("g.node.pinned", "els => els.map(e => e.dataset.id)")) == {a, b}
    assert page2.url == url  # restoring does not rewrite the state
    assert page2._errors == []
    page2.close()


def test_per_prompt_graph_view(browser, run):
    html, cj, fd = run
    c = cj["circuits"][FEAT]
    g = json.loads((html.parent / FEAT_GRAPH).read_text("utf-8"))
    page = _open(browser, _url(html, c=c["name"]))
    page.click(f'button.graph-open[data-path="{FEAT_GRAPH}"]')
    assert page.input_value("#graph-select") == FEAT_GRAPH
    assert g["metadata"]["prompt"] in page.text_content("#circuit-title")
    # token-aligned columns: the prompt's own tokens, in order
    cols = page.eval_on_selector_all("#g-grid text.axis-tok title", "els => els.map(e => e.textContent)")
    assert [t.split(" · ")[0] for t in cols] == [f"'{t}'" for t in g["metadata"]["prompt_tokens"]]
    ids = {n["node_id"] for n in g["nodes"]}
    assert int(page.text_content("#node-total")) == len(ids)
    assert int(page.text_content("#edge-total")) == len(g["links"])
    # each node sits in its token's column
    xs = page.evaluate("""() => { const o = {}; document.querySelectorAll('g.node circle').forEach(c => {
      o[c.parentNode.dataset.id] = +c.getAttribute('cx'); }); return o; }""")
    bounds = page.evaluate("window.__viewer.R.L.colX")  # the column edges of the layout
    assert len(bounds) == len(g["metadata"]["prompt_tokens"]) + 1
    for n in g["nodes"]:
        p = n["ctx_idx"]
        assert bounds[p] <= xs[n["node_id"]] <= bounds[p + 1], n["node_id"]
    # logit nodes with token and probability; choosing one traces its ancestors
    logits = sorted((n for n in g["nodes"] if n["feature_type"] == "logit"),
                    key=lambda n: (not n.get("is_target_logit"), -n["token_prob"]))
    opts = page.eval_on_selector_all("#logit-select option", "els => els.map(e => [e.value, e.textContent])")
    assert [o[0] for o in opts] == [""] + [n["node_id"] for n in logits]  # "" = all logits (the default)
    assert all(n["clerp"] in o[1] for n, o in zip(logits, opts[1:])) and "(p=" in opts[1][1]
    assert _visible_ids(page) == ids
    other = logits[3]["node_id"]
    page.select_option("#logit-select", other)
    inc: dict[str, list[str]] = {}
    for ln in g["links"]:
        inc.setdefault(ln["target"], []).append(ln["source"])
    anc, stack = {other}, [other]
    while stack:
        for s in inc.get(stack.pop(), []):
            if s not in anc:
                anc.add(s)
                stack.append(s)
    assert _visible_ids(page) == anc
    page.select_option("#logit-select", "")
    # stored supernodes are listed and drawn
    stored = [sn for sn in g["qParams"]["supernodes"] if any(m in ids for m in sn[1:])]
    labels = page.eval_on_selector_all("ul.sns li input.sn-edit", "els => els.map(e => e.value)")
    assert labels == [sn[0] for sn in stored]
    assert page.locator("g.supernode").count() == len(stored)
    # node panel: the token and its position
    feat = max((n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"), key=lambda n: n["influence"])
    page.locator(f'g.node[data-id="{feat["node_id"]}"] circle').click()
    tok = g["metadata"]["prompt_tokens"][feat["ctx_idx"]]
    assert page.text_content("#details .tok-row td:last-child").startswith(f"'{tok}' at position {feat['ctx_idx']}")
    assert page.text_content("#details p mark") == tok
    assert fd[f"feature/L{feat['layer']}/I{feat['feature']}"]["label"] in page.text_content("#details .feature-info")
    page.locator(f'g.node[data-id="{logits[0]["node_id"]}"] circle').click()
    li = page.text_content("#details .logit-info")
    assert f"{logits[0]['token_prob']:.3g}" in li and "target logit" in li and "' dollar'" in li
    assert _collisions(page) == []
    # back to the circuit
    page.select_option("#graph-select", "")
    assert int(page.text_content("#node-total")) == len(_drawn_nodes(c))
    assert page._errors == []
    page.close()


def test_trust_and_warnings(browser, run, tmp_path):
    html, cj, fd = run
    page = _open(browser, _url(html, c=COMP_NAME))
    trust = page.text_content("#trust")
    assert "held-out faithfulness 0.87 [0.77, 0.98] · 8 prompts" in trust
    assert "matched-baseline p 0.0198" in trust and "CPR 0.94" in trust and "CMD 0.063" in trust
    assert "node share 5.2%" in trust and "fails validation" in trust
    # validated: false in circuits.json -> a plain warning naming the failed part of the rule
    w = page.text_content("#warning")
    assert page.is_visible("#warning") and "fails its checks" in w and "p = 0.0198 ≥ 0.01" in w
    assert "< 0.7" not in w and "not a finding" in w
    page.select_option("#relation-select", str(FEAT))
    w = page.text_content("#warning")
    assert "fails its checks" in w and "p = 0.0891 ≥ 0.01" in w and "node share 48% > 10%" in w and "< 0.7" not in w
    assert "dictionary quality not recorded" in page.text_content("#trust")
    page.close()
    # a validated circuit has no warning; the dictionary-quality contract: below the bar -> warning with advice
    cj2 = json.loads(json.dumps(cj))
    cj2["circuits"][COMP]["validation"]["validated"] = True
    val = cj2["circuits"][FEAT]["validation"]
    val["validated"] = True
    val["dictionary_quality"] = {"meets_bar": False, "bar": {"explained_variance": 0.8}, "layers_below_bar":
                                 ["blocks.3.ln2.hook_normalized->blocks.3.hook_mlp_out"], "source": "x",
                                 "advice": "Train longer <b>now</b>."}
    out = tmp_path / "run"
    shutil.copytree(html.parent, out)
    h2 = write_viewer(out, cj2, feature_details=fd)
    page = _open(browser, _url(h2, c=COMP_NAME))
    assert page.is_hidden("#warning") and "validated" in page.text_content("#trust")
    page.select_option("#relation-select", str(FEAT))
    w = page.text_content("#warning")
    assert "below the quality bar" in w and "Train longer <b>now</b>." in w and "blocks.3" in w and "Not a finding" in w
    assert "fails its checks" not in w
    assert "dictionary quality below bar" in page.text_content("#trust")
    assert page._errors == []
    page.close()


# ------------------------------------------------------------------------------------------ untrusted text
def _xss_circuit() -> dict:
    nodes = [
        {"id": "embed/L-1/subject_last", "component": "embed", "layer": -1, "role": "subject_last", "label": "Emb",
         "score": 0.5},
        {"id": "mlp_out/L0/subject_last", "component": "mlp_out", "layer": 0, "role": "subject_last", "label": XSS_IMG,
         "score": 9.0, "contexts": ["The capital of «France» is", XSS_SCRIPT + " context"]},
        {"id": "head/L1/I0/last", "component": "head", "layer": 1, "role": "last", "index": 0,
         "label": XSS_SCRIPT + " label", "score": -2.0},
        {"id": "embed/L-1/bos", "component": "embed", "layer": -1, "role": "bos", "label": "Emb", "score": 0.0},
        {"id": "logit/L2/last", "component": "logit", "layer": 2, "role": "last", "label": "Logit", "score": None},
    ]
    edges = [{"source": a, "target": b, "weight": w} for a, b, w in [
        ("embed/L-1/subject_last", "mlp_out/L0/subject_last", 0.4),
        ("mlp_out/L0/subject_last", "head/L1/I0/last", -0.7),
        ("head/L1/I0/last", "logit/L2/last", 1.2), ("mlp_out/L0/subject_last", "logit/L2/last", 0.3)]]
    return {"name": XSS_SCRIPT, "relation": "x", "nodes": nodes, "edges": edges,
            "facts": [{"prompt": XSS_SCRIPT + " is located in", "answer": XSS_IMG}],
            "graphs": ["graphs/missing.json", "https://example.com/x.json", "ht\ttps://evil.example/x.json",
                       "\x01javascript:alert(1)", "java\nscript:alert(1)", "graphs/../../etc/passwd"]}


def test_untrusted_text_is_never_executed(browser, tmp_path):
    data = {"model": XSS_IMG, "circuits": [_xss_circuit()]}
    html = write_viewer(tmp_path, data)
    page = _open(browser, html.as_uri())
    # the unconnected score-0 node is neither drawn nor counted
    assert _count(page) == 4 == int(page.text_content("#node-total"))
    page.locator('g.node[data-id="mlp_out/L0/subject_last"] circle').click()
    assert page.text_content("#details .node-title") == XSS_IMG
    assert XSS_SCRIPT + " context" in page.text_content("#details")
    assert page.text_content("#details ul.ctx mark") == "France"
    assert page.locator("#facts-box").get_by_text(XSS_SCRIPT + " is located in").is_visible()
    assert page.text_content("#circuit-title").endswith(XSS_SCRIPT)
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 2
    hrefs = page.eval_on_selector_all("#graphs-box a", "els => els.map(e => e.getAttribute('href'))")
    assert hrefs == ["graphs/missing.json"]
    assert "link blocked" in page.text_content("#graphs-box") and "not embedded" in page.text_content("#graphs-box")
    page.fill("#search", XSS_SCRIPT)
    assert _visible_ids(page) == {"head/L1/I0/last", "logit/L2/last"}
    page.fill("#group-label", XSS_IMG)
    page.locator('g.node[data-id="head/L1/I0/last"] circle').click(modifiers=["Control"])
    page.click("#group-btn")
    assert page.text_content("g.supernode text") == XSS_IMG[:29] + "…"
    url = page.url
    page.close()
    page = _open(browser, url)  # the hash is untrusted input too
    assert page.text_content("g.supernode text") == XSS_IMG[:29] + "…"
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page._errors == []
    page.close()
    # hash values naming inherited object properties select nothing and break nothing
    for bad in ("constructor", "__proto__", "toString"):
        page = _open(browser, _url(html, sel=bad, pins=f'["{bad}"]'))
        assert page._errors == [], (bad, page._errors)
        assert _count(page) == 4
        page.close()


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
