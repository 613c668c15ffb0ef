"""N processes x 1 thread (``torchrun``) against 1 process x N threads, on the same run on this machine.

    python benchmarks/distributed.py --out F.json [--processes N] [--config TOML] [--repeats R] [--keep DIR]

Default run (no ``--config``): tiny-gemma3, quick profile (4 relations, 4 discovery and 3 held-out facts each),
every fact counted as known (``known_k`` 10^6). A warm-up run (1 process x 1 thread, untimed) fills the model and
transcoder caches first; then each repeat times, in alternating order, ``python main.py`` with
``OMP_NUM_THREADS=N`` and ``torchrun --standalone --nproc-per-node N main.py`` with ``OMP_NUM_THREADS=1``, both from
process start to exit (imports and model loads included: what a user waits for).

Writes ``{"processes": [1, N], "threads_per_process": [N, 1], "wall_s": [t_1, t_N], "overhead": t_N / t_1 - 1,
"identical": ..., "identical_to_one_thread": ..., "load": ...}``: ``identical`` compares the N-process run's
``circuits.json``, ``metrics.json`` (without ``dictionaries.trained_layers``: trained here or read from the cache)
and ``hypotheses.csv`` with the 1 process x N threads run, ``identical_to_one_thread`` with the 1 x 1 warm-up run
(the same thread count as each rank); where a comparison fails, ``max_abs_diff`` gives the largest difference of
any number in those files. ``load``: the 1-minute load average before each timed run (other work on the machine
slows both configurations, not necessarily equally).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from circuit_discovery.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
DEFAULT_TOML = ('[run]\nmodel = "tiny-gemma3"\nquick = true\nquick_facts = 4\nquick_held_out = 3\n'
                'known_k = 1000000\nprogress = false\n')
OUTPUTS = ("circuits.json", "metrics.json", "hypotheses.csv")


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _timed(cmd: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return wall


def _numbers(x, path=""):
    """(path, number) of every number in a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)


def _csv_numbers(text: str) -> dict[str, float]:
    out = {}
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        for j, cell in enumerate(row):
            try:
                out[f"row {i} column {j}"] = float(cell)
            except ValueError:
                continue
    return out


def _load(folder: Path) -> dict:
    out = {}
    for f in OUTPUTS:
        text = (folder / f).read_text()
        if f == "metrics.json":
            m = json.loads(text)
            m.get("dictionaries", {}).pop("trained_layers", None)
            text = json.dumps(m, sort_keys=True)
        out[f] = text
    return out


def compare(a: Path, b: Path) -> dict:
    """Whether the outputs of two run folders are identical, else the largest absolute difference of a number
    (JSON files; ``hypotheses.csv`` cell by cell) and where."""
    la, lb = _load(a), _load(b)
    if la == lb:
        return {"identical": True}
    worst, where = 0.0, None
    for f in OUTPUTS:
        if la[f] == lb[f]:
            continue
        if f.endswith(".json"):
            na, nb = dict(_numbers(json.loads(la[f]))), dict(_numbers(json.loads(lb[f])))
        else:
            na, nb = (_csv_numbers(t) for t in (la[f], lb[f]))
        for k in set(na) & set(nb):
            d = abs(na[k] - nb[k])
            if not math.isnan(d) and d > worst:
                worst, where = d, f"{f}:{k}"
        if set(na) != set(nb):
            where = where or f"{f}: different fields"
    return {"identical": False, "max_abs_diff": worst, "max_abs_diff_at": where}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="N (default: the CPU count)")
    ap.add_argument("--config", default=None, help="TOML of the run (default: the tiny-gemma3 quick run above)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args()
    n = args.processes
    work = Path(args.keep or tempfile.mkdtemp(prefix="frc_dist_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    toml = work / "run.toml"
    toml.write_text(Path(args.config).read_text() if args.config else DEFAULT_TOML)

    def one(out: Path) -> list[str]:
        return [sys.executable, str(MAIN), "--config", str(toml), "--out", str(out)]

    def many(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                str(MAIN), "--config", str(toml), "--out", str(out)]

    warm = _timed(one(work / "warmup_1x1"), 1)
    walls: dict[str, list[float]] = {"one": [], "many": []}
    loads: dict[str, list[float]] = {"one": [], "many": []}
    for r in range(args.repeats):
        order = ("one", "many") if r % 2 == 0 else ("many", "one")
        for kind in order:
            loads[kind].append(round(os.getloadavg()[0], 2))
            if kind == "one":
                walls[kind].append(_timed(one(work / f"one_{r}"), n))
            else:
                walls[kind].append(_timed(many(work / f"many_{r}"), 1))
    t1, tn = statistics.median(walls["one"]), statistics.median(walls["many"])
    same = compare(work / "many_0", work / "one_0")
    same_1 = compare(work / "many_0", work / "warmup_1x1")
    load = max(loads["one"] + loads["many"])
    out = {
        "processes": [1, n], "threads_per_process": [n, 1], "wall_s": [round(t1, 2), round(tn, 2)],
        "identical": same["identical"], "overhead": round(tn / t1 - 1, 3),
        "identical_to_one_thread": same_1["identical"],
        **({"vs_n_threads": same} if not same["identical"] else {}),
        **({"vs_one_thread": same_1} if not same_1["identical"] else {}),
        "wall_s_each": walls, "warmup_1x1_s": round(warm, 2), "repeats": args.repeats,
        "load": {"cpus": os.cpu_count(), "load_avg_1min_before": loads,
                 "label": "quiet" if load < 0.5 else f"loaded (1-min load average up to {load} on "
                                                      f"{os.cpu_count()} CPUs)"},
        "config": toml.read_text(), "machine": os.uname().nodename,
    }
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
