"""Per-fact cost of each stage on models with the published shapes of Gemma 2 2B and GPT-2 XL (random weights, built
in process), and the extrapolation of a default run to the real depth.

``python benchmarks/scale.py --out results/scale.json [--shapes gemma-2-2b,gpt2-xl,gemma-3-270m] [--layers 1,2,3]
[--device cpu|cuda]``

The full Gemma 2 2B does not fit beside the other jobs of a shared 24 GiB machine, so every shape is built at its
real width with ``--layers`` layers (:func:`circuit_discovery.models.synthetic.build_shaped`). On each, one process
measures, with the run's default options (``RunConfig()``):

* ``known``: the known-fact filter on 16 facts (seconds per fact);
* ``patching``: the exact ``resid_pre`` patching sweep of one subject-swap pair (every layer x position);
* ``eap``: the EAP component graph of 2 pairs (heads, one forward and backward per pair), per pair;
* ``causal``: ROME causal tracing (MLP and attention windows at the last subject token, 10 noise samples) of one
  fact;
* ``feature_graph``: one transcoder feature graph (128 feature nodes) with a random TopK transcoder per layer
  (d_sae = 4 x d_model, k = 64, as the run trains);
* ``forward``: one batched forward of the pairs' clean prompts, per prompt (the unit of the ablation-based stages:
  greedy refinement and validation).

Time: the CPU time of the computing thread (``time.thread_time``; the run uses one torch thread, so the work runs in
that thread) per fact; on a shared machine the wall time (also recorded) counts the waits for a core as well. On
CUDA: wall time after a synchronize. Peak memory: the largest resident set (CPU; sampled every 10 ms) or
``torch.cuda.max_memory_allocated`` (CUDA) during the stage, absolute and above the level before it (a weak measure
on CPU: memory freed earlier stays in the process; ``circuit_discovery.estimate`` models the memory). Depth: per stage,
cost(L) = F + k L^beta (F: what does not grow with layers, e.g. the unembedding; beta: how the stage's work grows
with layers). ``gemma-3-270m`` is measured at 1-3 and its full 18 layers, which fixes beta per stage
(``layer_exponents``); F and k of every other shape are fitted on its own few-layer points with that beta and
evaluated at its real depth (``extrapolated``). ``fit_check``: Gemma 3 270M's cost at 18 layers predicted from its
1-3 layer points alone (and by a quadratic through them) against the measurement.
``default_run`` scales the stage times of the measured default run of Gemma 3 270M
(``results/pipeline_default.json``, ``pipeline_default_cold.json``) by the ratio of per-fact costs (see
``docs/scaling.md`` for the assumptions of each stage). Timings on a shared machine are noisy; the load average is
recorded.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


class PeakRSS:
    """Largest resident set size (bytes) seen by a 10 ms sampler while the block runs."""

    def __init__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self.start = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(fn, device: str) -> dict:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        sec = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated()
        return {"seconds": sec, "wall_seconds": sec, "peak_gb": peak / 1e9, "peak_above_start_gb": (peak - base) / 1e9}
    with PeakRSS() as p:
        t, c = time.perf_counter(), time.thread_time()
        fn()
        sec, cpu = time.perf_counter() - t, time.thread_time() - c
    # CPU time of the computing thread (1 torch thread: the work runs in it): on a shared machine the wall time
    # also counts the waits for a core; the CPU time is the cost
    return {"seconds": cpu, "wall_seconds": sec, "peak_gb": p.peak / 1e9,
            "peak_above_start_gb": (p.peak - p.start) / 1e9}


def random_transcoders(model, seed: int = 0, k: int = 64, expansion: int = 4):
    """One random TopK transcoder per layer (d_sae = expansion x d_model), as ``frc train-sae`` shapes them."""
    from circuit_discovery.sae import SAEConfig, create_sae

    d = model.cfg.d_model
    return {l: create_sae(SAEConfig(d_in=d, d_sae=expansion * d, architecture="topk", k=k, transcoder=True),
                          seed=seed + l).to(model.device) for l in range(model.cfg.n_layers)}


def stage_costs(model, device: str, seed: int = 0) -> dict:
    """Seconds per fact and peak memory of each stage on ``model`` (module docstring)."""
    from circuit_discovery.attribution import activation_patching, causal_tracing, subject_embedding_std
    from circuit_discovery.attribution.component_graph import component_circuit
    from circuit_discovery.attribution.feature_graph import feature_graph
    from circuit_discovery.facts import filter_known, load_builtin
    from circuit_discovery.pipeline.attribution_stage import swap_pairs
    from circuit_discovery.pipeline.causal_stage import NOISE_SCALE
    from circuit_discovery.pipeline.causal_stage import batch_size as causal_batch
    from circuit_discovery.pipeline.config import RunConfig

    cfg = RunConfig()
    facts = list(load_builtin(["capital_city"])["capital_city"])[:16]
    pairs, _ = swap_pairs(model, facts, seed, cfg.metric)
    pairs = pairs[:2]
    if len(pairs) < 2:
        raise RuntimeError("fewer than 2 subject-swap pairs in capital_city with this tokenizer")
    noise = NOISE_SCALE * float(subject_embedding_std(model, pairs))
    tcs = random_transcoders(model, seed)
    out: dict[str, dict] = {"prompt_tokens": [len(p.clean_tokens) for p in pairs]}

    def known():
        filter_known(model, facts, k=cfg.known_k, batch_size=max(cfg.batch_size, 64), progress=False)

    def patching():
        activation_patching(model, pairs[:1], components=("resid_pre",), direction="denoising", metric=cfg.metric,
                            batch_size=cfg.batch_size, normalize=True)

    def eap():
        component_circuit(model, pairs, name="scale", metric=cfg.metric, granularity=cfg.granularity,
                          method=cfg.component_method, n_steps=cfg.ig_steps, node_threshold=cfg.node_threshold,
                          edge_threshold=cfg.edge_threshold, batch_size=cfg.batch_size)

    def causal():
        causal_tracing(model, pairs[:1], kinds=("mlp", "attn"), roles=["subject_last"], n_samples=cfg.causal_samples,
                       seed=seed, batch_size=causal_batch(cfg), noise_std=noise)

    def fgraph():
        feature_graph(model, tcs, pairs[0].clean_prompt, max_feature_nodes=cfg.feature_nodes,
                      batch_size=cfg.batch_size, auto_labels=False)

    def forward():
        with torch.no_grad():
            toks, mask = model.tokenize([p.clean_prompt for p in pairs])
            model(toks, attention_mask=mask)

    forward()  # first-call overheads (allocator, kernels) out of the timings
    for name, fn, per in (("known", known, len(facts)), ("patching", patching, 1), ("eap", eap, len(pairs)),
                          ("causal", causal, 1), ("feature_graph", fgraph, 1), ("forward", forward, len(pairs))):
        r = _measure(fn, device)
        r["seconds_per_fact"] = r.pop("seconds") / per
        r["wall_seconds_per_fact"] = r.pop("wall_seconds") / per
        out[name] = {k: round(v, 4) for k, v in r.items()}
        print(f"  {name}: {out[name]}", flush=True)
    tcs.clear()
    return out


STAGES = ("known", "patching", "eap", "causal", "feature_graph", "forward")
LINEAR = ("known", "forward")


def fit_quadratic(layers, values) -> list[float]:
    """Coefficients (a, b, c) of a + b L + c L^2 (least squares; exact through three points)."""
    L = np.asarray(layers, dtype=float)
    A = np.stack([np.ones_like(L), L, L ** 2], 1)
    return np.linalg.lstsq(A, np.asarray(values, dtype=float), rcond=None)[0].tolist()


def at(coef, L: float) -> float:
    return float(coef[0] + coef[1] * L + coef[2] * L * L)


def fit_fixed_plus_power(layers, values, beta: float | None = None) -> tuple[float, float, float]:
    """(F, k, beta) of cost(L) = F + k L^beta, F, k >= 0, least squares on relative residuals; ``beta`` searched on
    [0.5, 3] when not given."""
    L = np.asarray(layers, dtype=float)
    y = np.asarray(values, dtype=float)
    best = (np.inf, 0.0, 0.0, 1.0)
    for b in ([beta] if beta is not None else np.arange(0.5, 3.001, 0.01)):
        A = np.stack([np.ones_like(L), L ** b], 1) / y[:, None]
        coef = np.linalg.lstsq(A, np.ones_like(y), rcond=None)[0]
        if coef[0] < 0 or coef[1] < 0:  # one term alone
            cands = [(max(float(np.mean(y)), 0.0), 0.0),
                     (0.0, float(np.sum(y * L ** b) / np.sum(L ** (2 * b))))]
            coef = min(cands, key=lambda c: float(np.sum(((c[0] + c[1] * L ** b) / y - 1) ** 2)))
        err = float(np.sum(((coef[0] + coef[1] * L ** b) / y - 1) ** 2))
        if err < best[0]:
            best = (err, float(coef[0]), float(coef[1]), float(b))
    return best[1], best[2], best[3]


def extrapolate(points: dict[int, dict], real_layers: int, betas: dict[str, float]) -> dict:
    """Per stage: F + k L^beta fitted on the measured layer counts with the reference shape's beta, at
    ``real_layers``."""
    ls = sorted(points)
    out = {}
    for s in STAGES:
        F, k, b = fit_fixed_plus_power(ls, [points[l][s]["seconds_per_fact"] for l in ls], betas[s])
        out[s] = {"seconds_per_fact": F + k * real_layers ** b, "fixed_s": round(F, 5), "per_layer_k": round(k, 6),
                  "beta": round(b, 2)}
    return out


# default-run stage -> the per-fact cost it scales with, and why (docs/scaling.md)
DEFAULT_RUN_SCALING = {
    "known": "the known filter (one forward per batch of facts)",
    "attribution": "the exact resid_pre sweep (one prompt per relation)",
    "causal_tracing": "ROME tracing (2 facts per relation plus 2 full traces)",
    "circuits": "EAP graphs, then greedy refinement by exact ablation (most of the time): forward cost x component "
                "nodes",
    "validation": "held-out faithfulness, curves and 100 random circuits: forward cost x component nodes",
    "dictionaries": "harvest and TopK training: layers x d_model^2 (the larger of that and the forward ratio)",
    "feature_circuits": "2 feature graphs per relation and their validation: feature-graph cost",
    "hypotheses": "statistics on the stage results: unchanged",
    "report": "figures and JSON: unchanged",
}


def nodes(shape) -> int:
    """Component nodes per role at head granularity: heads + MLP per layer (the refinement's candidates)."""
    return shape.n_layers * (shape.n_heads + 1)


def measured_default_run() -> dict[str, float]:
    """Stage seconds of the measured default run of Gemma 3 270M (as ``estimate.REFERENCE_SECONDS``)."""
    from circuit_discovery.estimate import REFERENCE_SECONDS

    return dict(REFERENCE_SECONDS)


def default_run(ext: dict[str, dict], ref: dict[str, dict], shape, ref_shape) -> dict:
    """Stage times of the measured Gemma 3 270M default run scaled by the ratio of per-fact costs ``ext``/``ref``."""
    measured = measured_default_run()
    ratio = {s: ext[s]["seconds_per_fact"] / max(ref[s]["seconds_per_fact"], 1e-9) for s in STAGES}
    node_ratio = nodes(shape) / nodes(ref_shape)
    train_ratio = (shape.n_layers * shape.d_model ** 2) / (ref_shape.n_layers * ref_shape.d_model ** 2)
    factors = {"known": ratio["known"], "attribution": ratio["patching"], "causal_tracing": ratio["causal"],
               "circuits": ratio["forward"] * node_ratio, "validation": ratio["forward"] * node_ratio,
               "dictionaries": max(ratio["forward"], train_ratio), "feature_circuits": ratio["feature_graph"],
               "hypotheses": 1.0, "report": 1.0}
    stages = {s: {"gemma_3_270m_s": measured[s], "factor": round(f, 2), "seconds": round(measured[s] * f, 1),
                  "scales_with": DEFAULT_RUN_SCALING[s]} for s, f in factors.items()}
    total = sum(v["seconds"] for v in stages.values())
    return {"stages": stages, "total_s": round(total, 1), "total_h": round(total / 3600, 2)}


METHOD = ("real width, few layers; per stage cost(L) = F + k L^beta, beta fitted on the Gemma 3 270M shape over 1-3 "
          "and 18 layers, F and k on each shape's own few-layer points, evaluated at the real depth; CPU time of the "
          "computing thread (docs/scaling.md)")


def summarise(res: dict) -> dict:
    """Extrapolations and default-run figures from the measured points (also for ``--from-json``)."""
    from circuit_discovery.estimate import estimate
    from circuit_discovery.models.synthetic import shape_of

    ref_name = "gemma-3-270m"
    ref_entry = res["shapes"].get(ref_name)
    if ref_entry is None:
        return res
    ref_entry.pop("extrapolated", None)  # measured at its real depth
    res["method"] = METHOD
    pts = {int(k): v for k, v in ref_entry["points"].items()}
    full = shape_of(ref_name).n_layers
    small = [l for l in sorted(pts) if l != full]
    if full not in pts or not small:
        return res
    # a forward pass (and the known filter: one forward per batch) is linear in the layers by construction; the
    # other stages' growth is measured
    fits = {s: fit_fixed_plus_power(sorted(pts), [pts[l][s]["seconds_per_fact"] for l in sorted(pts)],
                                    1.0 if s in LINEAR else None) for s in STAGES}
    betas = {s: f[2] for s, f in fits.items()}
    res["layer_exponents"] = {s: round(b, 2) for s, b in betas.items()}
    # the check: the reference shape's cost at 18 layers from its few-layer points only (beta from all points)
    few = extrapolate({l: pts[l] for l in small}, full, betas)
    ref_entry["fit_check"] = {s: {"measured_18_layers": pts[full][s]["seconds_per_fact"],
                                  "from_few_layers": round(few[s]["seconds_per_fact"], 4),
                                  "quadratic_from_few_layers": round(at(fit_quadratic(
                                      small, [pts[l][s]["seconds_per_fact"] for l in small]), full), 4)}
                              for s in STAGES}
    ref = {s: pts[full][s] for s in STAGES}
    for name, entry in res["shapes"].items():
        if name == ref_name:
            continue
        shape = shape_of(name)
        p = {int(k): v for k, v in entry["points"].items()}
        entry["extrapolated"] = extrapolate(p, shape.n_layers, betas)
        entry["default_run"] = default_run(entry["extrapolated"], ref, shape, shape_of(ref_name))
        est = estimate(name)
        entry["default_run"]["memory"] = {
            "weights_float32_gb": round(shape.params() * 4 / 1e9, 2),
            "weights_bf16_gb": round(shape.params() * 2 / 1e9, 2),
            "estimate_peak_gb_by_stage": {s: v["peak_gb"] for s, v in est["stages"].items()},
            "measured_peak_rss_gb_at_largest_build": max(v["peak_gb"] for k, v in p[max(p)].items()
                                                         if isinstance(v, dict) and "peak_gb" in v)}
        entry["default_run"]["estimate_total_h"] = est["total_hours"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="gemma-3-270m,gemma-2-2b,gpt2-xl")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-full-check", action="store_true", help="skip gemma-3-270m at its full 18 layers")
    ap.add_argument("--from-json", help="recompute the summary from the points of an earlier run's JSON")
    args = ap.parse_args()
    from circuit_discovery.io import atomic_write_json, read_json

    if args.from_json:
        res = read_json(args.from_json)
        res.pop("partial", None)
        atomic_write_json(args.out, summarise(res))
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # large tensors mmapped, so a freed one leaves the RSS
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    from circuit_discovery.models.synthetic import build_shaped, shape_of

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    layers = [int(x) for x in args.layers.split(",")]
    res: dict = {"device": args.device, "threads": torch.get_num_threads(), "layers_measured": layers,
                 "loadavg_before": list(os.getloadavg()),
                 "method": METHOD, "shapes": {}}
    for name in args.shapes.split(","):
        shape = shape_of(name)
        entry: dict = {"real_layers": shape.n_layers, "params_real": shape.params(), "points": {}}
        todo = list(layers) + ([shape.n_layers] if name == "gemma-3-270m" and not args.no_full_check else [])
        for L in todo:
            print(f"{name} with {L} layers", flush=True)
            t = time.perf_counter()
            model = build_shaped(name, L, device=args.device)
            entry["tokenizer"] = model.cfg.extra["synthetic"]["tokenizer"]
            pt = stage_costs(model, args.device)
            pt["build_s"] = round(time.perf_counter() - t, 1)
            pt["params"] = model.cfg.extra["synthetic"]["params"]
            entry["points"][L] = pt
            del model
            gc.collect()
            atomic_write_json(args.out, res | {"partial": True, "shapes": {**res["shapes"], name: entry}})
        res["shapes"][name] = entry
    res["loadavg_after"] = list(os.getloadavg())
    res = summarise(res)
    atomic_write_json(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "shapes"}, indent=1))


if __name__ == "__main__":
    main()
