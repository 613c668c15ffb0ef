"""Rebuild the viewer test fixture (``tests/data/viewer/run``) from a default run folder.

Usage: ``python tests/data/viewer/make_fixture.py /tmp/default3``

Keeps the largest component circuit and the largest feature circuit (by node count, then edge count) of
``circuits.json``, the per-prompt graph files they link (weights rounded to 4 significant digits, links cut to
the strongest ``MAX_LINKS`` by ``|weight|``), their ``metrics.json`` entries (without curves),
the ``known_facts.json`` facts of their relations (for the subjects) and the ``feature_details`` of the
features they contain (from ``stages/feature_circuits.json``) as ``feature_details.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MAX_LINKS = 1200
HERE = Path(__file__).resolve().parent / "run"


def _sig(x):
    return float(f"{x:.4g}") if isinstance(x, float) else x


def _round(obj):
    if isinstance(obj, float):
        return _sig(obj)
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_round(obj), ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


def main(src: Path) -> None:
    cj = json.loads((src / "circuits.json").read_text("utf-8"))
    size = lambda c: (len(c["nodes"]), len(c["edges"]))  # noqa: E731
    comp = max((c for c in cj["circuits"] if c.get("kind") != "feature"), key=size)
    feat = max((c for c in cj["circuits"] if c.get("kind") == "feature"), key=size)
    _dump(HERE / "circuits.json", {"model": cj["model"], "circuits": [comp, feat]})
    keys = set()
    for c in (comp, feat):
        for p in c.get("graphs") or []:
            g = json.loads((src / p).read_text("utf-8"))
            g["links"] = sorted(g["links"], key=lambda ln: -abs(ln["weight"]))[:MAX_LINKS]
            _dump(HERE / p, g)
            keys |= {f"feature/L{n['layer']}/I{n['feature']}" for n in g["nodes"]
                     if n.get("feature_type") == "cross layer transcoder"}
    keys |= {f"feature/L{n['layer']}/I{n['index']}" for n in feat["nodes"] if n["component"] == "feature"}
    metrics = json.loads((src / "metrics.json").read_text("utf-8"))
    drop = {"curve", "faithfulness_at", "cross_relation", "held_out_per_prompt", "baselines"}
    m = {"model": metrics["model"], "metric": metrics["metric"], "ablation": metrics["ablation"],
         "relations": {comp["relation"]: {k: v for k, v in metrics["relations"][comp["relation"]].items()
                                          if k not in drop}},
         "feature_circuits": {feat["relation"]: {k: v for k, v in metrics["feature_circuits"][feat["relation"]].items()
                                                 if k not in drop and not isinstance(v, (list, dict))
                                                 or k in ("held_out_ci", "held_out_ci_live", "faithfulness_ci")}}}
    _dump(HERE / "metrics.json", m)
    kf = json.loads((src / "known_facts.json").read_text("utf-8"))
    _dump(HERE / "known_facts.json", {"facts": [f for f in kf["facts"]
                                                if f.get("relation") in (comp["relation"], feat["relation"])]})
    fd = json.loads((src / "stages" / "feature_circuits.json").read_text("utf-8"))["feature_details"]
    _dump(HERE.parent / "feature_details.json", {k: v for k, v in fd.items() if k in keys})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/default3"))
