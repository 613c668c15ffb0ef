"""End-to-end test of the offline viewer in a real headless Chromium (Debian ``chromium`` package
driven by the ``playwright`` Python package; no browser download).

Oracles are the synthetic circuits.json built here: node counts, labels and the pruning rule
stated in the viewer's contract (top-k fraction: ``ceil(f * n_unpinned)`` nodes ranked by
``|score|`` plus the always-shown logit nodes; threshold: ``|score| >= t * max|score|``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the 'playwright' Python package is not installed")

from circuit_discovery.report.viewer import write_viewer  # noqa: E402

XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=2">'
ROLES = ["bos", "subject_first", "subject_last", "relation_first", "relation", "last"]
COMPONENTS = ["mlp_out", "attn_out", "head", "feature"]


def _circuit(name: str, n_nodes: int, seed: int, n_layers: int = 6, xss: bool = False) -> dict:
    """A deterministic circuit of ``n_nodes`` nodes (incl. one embed and one logit node)."""
    import random

    rnd = random.Random(seed)
    nodes = []
    for i in range(n_nodes - 2):
        comp = COMPONENTS[i % 4]
        layer = rnd.randrange(n_layers)
        role = ROLES[rnd.randrange(len(ROLES))]
        index = rnd.randrange(8) if comp in ("head", "feature") else None
        nid = f"{comp}/L{layer}/{role}/n{i}"
        label = f"L{layer} {comp} @ {role} #{i}"
        if xss and i == 0:
            label = XSS_IMG
        if xss and i == 1:
            label = XSS_SCRIPT + " label"
        nodes.append({
            "id": nid, "component": comp, "layer": layer, "role": role, "position": None, "index": index,
            "label": label, "score": round(rnd.uniform(-1, 1) * (1 + i % 5), 4),
            "activation": round(rnd.random(), 3), "influence": round(rnd.random(), 3),
            "contexts": ["The capital of France is Paris", XSS_SCRIPT + " context"] if i % 3 == 0 else None,
        })
    # give the XSS-labelled node the largest |score| so that it is labelled and easy to click
    nodes[0]["score"] = 9.0
    nodes.append({"id": "embed/L-1/subject_last", "component": "embed", "layer": -1, "role": "subject_last",
                  "label": "embed @ subject_last", "score": 0.35, "activation": None, "influence": None})
    nodes.append({"id": f"logit/L{n_layers}/last", "component": "logit", "layer": n_layers, "role": "last",
                  "label": "logit ' Paris'", "score": None, "activation": None, "influence": None})
    layer = {n["id"]: n["layer"] for n in nodes}
    edges = [{"source": a, "target": b, "weight": round(rnd.gauss(0, 1), 4)}
             for a in layer for b in layer if layer[a] < layer[b] and rnd.random() < 0.25]
    facts = [{"prompt": "The capital of France is", "answer": " Paris"}]
    if xss:
        facts.append({"prompt": XSS_SCRIPT + " is located in", "answer": XSS_IMG})
    return {"name": name, "relation": name, "n_facts": len(facts), "attribution_score": 0.83,
            "faithfulness": None if xss else 0.91, "nodes": nodes, "edges": edges, "facts": facts,
            "prompt_tokens": ["<bos>", "The", " capital", " of", " France", " is"],
            "graphs": [f"graphs/{name}_0.json", f"graphs/{name}_1.json"]}


def _expected_fraction(nodes: list[dict], frac: float) -> int:
    free = [n for n in nodes if n["component"] != "logit"]
    return math.ceil(frac * len(free) - 1e-9) + (len(nodes) - len(free))


def _expected_threshold(nodes: list[dict], frac: float) -> int:
    free = [n for n in nodes if n["component"] != "logit"]
    smax = max(abs(n["score"] or 0.0) for n in free)
    return sum(abs(n["score"] or 0.0) >= frac * smax for n in free) + (len(nodes) - len(free))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield b
        b.close()


def test_viewer_in_chromium(browser, tmp_path):
    data = {"model": "gemma-3-270m",
            "circuits": [_circuit("capital_city", 15, seed=1, xss=True), _circuit("language", 12, seed=2)]}
    html = write_viewer(tmp_path, data)
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html.as_uri())
    page.wait_for_selector("g.node")

    nodes0 = data["circuits"][0]["nodes"]
    count = lambda: int(page.text_content("#node-count"))  # noqa: E731
    visible_nodes = lambda: page.locator("g.node:not(.hidden)").count()  # noqa: E731

    # default slider shows every node of the first relation
    assert page.input_value("#prune-slider") == "100"
    assert count() == len(nodes0) == visible_nodes()
    assert int(page.text_content("#node-total")) == len(nodes0)

    # clicking a node shows its details with its (untrusted) label as text
    target = nodes0[0]
    page.locator(f'g.node[data-id="{target["id"]}"] circle').click()
    assert page.text_content("#details .node-title") == target["label"] == XSS_IMG
    details = page.text_content("#details")
    assert target["id"] in details and "9" in details
    assert XSS_SCRIPT + " context" in details  # top-activating contexts, as text
    other = nodes0[3]
    page.locator(f'g.node[data-id="{other["id"]}"] circle').click()
    assert page.text_content("#details .node-title") == other["label"]

    # the payloads are visible text and never executed
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.get_by_text(XSS_SCRIPT + " is located in").is_visible()
    assert page.locator(".answer", has_text=XSS_IMG).is_visible()
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 2

    # graph links are relative links to the per-prompt JSON
    hrefs = page.eval_on_selector_all("#graphs-box a", "els => els.map(e => e.getAttribute('href'))")
    assert hrefs == data["circuits"][0]["graphs"]

    page.screenshot(path=str(_artifact("viewer.png")), full_page=True)

    # pruning: top-k fraction
    page.locator("#prune-slider").fill("30")
    assert count() == _expected_fraction(nodes0, 0.30) == visible_nodes()
    assert count() < len(nodes0)
    visible_ids = set(page.eval_on_selector_all("g.node:not(.hidden)", "els => els.map(g => g.dataset.id)"))
    shown_edges = page.eval_on_selector_all(
        "path.edge:not(.hidden)", "els => els.map(p => [p.dataset.source, p.dataset.target])")
    expected_edges = [e for e in data["circuits"][0]["edges"]
                      if e["source"] in visible_ids and e["target"] in visible_ids]
    assert len(shown_edges) == len(expected_edges) == int(page.text_content("#edge-count"))
    assert all(s in visible_ids and t in visible_ids for s, t in shown_edges)
    # pruning: |score| threshold
    page.select_option("#prune-mode", "threshold")
    page.locator("#prune-slider").fill("50")
    assert count() == _expected_threshold(nodes0, 0.50) == visible_nodes()
    page.select_option("#prune-mode", "fraction")
    page.locator("#prune-slider").fill("100")
    assert count() == len(nodes0)

    # switching relation
    page.select_option("#relation-select", "1")
    nodes1 = data["circuits"][1]["nodes"]
    assert count() == len(nodes1) == visible_nodes()
    assert "language" in page.text_content("#circuit-title")
    page.locator(f'g.node[data-id="{nodes1[2]["id"]}"] circle').click()
    assert page.text_content("#details .node-title") == nodes1[2]["label"]
    page.select_option("#relation-select", "0")
    assert count() == len(nodes0)

    assert page.evaluate("typeof window.__xss") == "undefined"
    assert errors == [], errors
    page.close()


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
