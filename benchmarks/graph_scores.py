"""Dictionary quality and feature-graph scores of finished runs: compare dictionaries on the same run.

    python benchmarks/graph_scores.py --run topk=/tmp/default3 --run skip=/tmp/default8 --out F.json

Reads each run folder's ``stages/dictionaries.json`` and, when present, ``stages/feature_circuits.json`` (nothing
is recomputed; a ``frc train-sae`` folder has only the first) and writes ``{"runs": {label: {"kind", "layers":
{hook pair: {"explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction", "dead_fraction_n_tokens",
"l0"}}, "relations": {relation: {"replacement_score", "completeness_score", "error_influence_share",
"held_out_faithfulness", "n_graphs"}}, "summary": {...}}}}``: the dictionaries' held-out metrics as the run measured
them; the graph scores are circuit-tracer's, the mean over the relation's prompt graphs (``feature_facts`` per
relation); ``summary`` gives the mean, median, minimum and maximum over relations (the unit: relations, never
graphs). Runs that share their stages up to the dictionaries (one resumed from the other) differ only in their
dictionaries.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from circuit_discovery.io import atomic_write_json

SCORES = ("replacement_score", "completeness_score", "error_influence_share")
METRICS = ("explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction", "dead_fraction_n_tokens", "l0")


def run_scores(folder: Path) -> dict:
    dicts = json.loads((folder / "stages" / "dictionaries.json").read_text())
    path = folder / "stages" / "feature_circuits.json"
    feats = json.loads(path.read_text()) if path.is_file() else {"relations": {}}
    rels = {}
    for rel, r in feats["relations"].items():
        graphs = r.get("info", {}).get("graph_scores") or []
        if not graphs:
            continue
        rels[rel] = {s: statistics.mean(g[s] for g in graphs) for s in SCORES}
        rels[rel]["held_out_faithfulness"] = r.get("validation", {}).get("held_out_faithfulness")
        rels[rel]["n_graphs"] = len(graphs)
    summary = {s: {"mean": statistics.mean(v[s] for v in rels.values()),
                   "median": statistics.median(v[s] for v in rels.values()),
                   "min": min(v[s] for v in rels.values()), "max": max(v[s] for v in rels.values())}
               for s in SCORES} if rels else {}
    kind = dicts.get("kind") or f"{(dicts.get('settings') or {}).get('architecture')}_transcoder"
    layers = {h: {k: m.get(k) for k in METRICS} for h, m in (dicts.get("layers") or {}).items()}
    return {"folder": str(folder), "kind": kind, "settings": dicts.get("settings"), "layers": layers,
            "n_relations": len(rels), "relations": rels, "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="LABEL=FOLDER (repeat)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = {"runs": {}}
    for spec in args.run:
        label, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--run {spec!r}: give LABEL=FOLDER")
        out["runs"][label] = run_scores(Path(folder))
    atomic_write_json(args.out, out)
    for label, r in out["runs"].items():
        print(label, r["kind"], len(r["layers"]), "layers;", r["n_relations"], "relations",
              {s: round(v["mean"], 3) for s, v in r["summary"].items()})
    return out


if __name__ == "__main__":
    main()
