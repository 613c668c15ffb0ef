"""Benchmark SAE training on the built-in model: quality per layer and throughput.

    python benchmarks/sae.py --quick --out sae_bench.json     # middle layer, default budget (< 5 min, 2 cores)
    python benchmarks/sae.py --out sae_bench.json             # every layer, trained together from one pass
    python benchmarks/sae.py --quick --training-tokens 50000 200000 --out t.json   # quality vs budget table
    python benchmarks/sae.py --kinds jumprelu_transcoder jumprelu_skip_transcoder clt --layers 0 4 8 12 16 \
        --out tc.json                                           # transcoder kinds at the same budget, per layer
    python benchmarks/sae.py --store --out store.json         # activations in memory vs on disk: peak memory, tok/s

With ``--store`` the benchmark trains the run's transcoders (``--kind``, default the run's
``jumprelu_skip_transcoder``, every layer or ``--layers``) twice, each in a fresh process with an empty SAE cache:
with the harvested activations in memory and streamed from an activation store on disk
(``train_saes_on_model(activations=...)``, the path a run takes by default). The harvest is the run's
(``--harvest-tokens``, default 100,000: the default ``sae_training_tokens``; the corpus gives what it has), the
training budget ``--training-tokens`` (default 20,480, to keep it short: the memory peak does not depend on it, the
throughput barely). Writes ``{"paths": {"memory": {...}, "disk": {...}}, "identical", "peak_ratio",
"train_sae_tokens_per_s_ratio", "settings"}``: per path the process's peak resident memory (``peak_rss_gb``, from
``getrusage``), the resident memory once the model is loaded (``rss_model_gb``), harvest and training seconds,
``train_sae_tokens_per_s`` (training tokens x transcoders / training seconds) and a SHA-256 of every trained
weight; ``identical`` is true when the two hashes agree.

With ``--kinds`` the benchmark trains transcoders (``blocks.{l}.mlp.hook_in -> blocks.{l}.hook_mlp_out``) of each
kind (``sae.dictionaries.SAE_KINDS``) from one harvest and writes ``{"kinds": {kind: {"layers": {...},
"train_seconds", ...}}}``; ``clt`` trains one cross-layer transcoder over all the model's layers (``--clt-d-sae``
latents per layer) and reports each target layer (only those in ``--layers``), its CE score with that layer's MLP
output replaced by the CLT's reconstruction from the clean inputs.

Writes ``{"layers": {"<hook>": {"l0", "explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction",
...}}, "harvest_tokens_per_s", "train_tokens_per_s", "settings": {...}}`` (with several ``--training-tokens``
also ``"budgets": [{"training_tokens", "layers", ...}, ...]``; ``"layers"`` is then the last budget).
Metrics are on held-out documents of the built-in corpus (see ``docs/sae.md``), never the training tokens.
``harvest_tokens_per_s``: model forward up to the deepest hook; ``train_tokens_per_s``: tokens per second
through all SAEs trained together (``train_sae_tokens_per_s`` multiplies by the number of SAEs).
On a CPU shared with other jobs ``--threads 1`` is often several times faster than the default.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from circuit_discovery.io import atomic_write_json  # noqa: E402
from circuit_discovery.sae import (  # noqa: E402
    SAETrainConfig,
    build_corpus,
    evaluate_sae,
    harvest_activations,
    split_heldout,
    train_saes,
)
from circuit_discovery.sae.evaluate import plot_layer_metrics  # noqa: E402

BAR = {"explained_variance": (">=", 0.80), "ce_loss_score": (">=", 0.85), "dead_fraction": ("<=", 0.10),
       "l0": ("<=", 64)}


def meets_bar(m: dict) -> bool:
    return all(m[k] >= v if op == ">=" else m[k] <= v for k, (op, v) in BAR.items())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one middle layer (< 5 min on 2 cores once the corpus is cached)")
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--plot", default=None, help="also plot the metrics per layer to this PNG")
    ap.add_argument("--model", default=None, help="model name for load_model (default: built-in Gemma 3 270M)")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="default: all (middle one with --quick)")
    ap.add_argument("--hook", default="hook_resid_post", help="hook within each block")
    ap.add_argument("--architecture", default=None, help="default: SAETrainConfig's (topk)")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--l1-coefficient", type=float, default=None)
    ap.add_argument("--training-tokens", type=int, nargs="*", default=None,
                    help="one or more budgets (default: SAETrainConfig's)")
    ap.add_argument("--n-sequences", type=int, default=None, help="model-sampled corpus sequences (default: built-in)")
    ap.add_argument("--text-files", nargs="*", default=[], help="extra UTF-8 text files for the corpus")
    ap.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens for the reconstruction and CE "
                    "metrics")
    ap.add_argument("--sparsity-tokens", type=int, default=16384, help="held-out tokens (as many as there are, up "
                    "to this) for l0 and dead_fraction; these need no unembedding")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: the package cache)")
    ap.add_argument("--kinds", nargs="*", default=None, help="transcoder kinds to compare (SAE_KINDS)")
    ap.add_argument("--clt-d-sae", type=int, default=None, help="CLT latents per layer (default: CLT_D_SAE)")
    ap.add_argument("--clt-training-tokens", type=int, default=None, help="CLT budget (default: --training-tokens)")
    ap.add_argument("--store", action="store_true", help="compare activations in memory and on disk")
    ap.add_argument("--kind", default="jumprelu_skip_transcoder", help="--store: the transcoder kind")
    ap.add_argument("--harvest-tokens", type=int, default=100_000, help="--store: harvested rows (the run's budget)")
    ap.add_argument("--store-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.store_child:
        return store_child(args)
    if args.store:
        return store_compare(args, argv if argv is not None else sys.argv[1:])
    if args.kinds:
        return transcoder_kinds(args)

    from circuit_discovery.models import load_model

    t0 = time.perf_counter()
    model = load_model(args.model) if args.model else load_model()
    t_load = time.perf_counter() - t0
    n_layers = model.cfg.n_layers
    layers = args.layers if args.layers is not None else ([n_layers // 2] if args.quick else list(range(n_layers)))
    t = time.perf_counter()
    corpus = build_corpus(model, n_sequences=args.n_sequences, cache_dir=args.cache_dir, text_files=args.text_files,
                          progress=True)
    t_corpus = time.perf_counter() - t
    train_texts, heldout = split_heldout(corpus.texts, 0.1, seed=0)

    extra = {k: v for k, v in (("architecture", args.architecture), ("k", args.k), ("lr", args.lr),
                                ("l1_coefficient", args.l1_coefficient)) if v is not None}
    hooks = [f"blocks.{l}.{args.hook}" for l in layers]
    t = time.perf_counter()
    acts = harvest_activations(model, train_texts, hooks, context_size=128, progress=True)
    t_harvest = time.perf_counter() - t
    n_unique = int(acts[hooks[0]].shape[0])
    budgets = args.training_tokens or [SAETrainConfig("x").training_tokens]
    runs = []
    for tokens in budgets:
        cfgs = [SAETrainConfig(h, training_tokens=tokens, model_name=model.cfg.model_name, context_size=128, **extra)
                for h in hooks]
        t = time.perf_counter()
        res = train_saes(acts, cfgs, progress=True)
        t_train = time.perf_counter() - t
        run = {"training_tokens": tokens, "train_seconds": t_train, "layers": {},
               "train_tokens_per_s": next(iter(res.values())).final["train_tokens_per_s"]}
        t = time.perf_counter()
        for cfg in cfgs:
            r = res[cfg.key]
            m = evaluate_sae(model, r.sae, cfg.hook_name, heldout, n_tokens=args.eval_tokens, context_size=128,
                             sparsity_tokens=args.sparsity_tokens)
            m["train_explained_variance"] = r.final.get("explained_variance")
            m["meets_bar"] = meets_bar(m)
            run["layers"][cfg.hook_name] = m
            print(tokens, cfg.hook_name, {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()
                                          if k in ("l0", "explained_variance", "ce_loss_score", "dead_fraction",
                                                   "meets_bar")}, flush=True)
        run["eval_seconds"] = time.perf_counter() - t
        runs.append(run)

    cfg0 = SAETrainConfig(hooks[0], **extra)
    last = runs[-1]
    out = {
        "layers": last["layers"],
        "harvest_tokens_per_s": n_unique / t_harvest,
        "train_tokens_per_s": last["train_tokens_per_s"],
        "train_sae_tokens_per_s": last["train_tokens_per_s"] * len(hooks),
        "model": model.cfg.model_name,
        "settings": {
            "layers": layers, "hook": args.hook, "architecture": cfg0.architecture,
            "k": cfg0.k if cfg0.architecture == "topk" else None, "lr": cfg0.lr,
            "l1_coefficient": cfg0.l1_coefficient if cfg0.architecture == "standard" else None,
            "d_sae": cfg0.expansion_factor * model.cfg.d_model, "train_batch_size_tokens": cfg0.train_batch_size_tokens,
            "training_tokens": last["training_tokens"], "unique_train_tokens": n_unique,
            "corpus_tokens": corpus.n_tokens, "corpus_sources": corpus.sources, "corpus_id": corpus.corpus_id,
            "eval_tokens": args.eval_tokens, "sparsity_tokens": args.sparsity_tokens,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "seconds": {"load_model": t_load, "corpus": t_corpus, "harvest": t_harvest,
                    "train": last["train_seconds"], "eval": last["eval_seconds"],
                    "total": time.perf_counter() - t0},
    }
    if len(runs) > 1:
        out["budgets"] = runs
    atomic_write_json(args.out, out)
    if args.plot:
        plot_layer_metrics(out["layers"], args.plot, title=f"{model.cfg.model_name} SAEs ({cfg0.architecture})")
    print(f"harvest {out['harvest_tokens_per_s']:.0f} tok/s, train {out['train_tokens_per_s']:.0f} tok/s "
          f"({len(hooks)} SAEs), total {out['seconds']['total']:.0f} s -> {args.out}", flush=True)
    return out


def _rss_gb() -> float:
    """This process's resident memory now (Linux ``/proc``), in GiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def store_child(args) -> dict:
    """One path of ``--store`` in this (fresh) process: train the run's transcoders, report memory and speed."""
    import hashlib
    import resource
    import tempfile

    from circuit_discovery.models import load_model
    from circuit_discovery.sae.dictionaries import kind_settings, transcoder_configs
    from circuit_discovery.sae.training import train_saes_on_model

    t0 = time.perf_counter()
    model = load_model(args.model) if args.model else load_model()
    rss_model = _rss_gb()
    corpus = build_corpus(model, n_sequences=args.n_sequences, cache_dir=args.cache_dir, text_files=args.text_files,
                          progress=False)
    train_texts, _ = split_heldout(corpus.texts, 0.1, seed=0)
    tokens = (args.training_tokens or [20_480])[-1]
    cfgs = transcoder_configs(model.cfg.n_layers, args.layers, training_tokens=tokens, k=args.k or 64,
                              **kind_settings(args.kind))
    with tempfile.TemporaryDirectory(prefix="frc_store_bench_") as tmp:
        t = time.perf_counter()
        res = train_saes_on_model(model, train_texts, cfgs, corpus_id=corpus.corpus_id, cache_dir=Path(tmp) / "saes",
                                  harvest_tokens=args.harvest_tokens, progress=False, activations=args.store_child)
        t_all = time.perf_counter() - t
        left = sorted(str(p.relative_to(tmp)) for p in Path(tmp).glob("saes/activations/*"))
    digest = hashlib.sha256()
    for c in cfgs:
        for name, v in sorted(res[c.key].sae.state_dict().items()):
            digest.update(name.encode() + v.detach().float().contiguous().numpy().tobytes())
    final = next(iter(res.values())).final
    harvested = int(final["harvested_tokens"])
    harvest_s = harvested / final["harvest_tokens_per_s"]
    out = {"activations": args.store_child, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "rss_model_gb": rss_model, "harvested_tokens": harvested, "harvest_seconds": harvest_s,
           "train_seconds": t_all - harvest_s, "train_tokens_per_s": final["train_tokens_per_s"],
           "n_transcoders": len(cfgs), "weights_sha256": digest.hexdigest(), "store_left_behind": left,
           "seconds": time.perf_counter() - t0}
    atomic_write_json(args.out, out)
    return out


def store_summary(paths: dict[str, dict], settings: dict) -> dict:
    """The ``--store`` result from the two children's reports: per path ``train_sae_tokens_per_s`` (training tokens x
    transcoders / training seconds: the disk path trains in groups, so a group's own token rate is not comparable),
    and the ratios disk / memory."""
    for p in paths.values():
        p["train_sae_tokens_per_s"] = settings["training_tokens"] * p["n_transcoders"] / p["train_seconds"]
    m, d = paths["memory"], paths["disk"]
    return {"paths": paths, "identical": m["weights_sha256"] == d["weights_sha256"],
            "peak_ratio": d["peak_rss_gb"] / m["peak_rss_gb"],
            "train_sae_tokens_per_s_ratio": d["train_sae_tokens_per_s"] / m["train_sae_tokens_per_s"],
            "settings": settings}


def store_compare(args, argv: list[str]) -> dict:
    """``--store``: each path in its own process (peak memory is per process); see the module docstring."""
    import json
    import subprocess
    import tempfile

    paths: dict[str, dict] = {}
    rest = [a for a in argv if a != "--store"]
    i = rest.index("--out")
    rest = rest[:i] + rest[i + 2:]
    with tempfile.TemporaryDirectory(prefix="frc_store_cmp_") as tmp:
        for where in ("memory", "disk"):
            child = Path(tmp) / f"{where}.json"
            subprocess.run([sys.executable, __file__, *rest, "--store-child", where, "--out", str(child)], check=True)
            paths[where] = json.loads(child.read_text())
            print(where, {k: v for k, v in paths[where].items() if k != "weights_sha256"}, flush=True)
    out = store_summary(paths, {"kind": args.kind, "layers": args.layers or "all",
                                "harvest_tokens": args.harvest_tokens,
                                "training_tokens": (args.training_tokens or [20_480])[-1],
                                "threads": torch.get_num_threads(), "load_average_end": os.getloadavg()})
    atomic_write_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k != "paths"}, indent=1))
    return out


def transcoder_kinds(args) -> dict:
    """``--kinds``: per-layer transcoders of each kind (and a CLT) at the same budget, evaluated per layer."""
    from circuit_discovery.models import load_model
    from circuit_discovery.sae.dictionaries import SAE_KINDS, kind_settings

    bad = [k for k in args.kinds if k not in SAE_KINDS]
    if bad:
        raise SystemExit(f"unknown kinds {bad}; use {SAE_KINDS}")
    t0 = time.perf_counter()
    model = load_model(args.model) if args.model else load_model()
    n_layers = model.cfg.n_layers
    layers = args.layers if args.layers is not None else ([n_layers // 2] if args.quick else list(range(n_layers)))
    corpus = build_corpus(model, n_sequences=args.n_sequences, cache_dir=args.cache_dir, text_files=args.text_files,
                          progress=True)
    train_texts, heldout = split_heldout(corpus.texts, 0.1, seed=0)
    hook_layers = list(range(n_layers)) if "clt" in args.kinds else layers
    hooks = [h for l in hook_layers for h in (f"blocks.{l}.mlp.hook_in", f"blocks.{l}.hook_mlp_out")]
    t = time.perf_counter()
    acts = harvest_activations(model, train_texts, hooks, context_size=128, progress=True)
    t_harvest = time.perf_counter() - t
    tokens = (args.training_tokens or [SAETrainConfig("x").training_tokens])[-1]
    extra = {k: v for k, v in (("k", args.k), ("lr", args.lr)) if v is not None}
    out: dict = {"model": model.cfg.model_name, "kinds": {}, "harvest_seconds": t_harvest,
                 "settings": {"layers": layers, "training_tokens": tokens, "k": extra.get("k", 64),
                              "unique_train_tokens": int(acts[hooks[0]].shape[0]), "corpus_id": corpus.corpus_id,
                              "corpus_tokens": corpus.n_tokens, "eval_tokens": args.eval_tokens,
                              "sparsity_tokens": args.sparsity_tokens, "threads": torch.get_num_threads(),
                              "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None}}
    for kind in args.kinds:
        t = time.perf_counter()
        res: dict = {"layers": {}}
        if kind == "clt":
            from circuit_discovery.sae.clt_training import CLTTrainConfig, evaluate_clt, train_clt

            ccfg = CLTTrainConfig(n_layers=n_layers, training_tokens=args.clt_training_tokens or tokens,
                                  **({"d_sae": args.clt_d_sae} if args.clt_d_sae else {}), **extra)
            r = train_clt(acts, ccfg, progress=True)
            res["train_seconds"] = time.perf_counter() - t
            res["settings"] = ccfg.to_dict()
            t = time.perf_counter()
            for l in layers:
                m = evaluate_clt(model, r.clt, l, heldout, n_tokens=args.eval_tokens,
                                 sparsity_tokens=args.sparsity_tokens)
                m["meets_bar"] = meets_bar(m)
                res["layers"][f"blocks.{l}.hook_mlp_out"] = m
                print(kind, l, {k: round(v, 4) for k, v in m.items() if k in BAR or k == "meets_bar"}, flush=True)
        else:
            cfgs = [SAETrainConfig(f"blocks.{l}.mlp.hook_in", hook_name_out=f"blocks.{l}.hook_mlp_out",
                                   training_tokens=tokens, model_name=model.cfg.model_name, context_size=128,
                                   **kind_settings(kind), **extra) for l in layers]
            trained = train_saes(acts, cfgs, progress=True)
            res["train_seconds"] = time.perf_counter() - t
            res["settings"] = cfgs[0].to_dict()
            t = time.perf_counter()
            for cfg in cfgs:
                m = evaluate_sae(model, trained[cfg.key].sae, cfg.hook_name, heldout, n_tokens=args.eval_tokens,
                                 context_size=128, hook_name_out=cfg.hook_name_out,
                                 sparsity_tokens=args.sparsity_tokens)
                m["meets_bar"] = meets_bar(m)
                res["layers"][cfg.hook_name_out] = m
                print(kind, cfg.hook_name, {k: round(v, 4) for k, v in m.items() if k in BAR or k == "meets_bar"},
                      flush=True)
        res["eval_seconds"] = time.perf_counter() - t
        out["kinds"][kind] = res
        out["seconds"] = time.perf_counter() - t0
        out["settings"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        atomic_write_json(args.out, out)  # after each kind, so a long run leaves what it measured
    return out


if __name__ == "__main__":
    main()
