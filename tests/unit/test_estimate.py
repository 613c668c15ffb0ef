"""``estimate``: predicted peak memory against the peak measured in a fresh process running the same stages as a run
does (known filter on 64 facts, then the patching sweep, EAP and causal tracing), within 25%."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from circuit_discovery.errors import ModelLoadError
from circuit_discovery.estimate import REFERENCE_SECONDS, STAGES, estimate, format_estimate

SRC = Path(__file__).resolve().parents[2] / "src"
MEASURED_STAGES = ("known", "attribution", "causal_tracing", "circuits")

PROBE = r"""
import json, sys
import torch
from circuit_discovery.attribution import activation_patching, causal_tracing, subject_embedding_std
from circuit_discovery.attribution.component_graph import component_circuit
from circuit_discovery.facts import filter_known, load_builtin
from circuit_discovery.models import load_model
from circuit_discovery.pipeline.attribution_stage import swap_pairs
from circuit_discovery.pipeline.config import RunConfig
torch.set_num_threads(1)
cfg = RunConfig()
m = load_model(sys.argv[1], device="cpu")
ds = load_builtin(None)
filter_known(m, ds.facts[:64], k=1, batch_size=64, progress=False)
pairs = swap_pairs(m, list(ds["capital_city"])[:16], 0, cfg.metric)[0][:2]
activation_patching(m, pairs[:1], components=("resid_pre",), metric=cfg.metric, batch_size=cfg.batch_size,
                    normalize=True)
component_circuit(m, pairs, name="x", metric=cfg.metric, granularity=cfg.granularity, method=cfg.component_method,
                  batch_size=cfg.batch_size)
causal_tracing(m, pairs[:1], kinds=("mlp", "attn"), roles=["subject_last"], n_samples=cfg.causal_samples,
               batch_size=128, noise_std=3 * float(subject_embedding_std(m, pairs)))
# VmHWM: this process's own peak (ru_maxrss would keep the parent's resident set from before the exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("PEAK " + json.dumps(hwm * 1024 / 1e9))
"""


def measured_peak_gb(model: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", PROBE, model], env=env, capture_output=True, text=True, check=True)
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("PEAK "))[5:])


def predicted_peak_gb(model: str) -> float:
    est = estimate(model)
    return max(est["stages"][s]["peak_gb"] for s in MEASURED_STAGES)


def test_tiny_model_peak_within_25_percent():
    measured = measured_peak_gb("tiny-gemma3")
    assert abs(predicted_peak_gb("tiny-gemma3") - measured) <= 0.25 * measured
    # the check can fail: the built-in model's prediction is far from the tiny model's measured peak
    assert abs(predicted_peak_gb("gemma-3-270m") - measured) > 0.25 * measured


@pytest.mark.integration
def test_builtin_model_peak_within_25_percent():
    measured = measured_peak_gb("gemma-3-270m")
    assert abs(predicted_peak_gb("gemma-3-270m") - measured) <= 0.25 * measured


def test_shape_of_estimate():
    est = estimate("gemma-3-270m")
    assert set(est["stages"]) == set(STAGES)
    # the reference model at the reference workload gives back the measured stage times (closed form)
    assert all(abs(est["stages"][s]["seconds"] - REFERENCE_SECONDS[s]) < 0.1 for s in STAGES)
    assert est["peak_gb"] == max(v["peak_gb"] for v in est["stages"].values())
    assert est["weights_gb"] == pytest.approx(268_098_176 * 4 / 1e9, rel=1e-3)
    half = estimate("gemma-3-270m", n_facts=497)
    assert half["stages"]["known"]["seconds"] == pytest.approx(REFERENCE_SECONDS["known"] / 2, rel=0.01)
    assert half["n_relations"] == 20
    big = estimate("gemma-2-2b")
    assert big["peak_gb"] > est["peak_gb"] and big["total_seconds"] > est["total_seconds"]
    gpu = estimate("gemma-2-2b", device="cuda")
    assert gpu["total_seconds"] is None and all(v["seconds"] is None for v in gpu["stages"].values())
    assert "peak" in format_estimate(est)


def test_unknown_model_is_a_typed_error():
    with pytest.raises(ModelLoadError, match="no shape is known"):
        estimate("some/unknown-model")
    with pytest.raises(ModelLoadError, match="n_facts must be >= 1"):
        estimate("tiny-gpt2", n_facts=0)
