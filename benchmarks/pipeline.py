"""Wall time per stage and peak memory of the whole pipeline on the built-in model and facts.

    python benchmarks/pipeline.py [--quick] --out FILE.json [--run-dir DIR] [--relations A,B] [--threads N]

Writes ``{"quick": ..., "total_s": ..., "stages_s": {...}, "peak_rss_gb": ..., "stages_peak_rss_gb": {...},
"n_circuits": ...}``; the run's own folder (report, circuits) goes to ``--run-dir`` (default: a temporary folder).
``stages_peak_rss_gb``: the process's peak resident memory during each stage that ran (Linux: the peak is reset
before the stage through ``/proc/self/clear_refs`` and read from ``VmHWM`` after it; a resumed stage reads its saved
result only), and ``"before_<stage>"``: the peak between the previous stage and this one (the model load is
there). ``peak_rss_gb`` is the largest of them (``getrusage``'s ``ru_maxrss`` where ``/proc`` is missing).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

from circuit_discovery.io import atomic_write_json
from circuit_discovery.pipeline import RunConfig, run_pipeline


def _hwm_gb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak resident memory to the current one
        return True
    except OSError:
        return False


def track_stage_peaks(peaks: dict) -> None:
    """Record each stage's peak resident memory into ``peaks`` (see the module docstring)."""
    from circuit_discovery.pipeline import run as run_mod

    orig = run_mod.Run._stage

    def stage(self, name, fn):
        before = _hwm_gb()
        if before is not None:
            peaks[f"before_{name}"] = round(before, 3)
        if not _reset_hwm():
            return orig(self, name, fn)
        out = orig(self, name, fn)
        peaks[name] = round(_hwm_gb() or 0.0, 3)
        _reset_hwm()
        return out

    run_mod.Run._stage = stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--relations", default=None, help="comma-separated relations (default: all built-in)")
    ap.add_argument("--profile", default=None, help="also write a cProfile of the run to this file")
    ap.add_argument("--cache-dir", default=None, help="the run's cache_dir (default: the package cache)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse finished stages in --run-dir (their saved times count)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="frc_bench_")
    t0 = time.time()
    rels = args.relations.split(",") if args.relations else None
    cfg = RunConfig(model=args.model, quick=args.quick, out=run_dir, progress=False, relations=rels,
                    resume=args.resume, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    peaks: dict[str, float] = {}
    track_stage_peaks(peaks)
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        res = prof.runcall(run_pipeline, cfg)
        prof.dump_stats(args.profile)
    else:
        res = run_pipeline(cfg)
    total = time.time() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    out = {"quick": args.quick, "resumed": args.resume, "relations": rels, "threads": args.threads,
           "model": args.model or "gemma-3-270m", "total_s": round(total, 1),
           "stages_s": res.timings,
           "peak_rss_gb": round(max(peaks.values()) if peaks else peak_kb / 2**20, 2),
           "stages_peak_rss_gb": peaks, "n_circuits": len(res.circuits),
           "run_dir": str(res.out_dir)}
    atomic_write_json(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
