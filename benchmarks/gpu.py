"""One short GPU check (a few minutes on one GPU): writes JSON. It has not run on a GPU yet.

``python benchmarks/gpu.py --out results/gpu.json [--device cuda] [--quick] [--skip-run]``

1. ``run``: the whole default run (``python main.py`` options: 20 relations, 12 + 8 facts) on Gemma 3 270M on the
   GPU (``--quick``: the quick run), into a temporary folder: wall time, stage timings (``config.json``), peak GPU
   memory, the number of circuits and of validated ones.
2. ``transcoder_training``: tokens/s of training one TopK transcoder (the run's settings: k = 64, d_sae = 4 x
   d_model) on the GPU, on 200k rows of Gaussian activations of Gemma 3 270M's width (the cost does not depend on
   the values), and the same on 2,304 wide rows (Gemma 2 2B's width).
3. ``gemma_2_2b_stages``: the per-fact stage costs of ``benchmarks/scale.py`` on a model with Gemma 2 2B's full
   published configuration (26 layers) and random weights, float32 on the GPU (10.5 GB of weights).

Every part is timed after ``torch.cuda.synchronize()``; the JSON is written after every part, so a failure
keeps the numbers of the parts before it. The CPU numbers of the same measurements:
``results/pipeline_default*.json``, ``results/scale.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def default_run(device: str, quick: bool) -> dict:
    from circuit_discovery.pipeline.config import RunConfig
    from circuit_discovery.pipeline.run import run_pipeline

    with tempfile.TemporaryDirectory(prefix="frc-gpu-") as tmp:
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = run_pipeline(RunConfig(device=device, quick=quick, out=tmp, progress=False))
        _sync(device)
        wall = time.perf_counter() - t
        n_valid = sum(1 for c in res.circuits if getattr(getattr(c, "validation", None), "validated", False))
        return {"quick": quick, "wall_s": round(wall, 1), "stages_s": res.timings,
                "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "n_circuits": len(res.circuits), "n_validated_component_circuits": n_valid}


def transcoder_training(device: str, d_model: int, tokens: int = 200_000) -> dict:
    from circuit_discovery.sae.training import SAETrainConfig, train_saes

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_model, generator=gen)
    y = x @ (torch.randn(d_model, d_model, generator=gen) / d_model ** 0.5)
    cfg = SAETrainConfig(hook_name="blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out", k=64,
                         training_tokens=tokens, train_batch_size_tokens=4096)
    _sync(device)
    t = time.perf_counter()
    train_saes({cfg.hook_name: x, "blocks.0.hook_mlp_out": y}, [cfg], progress=False, device=device)
    _sync(device)
    sec = time.perf_counter() - t
    return {"d_model": d_model, "d_sae": 4 * d_model, "k": 64, "tokens": tokens, "seconds": round(sec, 2),
            "tokens_per_s": round(tokens / sec)}


def gemma_2_2b_stages(device: str) -> dict:
    from scale import stage_costs

    from circuit_discovery.models.synthetic import build_shaped

    t = time.perf_counter()
    model = build_shaped("gemma-2-2b", device=device)
    build = time.perf_counter() - t
    out = stage_costs(model, device)
    out["build_s"] = round(build, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="the quick run instead of the default run")
    ap.add_argument("--skip-run", action="store_true", help="leave out the whole run")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; benchmarks/gpu.py is meant for a GPU machine")
    from circuit_discovery.io import atomic_write_json

    res: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "torch": torch.__version__, "parts": {}}
    parts = [("transcoder_training_270m_width", lambda: transcoder_training(args.device, 640)),
             ("transcoder_training_2b_width", lambda: transcoder_training(args.device, 2304)),
             ("gemma_2_2b_stages", lambda: gemma_2_2b_stages(args.device))]
    if not args.skip_run:
        parts.insert(0, ("run", lambda: default_run(args.device, args.quick)))
    for name, fn in parts:
        t = time.perf_counter()
        res["parts"][name] = fn()
        res["parts"][name]["part_wall_s"] = round(time.perf_counter() - t, 1)
        atomic_write_json(args.out, res)  # after every part: a later failure keeps the numbers so far
        print(name, json.dumps(res["parts"][name])[:400], flush=True)


if __name__ == "__main__":
    main()
