"""Benchmark of the attribution engine on the built-in model (Gemma 3 270M) over known facts of one relation.

    python benchmarks/attribution.py [--quick] [--relation entity_location] --out FILE.json

The default relation is ``entity_location`` ("The Eiffel Tower is located in the city of"): its prompts have
10 tokens with BOS, the median length of ROME's known_1000 prompts. Attribution patching's advantage grows with
prompt length (exact patching runs one patched pass per node, nodes = 3 x layers x positions), so
``--relation capital_city`` (7-token prompts) gives a smaller speedup; ``docs/attribution.md`` has both.

Writes JSON with

* ``ig_vs_captum``: ``speedup`` = Captum time / our time, ``max_rel_err`` = max |ours - captum| / max |captum|
  over all attribution elements. Captum baseline: ``LayerIntegratedGradients`` on the input of decoder layer
  L/2 (``attribute_to_layer_input=True``, the activation ``blocks.{L/2}.hook_resid_pre``), forward function
  returning the logit difference from last-position logits only (``logits_to_keep=1``); same inputs (clean),
  baselines (corrupted), ``n_steps``, ``method`` and ``internal_batch_size``. Ours starts each step at layer L/2
  from cached activations and unembeds only the two metric rows.
* ``attribution_patching_vs_exact``: ``speedup`` = exact sweep time / attribution-patching time and ``spearman``
  rank correlation of the per-prompt scores over the same (layer, position) nodes of resid_pre, attn_out and
  mlp_out (also per component); ``disagreement`` per component: Spearman over the large exact effects
  (> 10% of the largest) and over the rest, and the 5 nodes where the two methods differ most (means over prompts).
* ``patching_overhead``: time of the batched exact sweep over the time of as many plain forward passes
  (``final_hidden`` + the metric, full model) at the same batch sizes, minus 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from circuit_discovery import load_model  # noqa: E402
from circuit_discovery.attribution import (PairInputs, activation_patching, attribution_patching,  # noqa: E402
                                           layer_integrated_gradients)
from circuit_discovery.models import frozen  # noqa: E402
from circuit_discovery.facts import build_pairs, filter_known, group_by_length, load_builtin  # noqa: E402
from circuit_discovery.io import atomic_write_json  # noqa: E402
from circuit_discovery.metrics import logit_diff  # noqa: E402


def pick_pairs(model, relation: str, n: int):
    """Known facts of ``relation`` -> subject-swap pairs of the most common length (no padding), at most n."""
    ds = load_builtin(relation)
    known, _ = filter_known(model, ds, k=1, progress=False)
    pairs = [p for p in build_pairs(known, model.tokenizer, seed=0)
             if p.corruption == "subject_swap" and p.first_token_differs]
    groups = group_by_length(pairs)
    length = max(groups, key=lambda k: len(groups[k]))
    return groups[length][:n]


def captum_ig(model, inputs: PairInputs, layer: int, n_steps: int, method: str, ibs: int):
    from captum.attr import LayerIntegratedGradients

    hf = model.hf_model
    ans = inputs.clean.answer_first
    cf = inputs.clean.cf_first

    def forward(ids, a, c):
        logits = hf(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
        r = torch.arange(ids.shape[0])
        return logits[r, a] - logits[r, c]

    lig = LayerIntegratedGradients(forward, model._layers[layer])
    with frozen(model):
        return lig.attribute(inputs=inputs.clean.tokens, baselines=inputs.corrupted.tokens,
                             additional_forward_args=(ans, cf), n_steps=n_steps, method=method,
                             internal_batch_size=ibs, attribute_to_layer_input=True)


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def sweep_chunk_sizes(n_layers: int, lengths: list[int], n_components: int, batch_size: int) -> list[int]:
    """Sizes of the batched forwards of an exact (layer, position) sweep (rows grouped by start layer)."""
    rows_per_layer = n_components * sum(lengths)
    sizes = []
    for _ in range(n_layers):
        full, rest = divmod(rows_per_layer, batch_size)
        sizes += [batch_size] * full + ([rest] if rest else [])
    return sizes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer facts and steps (< 3 minutes on 2 cores)")
    ap.add_argument("--relation", default="entity_location")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--causal-tracing", metavar="PNG", help="instead: causal tracing over known built-in facts, "
                    "figure to PNG, summary to --out")
    ap.add_argument("--n-facts", type=int, default=24, help="facts for --causal-tracing")
    ap.add_argument("--n-samples", type=int, default=3, help="noise samples for --causal-tracing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.causal_tracing:
        return run_causal_tracing(args)
    n_facts, n_steps, batch_size = (4, 32, 64) if args.quick else (8, 64, 64)
    method = "gausslegendre"
    t0 = time.perf_counter()
    model = load_model(device="cpu")
    pairs = pick_pairs(model, args.relation, n_facts)
    inputs = PairInputs.from_pairs(model, pairs)
    L = model.cfg.n_layers // 2
    ibs = 64
    res: dict = {"model": model.cfg.model_name, "relation": args.relation, "n_facts": len(pairs),
                 "n_tokens": len(pairs[0].clean_tokens), "quick": args.quick, "threads": args.threads,
                 "prompts": [p.clean_prompt for p in pairs]}
    print(f"{len(pairs)} pairs of {res['n_tokens']} tokens: {[p.clean_prompt for p in pairs]}", flush=True)

    # 1. IG vs Captum LayerIntegratedGradients at blocks.{L}.hook_resid_pre
    layer_integrated_gradients(model, inputs, f"blocks.{L}.hook_resid_pre", n_steps=2, method=method)  # warm-up
    (ours, delta), t_ours = timed(layer_integrated_gradients, model, inputs, f"blocks.{L}.hook_resid_pre",
                                  n_steps=n_steps, method=method, internal_batch_size=ibs,
                                  return_convergence_delta=True)
    theirs, t_captum = timed(captum_ig, model, inputs, L, n_steps, method, ibs)
    theirs = theirs.double()
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    metric_diff = ours.sum((1, 2)).cpu() - delta  # m(clean) - m(corrupted)
    res["ig_vs_captum"] = {"speedup": t_captum / t_ours, "max_rel_err": err, "t_ours_s": t_ours,
                           "t_captum_s": t_captum, "n_steps": n_steps, "method": method, "layer": L,
                           "internal_batch_size": ibs,
                           "completeness_rel_err": float((delta.abs() / metric_diff.abs()).max())}
    print("ig_vs_captum", res["ig_vs_captum"], flush=True)

    # 2. attribution patching vs exact patching, and 3. patching overhead
    comps = ("resid_pre", "attn_out", "mlp_out")
    attribution_patching(model, inputs, comps)  # warm-up; best of 3 (a shared machine is noisy)
    t_ap = float("inf")
    for _ in range(3):
        ap_scores, t = timed(attribution_patching, model, inputs, comps)
        t_ap = min(t_ap, t)
    exact, t_exact = timed(activation_patching, model, inputs, comps, batch_size=batch_size)
    from scipy.stats import spearmanr

    a, e = ap_scores.values.flatten(), exact.values.flatten()
    ok = ~(torch.isnan(a) | torch.isnan(e))
    per_comp, disagree = {}, {}
    big_cut = 0.1 * float(exact.values.abs().max())
    for c in comps:
        cols = [j for j, n in enumerate(exact.nodes) if n.component == c]
        aa, ee = ap_scores.values[:, cols], exact.values[:, cols]
        per_comp[c] = float(spearmanr(aa.flatten().numpy(), ee.flatten().numpy()).statistic)
        big = ee.abs() > big_cut  # where the rank disagreement comes from: large effects or the near-zero rest
        worst = (aa - ee).abs().mean(0).argsort(descending=True)[:5].tolist()
        disagree[c] = {
            "n_large": int(big.sum()),
            "spearman_large": float(spearmanr(aa[big].numpy(), ee[big].numpy()).statistic) if big.sum() > 3 else None,
            "spearman_rest": float(spearmanr(aa[~big].numpy(), ee[~big].numpy()).statistic),
            "worst_nodes": [{"node": f"{c} L{exact.nodes[cols[t]].layer} pos {exact.nodes[cols[t]].position}",
                             "exact_mean": float(ee[:, t].mean()), "ap_mean": float(aa[:, t].mean())}
                            for t in worst]}
    res["attribution_patching_vs_exact"] = {
        "speedup": t_exact / t_ap, "spearman": float(spearmanr(a[ok].numpy(), e[ok].numpy()).statistic),
        "spearman_by_component": per_comp, "disagreement": disagree, "large_effect_cut": big_cut,
        "t_attribution_patching_s": t_ap, "t_exact_s": t_exact,
        "n_nodes": len(exact.nodes), "n_patched_runs": int(ok.sum())}
    print("attribution_patching_vs_exact", res["attribution_patching_vs_exact"], flush=True)

    sizes = sweep_chunk_sizes(model.cfg.n_layers, inputs.lengths, len(comps), batch_size)
    toks, mask = inputs.clean.tokens, inputs.clean.mask
    plain = 0.0
    with torch.no_grad():
        for size, count in Counter(sizes).items():
            idx = torch.arange(size) % len(inputs)
            reps = count if not args.quick else min(count, 3)
            t = time.perf_counter()
            for _ in range(reps):
                logit_diff(model, model.final_hidden(toks[idx], mask[idx]), _sel(inputs.clean, idx))
            plain += (time.perf_counter() - t) / reps * count
    res["patching_overhead"] = t_exact / plain - 1
    res["patching_overhead_detail"] = {"t_sweep_s": t_exact, "t_plain_forwards_s": plain, "n_forwards": len(sizes),
                                       "batch_size": batch_size,
                                       "plain_forwards_extrapolated": bool(args.quick)}
    print("patching_overhead", res["patching_overhead"], res["patching_overhead_detail"], flush=True)
    res["wall_s"] = time.perf_counter() - t0
    atomic_write_json(args.out, res)
    print(json.dumps({k: res[k] for k in ("ig_vs_captum", "attribution_patching_vs_exact", "patching_overhead")},
                     indent=1))
    return res


def run_causal_tracing(args) -> dict:
    """ROME causal tracing over known facts, round-robin over the built-in relations."""
    from circuit_discovery.attribution import causal_tracing

    t0 = time.perf_counter()
    model = load_model(device="cpu")
    ds = load_builtin()
    known, _ = filter_known(model, ds, k=1, progress=False)
    per_rel = {r: [p for p in build_pairs(known.select(r), model.tokenizer, seed=0)
                   if p.subject_span[1] < len(p.clean_tokens) - 1] for r in known}
    pairs, i = [], 0
    while len(pairs) < args.n_facts and any(i < len(v) for v in per_rel.values()):
        pairs += [v[i] for v in per_rel.values() if i < len(v)]
        i += 1
    pairs = pairs[:args.n_facts]
    print(f"tracing {len(pairs)} facts", flush=True)
    trace = causal_tracing(model, pairs, n_samples=args.n_samples, seed=0)
    trace.figure(args.causal_tracing)
    trace.scores.save(Path(args.out).with_suffix("") )
    summ = trace.summary()
    summ["facts"] = [{"prompt": p.clean_prompt, "answer": p.answer} for p in pairs]
    summ["p_clean_per_fact"] = trace.p_clean.tolist()
    summ["p_corrupted_per_fact"] = trace.p_corrupted.tolist()
    summ["wall_s"] = time.perf_counter() - t0
    atomic_write_json(args.out, summ)
    for kind in ("states", "mlp", "attn"):
        print(kind, summ[kind]["peak"])
    return summ


def _sel(batch, idx):
    from circuit_discovery.attribution.inputs import select

    return select(batch, idx)


if __name__ == "__main__":
    main()
