"""``torchrun --standalone --nproc-per-node 2`` (gloo, CPU, 1 thread per rank) on the built-in Gemma 3 270M writes the
files of a one-process run of the same seed.

The smallest honest configuration that still splits every per-relation stage over the two ranks: the quick profile
(6 discovery and 4 held-out facts per relation) with fewer draws to keep the suite short (19 matched random
circuits, the least the baseline accepts; causal tracing of 1 fact with 2 noise samples, no full trace) on two
relations, ``capital_city`` and
``city_country``, one per rank, without feature circuits (``features = false``: the transcoders' training is the
same code on one rank in both runs, and the tiny-model test in ``tests/unit/test_distributed.py`` covers feature
circuits across ranks). Oracle: the one-process run's ``circuits.json`` and ``hypotheses.csv``, byte for byte, and
its ``metrics.json`` (no field differs: each relation's functions run on the same inputs with 1 thread in both).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MAIN = Path(__file__).resolve().parents[2] / "main.py"
TOML = ('[run]\nquick = true\nrelations = ["capital_city", "city_country"]\nfeatures = false\nprogress = false\n'
        'n_random = 19\ncausal_facts = 1\ncausal_samples = 2\ncausal_full_facts = 0\n')
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_two_processes_write_what_one_process_writes_on_the_builtin_model(tmp_path):
    from circuit_discovery.pipeline import RunConfig, run_pipeline

    toml = tmp_path / "run.toml"
    toml.write_text(TOML)
    one, two = tmp_path / "one", tmp_path / "two"
    assert "WORLD_SIZE" not in os.environ
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each rank: the floats of a matrix product may depend on the thread count
    try:
        run_pipeline(RunConfig.from_toml(toml, out=str(one)))
    finally:
        torch.set_num_threads(threads)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(MAIN), "--config", str(toml), "--out", str(two)],
                         capture_output=True, text=True, timeout=3000, env=ENV)
    assert res.returncode == 0, res.stderr
    for f in ("circuits.json", "metrics.json", "hypotheses.csv"):
        assert (two / f).read_text() == (one / f).read_text(), f
    ranks = json.loads((two / "config.json").read_text())["ranks"]
    assert [r["stages"]["circuits"]["items"] for r in ranks] == [["capital_city"], ["city_country"]]
