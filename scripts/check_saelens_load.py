"""Check that SAELens itself loads dictionaries saved by ``circuit_discovery.sae.save_sae`` and computes the same.

Run with an interpreter that has ``sae-lens`` 6 (it needs nothing from this project)::

    /tmp/saelens-venv/bin/python scripts/check_saelens_load.py FOLDER [FOLDER ...]

Each FOLDER is a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) plus ``reference.safetensors`` with
``x [n, d_in]``, ``feats [n, d_sae]`` and ``recon [n, d_out]`` (what this project's ``encode`` and full forward --
skip term included -- give for ``x``). For each folder the script loads it with ``sae_lens.SAE.load_from_disk``
and compares SAELens's ``encode(x)``, ``decode(feats)`` (+ ``x @ W_skip.T`` for skip transcoders) and
``forward(x)`` with the reference (absolute tolerance 1e-5). It prints one JSON line per folder and exits 1 if any
folder fails to load or differs, 0 otherwise.
"""
from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file

TOL = 1e-5


def check(folder: str) -> dict:
    from sae_lens import SAE

    ref = load_file(f"{folder}/reference.safetensors")
    out: dict = {"folder": folder}
    try:
        sae = SAE.load_from_disk(folder, device="cpu")
    except Exception as e:  # noqa: BLE001 -- report any loader failure as a failed check, with its type
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
        return out
    sae.eval()
    with torch.no_grad():
        x = ref["x"]
        feats = sae.encode(x)
        recon_decode = sae.decode(ref["feats"])
        w_skip = getattr(sae, "W_skip", None)
        if w_skip is not None:
            recon_decode = recon_decode + x @ w_skip.T
        recon_fwd = sae(x)
    errs = {"encode": float((feats - ref["feats"]).abs().max()),
            "decode": float((recon_decode - ref["recon"]).abs().max()),
            "forward": float((recon_fwd - ref["recon"]).abs().max())}
    out.update(ok=all(v <= TOL for v in errs.values()), architecture=type(sae).__name__,
               cfg_architecture=sae.cfg.architecture(), max_abs_diff=errs,
               hook_name=sae.cfg.metadata.hook_name, has_skip=w_skip is not None)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    results = [check(f) for f in argv]
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
