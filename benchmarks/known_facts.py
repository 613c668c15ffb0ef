"""Known-fact accuracy of a model on the built-in relations and on ROME's known_1000 (first answer token ranked
first). Writes JSON: ``python benchmarks/known_facts.py --out results/known_facts.json [--known1000 PATH]``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from circuit_discovery import load_model
from circuit_discovery.facts import filter_known, load_builtin, load_known_1000
from circuit_discovery.io import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--known1000", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/known_1000.json"))
    ap.add_argument("--k", type=int, default=1)
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    res = {"model": args.model or "gemma-3-270m", "k": args.k}
    t = time.time()
    _, rep = filter_known(model, load_builtin(), k=args.k)
    res["builtin"] = {**{k: v for k, v in rep.to_dict().items() if k != "facts"}, "seconds": round(time.time() - t, 1)}
    if Path(args.known1000).exists():
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
