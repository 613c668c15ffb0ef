"""Known-fact accuracy of a model on the built-in relations and on ROME's known_1000 (first answer token ranked
first), and the usable subject-swap pairs per relation after the discovery/held-out split. Writes JSON:
``python benchmarks/known_facts.py --out results/known_facts.json [--known1000 PATH]``.

``builtin.per_relation[rel]``: ``n``, ``n_known``, ``accuracy``, ``default`` (in the default run's selection) and
the split of the known facts as the pipeline makes it (:func:`~circuit_discovery.pipeline.attribution_stage.
usable_pair_counts` with the default ``max_facts``/``held_out_facts``): ``discovery_facts``/``held_out_facts`` and
the uncapped numbers of usable subject-swap pairs ``discovery_pairs``/``held_out_pairs`` (partners inside the split).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from circuit_discovery import load_model
from circuit_discovery.facts import filter_known, load_builtin, load_known_1000
from circuit_discovery.io import atomic_write_json
from circuit_discovery.pipeline.attribution_stage import usable_pair_counts
from circuit_discovery.pipeline.config import RunConfig

MIN_KNOWN = 20  # a default-run relation needs this many known facts (issue 14)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--known1000", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/known_1000.json"))
    ap.add_argument("--skip-known1000", action="store_true", help="measure the built-in relations only")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    res = {"model": args.model or "gemma-3-270m", "k": args.k}
    ds = load_builtin(include_non_default=True)
    t = time.time()
    known, rep = filter_known(model, ds, k=args.k, batch_size=args.batch_size)
    res["builtin"] = {**{k: v for k, v in rep.to_dict().items() if k != "facts"}, "seconds": round(time.time() - t, 1)}
    cfg = RunConfig()
    for rel, acc in res["builtin"]["per_relation"].items():
        acc["default"] = ds.relations[rel].default
        acc.update(usable_pair_counts(model, list(known[rel]) if rel in known else [], cfg))
    res["builtin"]["split"] = {"max_facts": cfg.max_facts, "held_out_facts": getattr(cfg, "held_out_facts", None),
                               "min_known": MIN_KNOWN}
    if not args.skip_known1000 and Path(args.known1000).exists():
        t = time.time()
        # ROME's prompts are scored as given; only the first token of the attribute counts (as ROME does)
        _, rep = filter_known(model, load_known_1000(args.known1000), k=args.k, use_aliases=False, all_tokens=False)
        d = rep.to_dict()
        res["known_1000"] = {"n": d["n"], "n_known": d["n_known"], "accuracy": d["accuracy"],
                             "seconds": round(time.time() - t, 1)}
    atomic_write_json(args.out, res)
    print(res)


if __name__ == "__main__":
    main()
