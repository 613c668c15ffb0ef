"""Benchmark the offline viewer in headless Chromium: time to first draw and to a hover update.

    python benchmarks/viewer.py --out viewer_bench.json                 # /tmp/default3 if present, else the fixture
    python benchmarks/viewer.py --run /path/to/run --out viewer_bench.json

The run folder is copied to a temporary folder and its ``index.html`` rewritten there with
:func:`circuit_discovery.report.viewer.write_viewer` (feature details from ``stages/feature_circuits.json`` or,
for the test fixture, ``tests/data/viewer/feature_details.json``). Measured for the largest whole circuit and
the largest per-prompt graph (by drawn nodes + edges), each opened by its URL hash:

* ``first_draw_ms``: from navigation start to the end of the first draw (the viewer's own
  ``performance.now()`` when it is ready: HTML parse, JSON parse of the embedded data, layout, SVG, labels);
  ``json_parse_ms`` and ``script_ms`` (JSON parse + model + draw) are parts of it. Median of ``--repeats``
  loads.
* ``hover_ms``: one hover update on the node with the most edges: the ``mouseenter`` handler plus the style
  recalculation it forces (read back with ``getComputedStyle``), median and max over 30 hovers (enter and leave
  alternate); ``hover_frame_ms`` adds the wait for the next animation frame (paint included).

``--screenshots DIR`` also writes the README/docs screenshots at 1280 x 800 px (``viewer-component.png``,
``viewer-feature.png``, ``viewer-prompt-graph.png``, ``viewer-feature-panel.png``; palette PNGs via Pillow
when it is installed) of the circuits named by ``--component`` and ``--feature``.

Requires the Debian ``chromium`` package and the ``playwright`` Python package (no browser download). Writes
``{"goal": ..., "targets": [...], "html_bytes", "machine", ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from circuit_discovery.io import atomic_write_json  # noqa: E402
from circuit_discovery.report.viewer import write_viewer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "viewer"
CHROMIUM = "/usr/bin/chromium"

HOVER_JS = """(id) => {
  const g = document.querySelector(`g.node[data-id="${CSS.escape(id)}"]`);
  const edge = document.querySelector('path.edge');
  const times = [], frames = [];
  return new Promise(resolve => {
    let i = 0;
    const step = () => {
      const t0 = performance.now();
      g.dispatchEvent(new MouseEvent(i % 2 ? 'mouseleave' : 'mouseenter', {clientX: 10, clientY: 10}));
      getComputedStyle(edge).opacity;  // force the style recalculation the class change causes
      const t1 = performance.now();
      if (i % 2 === 0) times.push(t1 - t0);
      requestAnimationFrame(() => {
        if (i % 2 === 0) frames.push(performance.now() - t0);
        i += 1;
        if (i < 60) { step(); } else { resolve({times, frames}); }
      });
    };
    step();
  });
}"""


def _largest(html_payload: dict) -> list[dict]:
    """The largest whole circuit and the largest per-prompt graph, by nodes + edges."""
    circuits = html_payload["circuits"]
    best_c = max(range(len(circuits)), key=lambda i: len(circuits[i]["nodes"]) + len(circuits[i]["edges"]))
    graphs = [(p, g, c) for c in circuits for p in c.get("graphs") or []
              if (g := html_payload["prompt_graphs"].get(p))]
    out = [{"what": "whole circuit", "name": circuits[best_c]["name"], "hash": {"c": circuits[best_c]["name"]},
            "nodes": len(circuits[best_c]["nodes"]), "edges": len(circuits[best_c]["edges"])}]
    if graphs:
        p, g, c = max(graphs, key=lambda x: len(x[1]["nodes"]) + len(x[1]["links"]))
        out.append({"what": "per-prompt graph", "name": p, "hash": {"c": c["name"], "g": p},
                    "nodes": len(g["nodes"]), "edges": len(g["links"])})
    return out


def _payload(html: Path) -> dict:
    text = html.read_text("utf-8")
    start = text.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(text[start:text.index("</script>", start)])


def _save_png(png: bytes, path: Path) -> None:
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional: keep the full-colour PNG
        path.write_bytes(png)
        return
    import io

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)


def _screenshots(browser, html: Path, payload: dict, component: str, feature: str, out: Path) -> None:
    """The four documentation screenshots (1280 x 800 px)."""
    out.mkdir(parents=True, exist_ok=True)
    circuits = {c["name"]: c for c in payload["circuits"]}
    comp, feat = circuits[component], circuits[feature]
    top = lambda c, kind: max((n for n in c["nodes"] if n["component"] == kind),  # noqa: E731
                              key=lambda n: abs(n.get("score") or 0))["id"]
    graph = feat["graphs"][0]
    g = payload["prompt_graphs"][graph]
    f = {k: i for i, k in enumerate(g["node_fields"])}
    target = next(n[f["id"]] for n in g["nodes"] if n[f["is_target_logit"]])
    shots = [("viewer-component.png", {"c": component}, None, top(comp, "head")),
             ("viewer-feature.png", {"c": feature}, None, None),
             ("viewer-prompt-graph.png", {"c": feature, "g": graph}, target, None),
             ("viewer-feature-panel.png", {"c": feature}, top(feat, "feature"), None)]
    for name, hash_, click, hover in shots:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(html.as_uri() + "#" + urlencode(hash_))
        page.wait_for_function("window.__viewerReady === true")
        if click:
            page.locator(f'g.node[data-id="{click}"] circle').click()
            page.mouse.move(1275, 795)
        if hover:
            page.locator(f'g.node[data-id="{hover}"] circle').hover()
        _save_png(page.screenshot(), out / name)
        page.close()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--run", default=None, help="run folder (default: /tmp/default3 if present, else the fixture)")
    ap.add_argument("--repeats", type=int, default=5, help="page loads per target")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--screenshots", default=None, help="folder for the four viewer screenshots")
    ap.add_argument("--component", default="entity_location", help="component circuit of the screenshots")
    ap.add_argument("--feature", default="entity_location/features", help="feature circuit of the screenshots")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    src = Path(args.run) if args.run else (Path("/tmp/default3") if Path("/tmp/default3/circuits.json").is_file()
                                           else FIXTURE / "run")
    tmp = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    try:
        run = tmp / "run"
        shutil.copytree(src, run, ignore=shutil.ignore_patterns("figures", "index.html", "report.md"))
        cj = json.loads((run / "circuits.json").read_text("utf-8"))
        fd = None
        if not (run / "stages" / "feature_circuits.json").is_file() and (FIXTURE / "feature_details.json").is_file() \
                and src.resolve() == (FIXTURE / "run").resolve():
            fd = json.loads((FIXTURE / "feature_details.json").read_text("utf-8"))
        t = time.perf_counter()
        html = write_viewer(run, cj, feature_details=fd)
        write_s = time.perf_counter() - t
        targets = _largest(_payload(html))
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless=new", "--no-sandbox", "--disable-gpu"])
            for tg in targets:
                url = html.as_uri() + "#" + urlencode(tg["hash"])
                loads = []
                for _ in range(args.repeats):
                    page = b.new_page(viewport={"width": args.width, "height": 800})
                    page.goto(url)
                    page.wait_for_function("window.__viewerReady === true")
                    loads.append(page.evaluate("window.__viewerTimings"))
                    if len(loads) < args.repeats:
                        page.close()
                hub = page.evaluate("""() => { const R = window.__viewer.R; let best = null, n = -1;
                  Object.keys(R.adj).forEach(k => { if (R.adj[k].length > n) { n = R.adj[k].length; best = k; } });
                  return [best, n]; }""")
                hv = page.evaluate(HOVER_JS, hub[0])
                page.close()
                tg.update({
                    "drawn_nodes": None, "url_hash": tg.pop("hash"),
                    "first_draw_ms": statistics.median(x["ready_since_navigation_ms"] for x in loads),
                    "first_draw_ms_all": [round(x["ready_since_navigation_ms"], 1) for x in loads],
                    "json_parse_ms": statistics.median(x["json_parse_ms"] for x in loads),
                    "script_ms": statistics.median(x["first_draw_ms"] for x in loads),
                    "hover_node": hub[0], "hover_node_edges": hub[1],
                    "hover_ms": statistics.median(hv["times"]), "hover_ms_max": max(hv["times"]),
                    "hover_frame_ms": statistics.median(hv["frames"]),
                })
                tg.pop("drawn_nodes")
            if args.screenshots:
                _screenshots(b, html, _payload(html), args.component, args.feature, Path(args.screenshots))
            version = b.version
            b.close()
    finally:
        html_bytes = (tmp / "run" / "index.html").stat().st_size if (tmp / "run" / "index.html").exists() else None
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "goal": {"first_draw_ms": 1000, "hover_ms": 50},
        "meets_goal": all(t["first_draw_ms"] <= 1000 and t["hover_ms"] <= 50 for t in targets),
        "targets": targets, "run": str(src), "html_bytes": html_bytes, "write_viewer_s": round(write_s, 2),
        "viewport_width": args.width, "repeats": args.repeats,
        "machine": {"chromium": version, "platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1min": os.getloadavg()[0]},
        "note": "headless Chromium on a machine shared with other jobs; load_avg_1min is the load when it ended",
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
