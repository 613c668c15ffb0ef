"""SAELens 6 itself loads the SAEs, transcoders and skip transcoders this package saves, and computes the same.

SAELens 6.54 pins ``transformer-lens<4`` and cannot share this project's environment (TransformerLens 4.3), so the
check runs ``scripts/check_saelens_load.py`` under a separate interpreter named by ``$CIRCUIT_DISCOVERY_SAELENS_PYTHON``
(skipped, with that reason, when it is unset). Build one (about 5 minutes; see ``docs/sae.md``)::

    python -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0 && /tmp/saelens-venv/bin/pip install sae-lens==6.54.12
    CIRCUIT_DISCOVERY_SAELENS_PYTHON=/tmp/saelens-venv/bin/python python -m pytest -q tests/external
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from circuit_discovery.sae import SAEConfig, create_sae, save_sae
from circuit_discovery.sae.io import saelens_loadable

PYTHON = os.environ.get("CIRCUIT_DISCOVERY_SAELENS_PYTHON")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_saelens_load.py"
pytestmark = pytest.mark.skipif(not PYTHON, reason="set CIRCUIT_DISCOVERY_SAELENS_PYTHON to an interpreter with "
                                "sae-lens 6 (docs/sae.md, 'SAELens loads our files')")

KINDS = {
    "standard_sae": dict(architecture="standard"),
    "topk_sae": dict(architecture="topk", k=4),
    "jumprelu_sae": dict(architecture="jumprelu"),
    "relu_transcoder": dict(architecture="standard", transcoder=True),
    "skip_transcoder": dict(architecture="standard", transcoder=True, skip=True),
    "jumprelu_transcoder": dict(architecture="jumprelu", transcoder=True),
    "jumprelu_skip_transcoder": dict(architecture="jumprelu", transcoder=True, skip=True),
    "topk_transcoder": dict(architecture="topk", transcoder=True, k=4),  # saved as the equivalent SAELens topk SAE
}


def write(folder: Path, **kw) -> Path:
    """Save a dictionary with random (non-trivial) weights and the reference outputs of our own forward."""
    meta = {"model_name": "tiny", "hook_name": "blocks.1.mlp.hook_in"}
    if kw.get("transcoder"):
        meta["hook_name_out"] = "blocks.1.hook_mlp_out"
    sae = create_sae(SAEConfig(d_in=16, d_sae=32, metadata=meta, **kw), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if hasattr(sae, "set_threshold"):
            sae.set_threshold(torch.rand(32, generator=g) * 0.05)
    sae.eval()
    x = torch.randn(8, 16, generator=g)
    with torch.no_grad():
        feats, recon = sae.encode(x), sae(x).recon
    save_sae(sae, folder)
    save_file({"x": x, "feats": feats, "recon": recon}, str(folder / "reference.safetensors"))
    assert saelens_loadable(sae)
    return folder


def run(folders: list[Path]) -> tuple[int, list[dict]]:
    p = subprocess.run([str(PYTHON), str(SCRIPT), *map(str, folders)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ""})
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    return p.returncode, lines


def test_saelens_loads_every_kind_and_matches(tmp_path):
    folders = [write(tmp_path / name, **kw) for name, kw in KINDS.items()]
    rc, res = run(folders)
    assert len(res) == len(KINDS), res
    bad = [r for r in res if not r["ok"]]
    assert rc == 0 and not bad, bad
    by = {Path(r["folder"]).name: r for r in res}
    assert by["jumprelu_skip_transcoder"]["architecture"] == "JumpReLUSkipTranscoder"
    assert by["jumprelu_skip_transcoder"]["has_skip"] and by["skip_transcoder"]["architecture"] == "SkipTranscoder"
    assert by["jumprelu_transcoder"]["architecture"] == "JumpReLUTranscoder"
    assert by["topk_transcoder"]["architecture"] == "TopKSAE"
    assert {r["hook_name"] for r in res} == {"blocks.1.mlp.hook_in"}  # metadata read as v6


def test_the_check_fails_on_a_wrong_reference_and_on_ours_alone(tmp_path):
    """The check can fail: a perturbed reference is reported as a mismatch, and a TopK transcoder with
    d_in != d_out (saved as ``topk_transcoder``, ours alone) does not load in SAELens."""
    from safetensors.torch import load_file

    f = write(tmp_path / "jr", architecture="jumprelu", transcoder=True, skip=True)
    ref = load_file(str(f / "reference.safetensors"))
    ref["recon"] = ref["recon"] + 1e-3
    save_file(ref, str(f / "reference.safetensors"))
    ours = create_sae(SAEConfig(d_in=16, d_out=8, d_sae=32, architecture="topk", k=4, transcoder=True), seed=0)
    assert not saelens_loadable(ours)
    g = save_sae(ours, tmp_path / "topk_8")
    x = torch.randn(4, 16)
    with torch.no_grad():
        save_file({"x": x, "feats": ours.encode(x), "recon": ours(x).recon}, str(g / "reference.safetensors"))
    rc, res = run([f, g])
    assert rc == 1 and [r["ok"] for r in res] == [False, False]
    assert res[0]["max_abs_diff"]["forward"] > 1e-4 and "error" in res[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
