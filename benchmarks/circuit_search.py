"""Circuit search compared on held-out facts: EAP, EAP-IG, exact-patching ranking and greedy refinement by exact
ablation. ``python benchmarks/circuit_search.py --out results/circuit_search.json [--relations a,b] [--threads 2]``

Per relation: the known facts are split into discovery and held-out facts *before* pairing and each split is
paired on its own (``pipeline.attribution_stage.relation_pairs``: subject-swap pairs, ``--discovery`` and
``--held-out`` facts). Every method ranks the component nodes (heads, MLPs, embeddings at each token role) using
the discovery pairs only:

* ``eap`` / ``eap-ig``: ``attribution.component_graph.component_circuit(method=...)`` node scores (|score|, combined
  by role);
* ``exact``: ``validation.exact_ranking.exact_patching_ranking`` (each node ablated alone from the clean run, exact);
* ``greedy`` / ``greedy-dist``: ``graph.refine.refine_circuit`` on the discovery evaluator (objective: maximise f /
  minimise |1 - f|), seeded with ``--greedy-base``'s ranking, up to ``--budget`` of the non-inert nodes (the rest of
  the base ranking appended).

Each ranking is then scored on the *held-out* pairs with ``CircuitEvaluator(ablation="corrupted")``: the faithfulness
of its top 1/2/5/10/20 % of the non-inert universe (``relevant_universe``, H1) and the node-level CPR/CMD of the
MIB curve over that universe; the same numbers on the discovery pairs (in-sample) are given beside them. Seconds are
wall-clock discovery cost per method on this machine (shared CPU: compare them with each other, not across runs).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)
DEFAULT_RELATIONS = "capital_city,country_language,landmark_country"


def _pairs(model, facts, n_disc: int, n_held: int, seed: int):
    from circuit_discovery.pipeline.config import RunConfig

    try:
        from circuit_discovery.pipeline.attribution_stage import relation_pairs

        cfg = RunConfig(max_facts=n_disc, held_out_facts=n_held, seed=seed)
        sp = relation_pairs(model, facts, cfg)
        return sp["discovery"], sp["held_out"]
    except (ImportError, TypeError):  # older tree: split the facts first, pair each split on its own
        from circuit_discovery.facts import build_pairs, split_facts

        disc, held = split_facts(facts, n_held_out=n_held, seed=seed, tokenizer=model.tokenizer)
        ok = lambda p: p.corruption == "subject_swap" and p.first_token_differs  # noqa: E731
        return ([p for p in build_pairs(disc, model.tokenizer, seed=seed) if ok(p)][:n_disc],
                [p for p in build_pairs(held, model.tokenizer, seed=seed) if ok(p)][:n_held])


def _universe(ev) -> list[str]:
    return list(ev.relevant_universe) if hasattr(ev, "relevant_universe") else list(ev.universe)


def _score(ev, ranked, mf, me) -> dict:
    """f at FRACTIONS of the (relevant) universe and MIB CPR/CMD, ranked nodes first, the rest appended."""
    c = ev.curve(ranked, m_full=mf, m_empty=me)
    out = {"f_at": {str(x): float(c.faithfulness_at(x)) for x in FRACTIONS}, "cpr": float(c.cpr),
           "cmd": float(c.cmd), "sizes": {str(float(fr)): int(s) for fr, s in zip(c.fractions, c.sizes)}}
    return out


def run_relation(model, rel, facts, args) -> dict:
    from circuit_discovery.attribution.component_graph import component_circuit
    from circuit_discovery.graph.refine import refine_circuit
    from circuit_discovery.validation.ablation import CircuitEvaluator
    from circuit_discovery.validation.exact_ranking import exact_patching_ranking

    disc, held = _pairs(model, facts, args.discovery, args.held_out, args.seed)
    res = {"n_discovery": len(disc), "n_held_out": len(held)}
    if len(disc) < 2 or len(held) < 2:
        res["skipped"] = "fewer than 2 discovery or held-out subject-swap pairs"
        return res
    kw = dict(metric="logit_diff", ablation="corrupted", granularity="head")
    dev, hev = CircuitEvaluator(model, disc, **kw), CircuitEvaluator(model, held, **kw)
    U = _universe(dev)
    res["n_universe"], res["n_relevant"] = len(dev.universe), len(U)
    res["held_out_n_relevant"] = len(_universe(hev))
    d_ref, h_ref = dev.references(), hev.references()
    res["discovery_refs"], res["held_out_refs"] = list(d_ref), list(h_ref)
    print(f"  [{rel}] {len(disc)} discovery / {len(held)} held-out pairs, {len(U)} relevant nodes", flush=True)
    rankings, seconds, extra = {}, {}, {}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = args.greedy_base
    need = set(methods) | ({base} if any(m.startswith("greedy") for m in methods) else set())
    for method in ("eap", "eap-ig"):
        if method not in need:
            continue
        t = time.time()
        r = component_circuit(model, disc, method=method, n_steps=args.ig_steps, granularity="head",
                              batch_size=32)
        rankings[method] = dev._components_only([n for n in r.ranked_nodes() if not n.startswith("logit")])
        seconds[method] = time.time() - t
        print(f"  [{rel}] {method}: {seconds[method]:.1f}s", flush=True)
    if "exact" in need:
        t = time.time()
        rankings["exact"], _ = exact_patching_ranking(model, disc, U, batch_size=args.batch_size)
        seconds["exact"] = time.time() - t
        print(f"  [{rel}] exact: {seconds['exact']:.1f}s", flush=True)
    for name, objective in (("greedy", "f"), ("greedy-dist", "distance")):
        if name not in methods:
            continue
        t = time.time()
        g = refine_circuit(dev, rankings[base], budget_fraction=args.budget, pool=args.pool, growth=args.growth,
                           max_evaluations=args.max_evaluations, m_full=d_ref[0], m_empty=d_ref[1],
                           objective=objective)
        rankings[name] = g.order
        print(f"  [{rel}] {name}: {time.time() - t:.1f}s, {g.n_evaluations} evaluations", flush=True)
        seconds[name] = time.time() - t + seconds[base]  # greedy needs its base ranking first
        extra[name] = {"base": base, "objective": objective, "budget_nodes": len(g.nodes),
                       "n_evaluations": g.n_evaluations,
                       "discovery_trajectory": list(zip(g.sizes, [round(f, 4) for f in g.faithfulness]))}
    out = {}
    for name, ranked in rankings.items():
        if name not in methods:
            continue
        held_s = _score(hev, ranked, *h_ref)
        disc_s = _score(dev, ranked, *d_ref)
        k5 = held_s["sizes"].get("0.05")
        ci = None
        if hasattr(hev, "faithfulness_with_ci") and k5:
            order = [n for n in ranked if n in set(_universe(hev))]
            ci = hev.faithfulness_with_ci(order[:k5], n_boot=1000, seed=args.seed)
            ci = {k: ci.get(k) for k in ("faithfulness", "ci_low", "ci_high", "n", "degenerate")}
        out[name] = {"held_out": held_s, "discovery": disc_s, "held_out_5pct_ci": ci,
                     "seconds": round(seconds[name], 1), **extra.get(name, {})}
    res["methods"] = out
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--relations", default=DEFAULT_RELATIONS)
    ap.add_argument("--discovery", type=int, default=12)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--methods", default="eap,eap-ig,exact,greedy,greedy-dist",
                    help="greedy: maximise f; greedy-dist: minimise |1 - f|")
    ap.add_argument("--greedy-base", default="eap-ig", choices=("eap", "eap-ig", "exact"))
    ap.add_argument("--budget", type=float, default=0.1, help="greedy stops at this share of the relevant nodes")
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--growth", type=float, default=0.25)
    ap.add_argument("--max-evaluations", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from circuit_discovery import load_model
    from circuit_discovery.facts import filter_known, load_builtin
    from circuit_discovery.io import atomic_write_json

    t0 = time.time()
    model = load_model(args.model, device="cpu")
    ds = load_builtin(include_non_default=True) if "include_non_default" in load_builtin.__code__.co_varnames \
        else load_builtin()
    result = {"model": args.model or "gemma-3-270m", "fractions": list(FRACTIONS), "args": vars(args),
              "relations": {}}
    for rel in [r.strip() for r in args.relations.split(",") if r.strip()]:
        t = time.time()
        known, _ = filter_known(model, list(ds[rel]), k=1, progress=False)
        r = run_relation(model, rel, list(known), args)
        r["n_known"] = len(known)
        r["seconds"] = round(time.time() - t, 1)
        result["relations"][rel] = r
        print(rel, json.dumps({k: v for k, v in r.items() if k != "methods"}), flush=True)
        for name, m in r.get("methods", {}).items():
            fs = " ".join(f"{v:6.2f}" for v in m["held_out"]["f_at"].values())
            print(f"  {name:7s} held-out f@1/2/5/10/20% " + fs
                  + f"  CPR {m['held_out']['cpr']:.3f}  | disc f@5% {m['discovery']['f_at']['0.05']:.2f}"
                  + f"  {m['seconds']}s", flush=True)
        atomic_write_json(args.out, result)
    # mean over relations
    names = sorted({n for r in result["relations"].values() for n in r.get("methods", {})})
    summ = {}
    for n in names:
        rows = [r["methods"][n] for r in result["relations"].values() if n in r.get("methods", {})]
        summ[n] = {"held_out_f_at": {str(x): _mean([m["held_out"]["f_at"][str(x)] for m in rows]) for x in FRACTIONS},
                   "held_out_cpr": _mean([m["held_out"]["cpr"] for m in rows]),
                   "held_out_cmd": _mean([m["held_out"]["cmd"] for m in rows]),
                   "discovery_f_at": {str(x): _mean([m["discovery"]["f_at"][str(x)] for m in rows]) for x in FRACTIONS},
                   "seconds": _mean([m["seconds"] for m in rows]), "n_relations": len(rows)}
    result["summary"] = summ
    result["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(args.out, result)
    print(json.dumps(summ, indent=1))


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    main()
