"""SAELens-compatible saving/loading and a content-addressed cache of trained SAEs.

A saved SAE is a folder::

    cfg.json                  # SAELens v6 keys (see below) + our own keys SAELens ignores
    sae_weights.safetensors   # W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out],
                              # threshold [d_sae] (jumprelu), W_skip [d_out, d_in] (skip transcoders)

``cfg.json`` keys read by SAELens (``SAEConfig``/``SAEMetadata`` v6): ``architecture``, ``d_in``,
``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``metadata`` {``model_name``, ``hook_name``, ``hook_layer``, ``context_size``,
``prepend_bos``, ``dataset_path``, ``hook_name_out``, ...}; ``k`` and ``rescale_acts_by_decoder_norm`` for
``topk``; ``d_out`` for transcoders. Unknown keys are filtered out by SAELens's loader, so our extra keys are
harmless. Architecture names (all registered in SAELens 6.54, checked by ``scripts/check_saelens_load.py``):

=========================================  =====================================================================
ours                                       ``architecture`` in cfg.json
=========================================  =====================================================================
SAE ``standard`` / ``topk`` / ``jumprelu``  ``standard`` / ``topk`` / ``jumprelu``
ReLU transcoder (with skip)                 ``transcoder`` (``skip_transcoder``)
JumpReLU transcoder (with skip)             ``jumprelu_transcoder`` (``jumprelu_skip_transcoder``)
TopK transcoder, ``d_in == d_out``          ``topk``: SAELens has no TopK transcoder; a TopK SAE with
                                            ``apply_b_dec_to_input: false`` computes the same ``encode``/``decode``
                                            (SAELens hooks it at ``metadata.hook_name``, the input hook; the
                                            reconstruction is of ``metadata.hook_name_out``)
TopK transcoder, ``d_in != d_out``, or      ``topk_transcoder`` / ``topk_skip_transcoder``: **ours alone**
with skip                                   (SAELens cannot load it)
=========================================  =====================================================================

Hook semantics: since ``cfg.json`` carries ``circuit_discovery.hook_semantics`` (= :data:`HOOK_SEMANTICS`),
``blocks.{l}.mlp.hook_in`` is the MLP's input after the norm's gain and ``blocks.{l}.ln2.hook_normalized`` the
TransformerLens pre-gain value. A folder written by this package *without* that marker that names
``ln2.hook_normalized`` was trained on the post-gain value (the old meaning of that name here):
:func:`load_sae` detects it (:func:`is_legacy_hook_cfg`) and renames the hook to ``mlp.hook_in`` (same weights,
exact), and :func:`~circuit_discovery.sae.training.train_saes_on_model` converts such a cached dictionary into
the new cache key instead of retraining.

Only safetensors and JSON are read; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from circuit_discovery.io import atomic_dir, atomic_write_json, read_json
from circuit_discovery.sae.architectures import SAE_REGISTRY, SAEConfig, SparseAutoencoder, create_sae

__all__ = [
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "save_sae",
    "load_sae",
    "sae_to_saelens_cfg",
    "sae_cache_key",
    "default_cache_dir",
    "cached_sae_path",
    "load_cached_sae",
    "save_cached_sae",
    "HOOK_SEMANTICS",
    "is_legacy_hook_cfg",
    "convert_legacy_hook_cfg",
    "saelens_loadable",
]

#: marker in ``cfg.json``'s ``circuit_discovery`` block: hook names have today's meaning (``mlp.hook_in`` post-gain,
#: ``ln2.hook_normalized`` pre-gain)
HOOK_SEMANTICS = 2
_LEGACY_HOOK, _NEW_HOOK = ".ln2.hook_normalized", ".mlp.hook_in"

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"

_LAYER_RE = re.compile(r"blocks\.(\d+)\.")


def _hook_layer(hook_name: str | None) -> int | None:
    if not hook_name:
        return None
    m = _LAYER_RE.match(hook_name)
    return int(m.group(1)) if m else (-1 if hook_name == "hook_embed" else None)


def _saelens_architecture(cfg: SAEConfig) -> str:
    if not cfg.transcoder:
        return cfg.architecture
    if cfg.architecture == "topk" and not cfg.skip and cfg.d_in == cfg.d_out:
        return "topk"  # the equivalent SAELens TopK SAE (apply_b_dec_to_input false)
    base = {"standard": "", "jumprelu": "jumprelu_"}.get(cfg.architecture, f"{cfg.architecture}_")
    return f"{base}{'skip_' if cfg.skip else ''}transcoder"


#: ``metadata.sae_lens_version`` written to cfg.json: the SAELens config layout the file follows (SAELens reads
#: files without it, or older, as pre-6 configs)
SAELENS_FORMAT_VERSION = "6.0.0"

#: architecture names SAELens 6 registers (``sae_lens/__init__.py``); anything else is ours alone
SAELENS_ARCHITECTURES = ("standard", "gated", "topk", "jumprelu", "transcoder", "skip_transcoder",
                         "jumprelu_transcoder", "jumprelu_skip_transcoder")


def saelens_loadable(sae: SparseAutoencoder) -> bool:
    """Whether SAELens 6 can load ``sae`` as saved by :func:`save_sae` (its architecture name is registered there)."""
    return _saelens_architecture(sae.cfg) in SAELENS_ARCHITECTURES


def sae_to_saelens_cfg(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` dictionary for ``sae`` (SAELens v6 layout plus our ``circuit_discovery`` block)."""
    cfg = sae.cfg
    meta = dict(cfg.metadata)
    meta.setdefault("model_name", None)
    meta.setdefault("hook_name", None)
    meta.setdefault("context_size", None)
    meta.setdefault("hook_layer", _hook_layer(meta.get("hook_name")))
    meta.setdefault("prepend_bos", True)
    # the cfg.json layout version: without it SAELens 6 reads the file as pre-6 and drops ``metadata``
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("sae_lens_training_version", None)
    arch = _saelens_architecture(cfg)
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "metadata": meta,
        # ours (ignored by SAELens):
        "circuit_discovery": {"architecture": cfg.architecture, "config": cfg.to_dict(),
                              "hook_semantics": HOOK_SEMANTICS,
                              "saelens_loadable": arch in SAELENS_ARCHITECTURES},
    }
    if cfg.architecture == "topk":
        assert cfg.k is not None  # filled in by SAEConfig.__post_init__
        out["k"] = int(cfg.k)
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.transcoder:
        meta.setdefault("hook_name_out", "")
        meta.setdefault("hook_layer_out", _hook_layer(meta.get("hook_name_out")) or 0)
        out["hook_name_out"] = meta["hook_name_out"]
        out["hook_layer_out"] = meta["hook_layer_out"]
        if arch != "topk":
            out["d_out"] = cfg.d_out
    return out


def is_legacy_hook_cfg(d: dict[str, Any]) -> bool:
    """Whether a ``cfg.json`` dict was written by this package before :data:`HOOK_SEMANTICS` and names
    ``ln2.hook_normalized``, which then meant the *post*-gain MLP input (today's ``mlp.hook_in``)."""
    ours = d.get("circuit_discovery")
    if not isinstance(ours, dict) or ours.get("hook_semantics") == HOOK_SEMANTICS:
        return False
    meta = d.get("metadata") or {}
    inner = (ours.get("config") or {}).get("metadata") or {}
    hooks = [meta.get("hook_name"), meta.get("hook_name_out"), d.get("hook_name_out"), inner.get("hook_name"),
             inner.get("hook_name_out")]
    return any(isinstance(h, str) and h.endswith(_LEGACY_HOOK) for h in hooks)


def convert_legacy_hook_cfg(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of a legacy ``cfg.json`` dict (:func:`is_legacy_hook_cfg`) with ``blocks.{l}.ln2.hook_normalized``
    renamed to ``blocks.{l}.mlp.hook_in`` -- the same tensor under today's name, so the weights stay valid -- and
    the :data:`HOOK_SEMANTICS` marker set; ``converted_from_hook`` keeps the old name."""
    d = json.loads(json.dumps(d))
    ours = d["circuit_discovery"]
    old = None
    for meta in (d.get("metadata"), (ours.get("config") or {}).get("metadata"), d):
        if not isinstance(meta, dict):
            continue
        for key in ("hook_name", "hook_name_out"):
            h = meta.get(key)
            if isinstance(h, str) and h.endswith(_LEGACY_HOOK):
                old = old or h
                meta[key] = h[: -len(_LEGACY_HOOK)] + _NEW_HOOK
    ours["hook_semantics"] = HOOK_SEMANTICS
    ours["converted_from_hook"] = old
    return d


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike) -> Path:
    """Write ``sae`` to the folder ``path`` (``cfg.json`` + ``sae_weights.safetensors``), atomically per file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_enc": sae.b_enc.detach(),
        "b_dec": sae.b_dec.detach(),
        **sae.extra_state_for_saving(),
    }
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{SAE_WEIGHTS_FILENAME}.", suffix=".tmp", dir=path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path / SAE_WEIGHTS_FILENAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(path / SAE_CFG_FILENAME, sae_to_saelens_cfg(sae))
    return path


def _cfg_from_saelens(d: dict[str, Any]) -> SAEConfig:
    if is_legacy_hook_cfg(d):
        d = convert_legacy_hook_cfg(d)
    if "circuit_discovery" in d:
        c = dict(d["circuit_discovery"]["config"])
        return SAEConfig(**c)
    arch = d.get("architecture")
    if arch is None:
        raise ValueError("cfg.json has no 'architecture'")
    transcoder = arch.endswith("transcoder")
    skip = arch.endswith("skip_transcoder")
    base = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu",
            "jumprelu_skip_transcoder": "jumprelu"}.get(arch, arch.removesuffix("_transcoder").removesuffix("_skip"))
    if base not in SAE_REGISTRY:
        raise ValueError(f"cannot load SAELens architecture {arch!r}; supported: {sorted(SAE_REGISTRY)}")
    meta = dict(d.get("metadata") or d.get("meta") or {})
    for key in ("model_name", "hook_name", "context_size"):  # SAELens <6 kept these at top level
        if key in d and key not in meta:
            meta[key] = d[key]
    if transcoder and d.get("hook_name_out"):
        meta["hook_name_out"] = d["hook_name_out"]
    norm = d.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"normalize_activations={norm!r} is not supported; fold the scaling factor first")
    dtype = str(d.get("dtype", "float32")).removeprefix("torch.")
    return SAEConfig(
        d_in=int(d["d_in"]),
        d_sae=int(d["d_sae"]),
        architecture=base,
        d_out=int(d.get("d_out", d["d_in"])),
        transcoder=transcoder,
        skip=skip,
        k=int(d["k"]) if d.get("k") is not None else None,
        apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", not transcoder)),
        dtype=dtype,
        metadata=meta,
    )


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder written by :func:`save_sae` (or by SAELens for supported architectures)."""
    path = Path(path)
    cfg_path, w_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder (needs {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})")
    cfg = _cfg_from_saelens(read_json(cfg_path))
    tensors = load_file(str(w_path), device="cpu")
    sae = create_sae(cfg)
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_out,),
    }
    with torch.no_grad():
        for name, shape in expected.items():
            if name not in tensors:
                raise KeyError(f"{w_path} lacks tensor {name!r}")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, cfg.json implies {shape}")
            getattr(sae, name).copy_(t.to(cfg.torch_dtype))
    sae.load_extra_state(tensors)
    return sae.to(device).eval()


# ----------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$CIRCUIT_DISCOVERY_CACHE/saes`` or ``~/.cache/circuit_discovery/saes``."""
    root = os.environ.get("CIRCUIT_DISCOVERY_CACHE") or os.path.join(Path.home(), ".cache", "circuit_discovery")
    return Path(root) / "saes"


def sae_cache_key(model_name: str, hook_name: str, cfg: Any, corpus_id: str) -> str:
    """Stable hash of (model, hook, training config, corpus id) -> 20 hex chars.

    ``cfg`` may be a dataclass (its ``to_dict()`` or ``__dict__``) or a plain dict; it must be JSON-able.
    """
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif hasattr(cfg, "__dataclass_fields__"):
        from dataclasses import asdict

        cfg = asdict(cfg)
    blob = json.dumps(
        {"model": model_name, "hook": hook_name, "cfg": cfg, "corpus": corpus_id}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def cached_sae_path(cache_dir: str | os.PathLike | None, key: str) -> Path:
    return Path(cache_dir) / key if cache_dir is not None else default_cache_dir() / key


def load_cached_sae(cache_dir: str | os.PathLike | None, key: str, device: str = "cpu") -> SparseAutoencoder | None:
    """The cached SAE for ``key``, or None when absent."""
    p = cached_sae_path(cache_dir, key)
    if (p / SAE_CFG_FILENAME).is_file() and (p / SAE_WEIGHTS_FILENAME).is_file():
        return load_sae(p, device=device)
    return None


def save_cached_sae(
    cache_dir: str | os.PathLike | None, key: str, sae: SparseAutoencoder, extra: dict[str, Any] | None = None
) -> Path:
    """Save ``sae`` under ``key`` (written to a temporary folder, then renamed); ``extra`` -> ``train_info.json``."""
    final = cached_sae_path(cache_dir, key)
    with atomic_dir(final) as tmp:
        save_sae(sae, tmp)
        if extra is not None:
            atomic_write_json(tmp / "train_info.json", extra)
    return final
