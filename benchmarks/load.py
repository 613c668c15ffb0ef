"""Warm load of the built-in model in a fresh process: ``load_model()`` against the baseline path, in the same run.

``python benchmarks/load.py --out results/load.json [--runs 5] [--model gemma-3-270m]``

Each run starts a new Python process (``OMP_NUM_THREADS=1``) that imports ``circuit_discovery`` and then loads the
model from the warm cache. The runs alternate between:

* ``fast``: ``load_model(name, device="cpu")`` as it is (the size check and the stamp check of the cache, the
  weights memory-mapped, the tokenizer parsed by the Rust ``tokenizers``; :mod:`circuit_discovery.models.fastload`);
* ``baseline``: the loading path this replaced, run on the same cache folder: ``AutoTokenizer.from_pretrained`` and
  ``AutoModelForCausalLM.from_pretrained`` (the size check of the cache, as before, costs a few ``stat`` calls and
  is left out), then the same ``HookedModel``.

Per variant: the median (and every value) of ``load_s`` (the ``load_model`` call, or the baseline's equivalent),
``import_s`` (``import circuit_discovery``, which imports torch) and ``process_s`` (process start to loaded model,
measured by the parent), and the CPU time (user + system) of the load and of the import, ``load_cpu_s`` and
``import_cpu_s`` (all threads: the fast path parses the tokenizer in a second thread while the main thread imports
the model code, so on an idle 2-core machine its wall time is below its CPU time; the baseline is single-threaded,
its idle wall time is its CPU time). On a loaded machine the wall time also counts the waits for a core: there
``goal_met_cpu`` (CPU time <= 5 s) is a bound the idle wall time stays under. ``speedup`` = baseline median / fast
median of ``load_s`` (``speedup_cpu``: of ``load_cpu_s``). Both variants must give the same logits for a fixed
prompt (``identical``: SHA-256 of the float32 logits bytes). The machine's load average before and after is
recorded: timings taken on a shared machine are noisy, which the medians only partly absorb.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch
import circuit_discovery
from circuit_discovery.models import loading
t1, c1 = time.perf_counter(), time.process_time()
name, variant = sys.argv[1], sys.argv[2]
if variant == "fast":
    model = loading.load_model(name, device="cpu")
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from circuit_discovery.models.arch import arch_for
    from circuit_discovery.models.hooked import HookedModel
    folder = loading.cache_root() / "models" / name
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = HookedModel(hf, tok, arch_for(hf.config.model_type), model_name=name)
t2, c2 = time.perf_counter(), time.process_time()
with torch.no_grad():
    logits = model(model.to_tokens("The Eiffel Tower is located in the city of")).float().contiguous()
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "import_cpu_s": c1 - c0, "load_cpu_s": c2 - c1,
                              "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}))
"""


def _run(name: str, variant: str) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, name, variant], env=env, capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - t
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["process_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    _run(args.model, "fast")  # builds the cache if absent and records the verified stamps: not timed
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"fast": [], "baseline": []}
    for i in range(args.runs):
        for variant in (("fast", "baseline") if i % 2 == 0 else ("baseline", "fast")):
            runs[variant].append(_run(args.model, variant))
            print(variant, {k: round(v, 2) for k, v in runs[variant][-1].items() if k.endswith("_s")}, flush=True)
    load_after = os.getloadavg()
    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {key: {"median": round(statistics.median(r[key] for r in rs), 3),
                                  "values": [round(r[key], 3) for r in rs]}
                            for key in ("load_s", "import_s", "process_s", "load_cpu_s", "import_cpu_s")}
    hashes = {r["logits_sha256"] for rs in runs.values() for r in rs}
    res = {"model": args.model, "runs": args.runs, "threads": 1, "cpu_count": os.cpu_count(),
           "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
           "fast": summary["fast"], "baseline": summary["baseline"],
           "speedup": round(summary["baseline"]["load_s"]["median"] / summary["fast"]["load_s"]["median"], 2),
           "speedup_cpu": round(summary["baseline"]["load_cpu_s"]["median"] / summary["fast"]["load_cpu_s"]["median"],
                                2),
           "goal_load_s": 5.0, "goal_met_wall": summary["fast"]["load_s"]["median"] <= 5.0,
           "goal_met_cpu": summary["fast"]["load_cpu_s"]["median"] <= 5.0,
           "identical": len(hashes) == 1}
    from circuit_discovery.io import atomic_write_json

    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
