"""Readers of the published dictionary formats, one function per format, and the dispatch between them.

Every reader returns a :class:`~circuit_discovery.sae.pretrained_base.PretrainedDictionary` with the format's
computation reproduced exactly (the reference computation of each format is written out in
``tests/unit/test_pretrained_formats.py``), or raises a typed error naming the file, field or hook it cannot take.
Nothing is unpickled: ``numpy.load(allow_pickle=False)``, safetensors, JSON/YAML, and for dictionary_learning's
``ae.pt`` ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuit_discovery.sae.pretrained_base import (
    DictionaryFormatError,
    DictionaryNotFoundError,
    PretrainedDictionary,
    as_bool,
    check_floating,
    check_no_extra,
    check_shapes,
    is_false,
    positive_int,
    read_json,
    read_safetensors,
    torch_dtype,
)
from circuit_discovery.sae.pretrained_hooks import HookMapping

__all__ = ["load_path", "resolve_source", "load_circuit_tracer_file", "load_gemma_scope_2_file",
           "load_gemma_scope_npz"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_NPZ = "params.npz"
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_CFG = "config.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
DICTIONARY_LEARNING_CFG = "config.json"
CIRCUIT_TRACER_CFG = "config.yaml"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt")


def _cast(tensors: dict[str, Tensor], dt: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dt) for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------- SAELens
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                 "activation_fn_str": "activation_fn", "hook_point_layer": "hook_layer"}
_SAELENS_ARCHS = {
    # SAELens architecture -> (activation, transcoder, has W_skip)
    "standard": ("standard", False, False),
    "gated": ("gated", False, False),
    "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False),
    "transcoder": ("standard", True, False),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "skip_transcoder": ("standard", True, True),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    # written by this project's save_sae for TopK transcoders (not SAELens names)
    "topk_transcoder": ("topk", True, False),
    "topk_skip_transcoder": ("topk", True, True),
}


def load_saelens(folder: Path, dtype: torch.dtype | None, model: str | None = None) -> PretrainedDictionary:
    """A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), v6 or pre-6 config."""
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not w_path.is_file():
        raise DictionaryNotFoundError(f"{folder} has {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
    raw = read_json(cfg_path)
    d: dict[str, Any] = {_PRE6_RENAMES.get(str(k), str(k)): v for k, v in raw.items()}
    raw_meta = d.get("metadata")
    meta: dict[str, Any] = {}
    if isinstance(raw_meta, dict):
        meta = {_PRE6_RENAMES.get(str(k), str(k)): v for k, v in raw_meta.items()}
    merged: dict[str, Any] = {**d, **meta}  # metadata keys (v6) may sit at top level (pre-6); nested wins

    arch_value = d.get("architecture", "standard")
    activation_fn = merged.get("activation_fn")
    if arch_value == "standard" and activation_fn not in (None, "relu"):
        if activation_fn != "topk":
            raise DictionaryFormatError(f"activation_fn={activation_fn!r} is not supported (relu, topk)")
        arch_value = "topk"  # pre-6 TopK: architecture 'standard' + activation_fn_str 'topk'
    if arch_value not in _SAELENS_ARCHS:
        raise DictionaryFormatError(f"architecture={arch_value!r} is not supported; "
                                    f"supported: {sorted(_SAELENS_ARCHS)}")
    activation, transcoder, has_skip = _SAELENS_ARCHS[arch_value]
    if activation_fn not in (None, "relu", "topk") or (activation_fn == "topk" and activation != "topk"):
        raise DictionaryFormatError(f"activation_fn={activation_fn!r} with architecture={arch_value!r} "
                                    "is not supported")

    k = None
    if activation == "topk":
        k = merged.get("k")
        if k is None:
            kwargs = merged.get("activation_fn_kwargs") or {}
            k = kwargs.get("k") if isinstance(kwargs, dict) else None
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise DictionaryFormatError(f"k={k!r}: architecture={arch_value!r} needs a positive integer k")

    norm = d.get("normalize_activations", "none")
    if isinstance(norm, bool):  # pre-6
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    scale: float | None = None
    if norm == "expected_average_only_in":
        factor = merged.get("norm_scaling_factor")
        if factor is None:
            raise DictionaryFormatError(
                "normalize_activations='expected_average_only_in' needs the dataset-level norm_scaling_factor, "
                f"which is not in {cfg_path}; add 'norm_scaling_factor' (the release's value) to cfg.json")
        if transcoder:
            raise DictionaryFormatError("normalize_activations='expected_average_only_in' is not supported "
                                        f"for architecture={arch_value!r}")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) \
                or factor <= 0:
            raise DictionaryFormatError(f"norm_scaling_factor={factor!r} must be a positive number")
        scale = float(factor)
    elif norm != "none":
        raise DictionaryFormatError(f"normalize_activations={norm!r} is not supported "
                                    "(none, expected_average_only_in with norm_scaling_factor)")
    if not is_false(merged.get("finetuning_scaling_factor")):
        raise DictionaryFormatError(f"finetuning_scaling_factor={merged['finetuning_scaling_factor']!r} "
                                    "is not supported")
    rescale = as_bool(merged.get("rescale_acts_by_decoder_norm", False), "rescale_acts_by_decoder_norm")
    if rescale and activation != "topk":
        raise DictionaryFormatError(f"rescale_acts_by_decoder_norm=True with architecture={arch_value!r} "
                                    "is not supported (SAELens defines it for topk)")
    mkw = merged.get("model_from_pretrained_kwargs") or {}
    if isinstance(mkw, dict) and mkw.get("center_writing_weights"):
        raise DictionaryFormatError("model_from_pretrained_kwargs.center_writing_weights=True is not supported: "
                                    "this project's activations come from uncentred weights")
    apply_b_dec = as_bool(d.get("apply_b_dec_to_input", True), "apply_b_dec_to_input")
    if transcoder:
        apply_b_dec = False  # SAELens's Transcoder.process_sae_in never subtracts b_dec (it lives in output space)

    hooks = HookMapping(model or merged.get("model_name"), str(cfg_path))
    # SAELens's own converters record the Hugging Face module they read (exact); prefer it to their TL name
    hf_in, hf_out = merged.get("hf_hook_name"), merged.get("hf_hook_name_out")
    hook_in = hooks.hf(hf_in) if hf_in else hooks.tl(merged.get("hook_name"))
    hook_out = hook_in
    if transcoder:
        hook_out = hooks.hf(hf_out) if hf_out else hooks.tl(merged.get("hook_name_out"))
    reshape = d.get("reshape_activations", "none") or "none"
    head = merged.get("hook_head_index")
    if merged.get("hook_head_index_out") is not None:
        raise DictionaryFormatError(f"hook_head_index_out={merged['hook_head_index_out']!r} is not supported")
    if reshape not in ("none", "hook_z"):
        raise DictionaryFormatError(f"reshape_activations={reshape!r} is not supported (none, hook_z)")
    on_z = hook_in is not None and hook_in.endswith("attn.hook_z")
    if head is not None:
        if not isinstance(head, int) or isinstance(head, bool) or head < 0:
            raise DictionaryFormatError(f"hook_head_index={head!r} must be a non-negative integer")
        if not on_z or reshape != "none" or transcoder:
            raise DictionaryFormatError(f"hook_head_index={head!r} is supported for SAEs on blocks.L.attn.hook_z "
                                        f"only (hook {hook_in!r}, reshape_activations={reshape!r})")
    if reshape == "hook_z" and (not on_z or transcoder):
        raise DictionaryFormatError(f"reshape_activations='hook_z' needs an SAE on blocks.L.attn.hook_z, "
                                    f"got hook {hook_in!r}")
    if on_z and reshape == "none" and head is None:
        raise DictionaryFormatError(f"hook_name={hook_in!r} ([batch, pos, head, d_head]) needs "
                                    "reshape_activations='hook_z' or a hook_head_index")

    tensors = read_safetensors(w_path)
    try:
        d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
        d_out = int(d.get("d_out", d_in)) if transcoder else d_in
    except (KeyError, TypeError, ValueError) as e:
        raise DictionaryFormatError(f"{cfg_path} needs integer d_in and d_sae (and d_out for transcoders)") from e
    expected: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if activation == "gated":
        expected.update({"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)})
    else:
        expected["b_enc"] = (d_sae,)
    if activation == "jumprelu":
        expected["threshold"] = (d_sae,)
    if has_skip:
        expected["W_skip"] = (d_out, d_in)
    check_shapes(tensors, expected, str(w_path))
    check_no_extra(tensors, expected, str(w_path))
    check_floating(tensors, str(w_path))
    dt = dtype or torch_dtype(d.get("dtype")) or tensors["W_enc"].dtype
    t = _cast(tensors, dt)
    meta_out = {key: merged.get(key) for key in ("model_name", "context_size", "prepend_bos", "dataset_path",
                                                 "neuronpedia_id") if merged.get(key) is not None}
    if activation == "gated":
        # SAELens GatedSAE.encode: (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)
        W_enc, b_enc = t["W_enc"] * t["r_mag"].exp(), t["b_mag"]
        gate: dict[str, Tensor] = {"W_gate": t["W_enc"], "b_gate": t["b_gate"]}
    else:
        W_enc, b_enc, gate = t["W_enc"], t["b_enc"], {}
    dic = PretrainedDictionary(
        W_enc=W_enc, W_dec=t["W_dec"], b_enc=b_enc, b_dec=t["b_dec"], architecture=activation,
        threshold=t.get("threshold"), k=k, skip=t["W_skip"].T if has_skip else None, **gate,
        apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale, transcoder=transcoder,
        reshape_activations=reshape, hook_head_index=head, hook_in=hook_in, hook_out=hook_out,
        source_format="saelens", metadata=meta_out,
    )
    if scale is not None:
        dic.fold_activation_norm_scaling_factor(scale)
    return dic


# ----------------------------------------------------------------------------------------------- Gemma Scope 1
_GS1_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_GS1_REPO_RE = re.compile(r"gemma-scope-(2b|9b|27b)-(?:pt|it)-(res|mlp|att|transcoders)")
_GS1_LAYER_RE = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


def _gemma_scope_hooks(path: Path) -> tuple[str | None, str | None, bool, str]:
    """(hook_in, hook_out, transcoder, reshape) from a Gemma Scope 1 path; no hooks if the path says nothing."""
    s = path.as_posix()
    kind_m = _GS1_REPO_RE.search(s)
    if not kind_m:
        return None, None, False, "none"
    kind = kind_m.group(2)
    if kind == "res" and re.search(r"(?:^|/)embedding/", s):
        return "hook_embed", "hook_embed", False, "none"  # this project's hook_embed is already scaled by sqrt(d)
    layer_m = _GS1_LAYER_RE.search(s)
    if not layer_m:
        return None, None, False, "none"
    layer = int(layer_m.group(1))
    if kind == "res":
        return f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_resid_post", False, "none"
    if kind == "mlp":
        return f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_mlp_out", False, "none"
    if kind == "att":
        return f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_z", False, "hook_z"
    # transcoders: trained on the pre-MLP RMSNorm's output before its gain (model card; TransformerLens's
    # ln2.hook_normalized), predicting what the MLP block adds to the residual stream (after the post-norm)
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out", True, "none"


def load_gemma_scope_npz(path: Path, dtype: torch.dtype | None) -> PretrainedDictionary:
    """A Gemma Scope 1 ``params.npz`` (JumpReLU); hooks from its published folder layout, if it is in one."""
    if not path.is_file():
        raise DictionaryNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            arrays = {name: npz[name] for name in names}
    except ValueError as e:  # object arrays need pickle: refused
        raise DictionaryFormatError(f"{path} holds pickled (object) arrays, which are never loaded: {e}") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DictionaryFormatError(f"{path} is not a readable .npz file: {e}") from e
    extra = sorted(set(names) - set(_GS1_KEYS))
    if extra:
        raise DictionaryFormatError(f"{path} holds arrays this loader does not use: {extra} "
                                    f"(Gemma Scope params.npz has {list(_GS1_KEYS)})")
    tensors = {}
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            raise DictionaryFormatError(f"{path}: {name} has dtype {arr.dtype}, expected floating point")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
    if "W_enc" not in tensors or "W_dec" not in tensors or tensors["W_enc"].ndim != 2 \
            or tensors["W_dec"].ndim != 2:
        raise DictionaryFormatError(f"{path} lacks the matrices W_enc/W_dec (has {names})")
    d_in, d_sae = tuple(tensors["W_enc"].shape)
    d_out = int(tensors["W_dec"].shape[-1])
    check_shapes(tensors, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
                           "b_dec": (d_out,), "threshold": (d_sae,)}, str(path))
    hook_in, hook_out, transcoder, reshape = _gemma_scope_hooks(path.resolve())
    if d_out != d_in:
        transcoder = True
    dt = dtype or tensors["W_enc"].dtype
    t = _cast(tensors, dt)
    return PretrainedDictionary(
        W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"], architecture="jumprelu",
        threshold=t["threshold"], apply_b_dec_to_input=False, transcoder=transcoder, reshape_activations=reshape,
        hook_in=hook_in, hook_out=hook_out, source_format="gemma_scope_1",
    )


# ----------------------------------------------------------------------------------------------- Gemma Scope 2
GS2_CFG_KEYS = {"hf_hook_point_in", "hf_hook_point_out", "width", "model_name", "architecture", "l0",
                "affine_connection", "type"}
_GS2_REPO_RE = re.compile(r"gemma-scope-2-(\d+[mb])-(pt|it)")
_GS2_SITE_RE = re.compile(r"(?:^|/)(resid_post|attn_out|mlp_out|transcoder|clt)(?:_all)?/layer_(\d+)_[^/]*$")
_GS2_INFERRED = {  # the folder's site -> (hf_hook_point_in, hf_hook_point_out), as the published configs say
    "resid_post": ("model.layers.{l}.output", None),
    "attn_out": ("model.layers.{l}.self_attn.o_proj.input", None),
    "mlp_out": ("model.layers.{l}.post_feedforward_layernorm.output", None),
    "transcoder": ("model.layers.{l}.pre_feedforward_layernorm.output",
                   "model.layers.{l}.post_feedforward_layernorm.output"),
}


def gemma_scope_2_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` (every key checked), or ``{}`` when there is none."""
    path = folder / GEMMA_SCOPE_2_CFG
    if not path.is_file():
        return {}
    cfg = read_json(path)
    unknown = sorted(set(cfg) - GS2_CFG_KEYS)
    if unknown:
        raise DictionaryFormatError(f"{path}: field(s) {unknown} are not supported (Gemma Scope 2 config.json "
                                    f"has {sorted(GS2_CFG_KEYS)})")
    arch = cfg.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise DictionaryFormatError(f"{path}: architecture={arch!r} is not supported (jump_relu)")
    return cfg


def _gs2_model(path: Path, cfg: dict[str, Any], model: str | None) -> str | None:
    if model:
        return model
    if cfg.get("model_name"):
        return str(cfg["model_name"])
    m = _GS2_REPO_RE.search(path.as_posix())
    return f"google/gemma-3-{m.group(1)}-{m.group(2)}" if m else "gemma-3"  # Gemma Scope 2 is for Gemma 3 only


def load_gemma_scope_2_file(path: Path, dtype: torch.dtype | None, model: str | None = None,
                            cfg: dict[str, Any] | None = None) -> PretrainedDictionary:
    """One Gemma Scope 2 SAE or per-layer transcoder: ``params.safetensors`` (lower-case ``w_enc [d_in, d_sae]``,
    ``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``, optional ``affine_skip_connection [d_in, d_out]``)
    and, next to it, ``config.json`` (hooks as Hugging Face module paths)."""
    cfg = gemma_scope_2_config(path.parent) if cfg is None else cfg
    kind = cfg.get("type")
    if kind in ("clt", "crosscoder"):
        raise DictionaryFormatError(f"{path} is part of a Gemma Scope 2 {kind} (config.json type={kind!r}); "
                                    "load the cross-layer transcoder with load_transcoder_set")
    if kind not in (None, "sae", "transcoder"):
        raise DictionaryFormatError(f"{path}: config.json type={kind!r} is not supported (sae, transcoder)")
    tensors = read_safetensors(path)
    if "w_enc" not in tensors or tensors["w_enc"].ndim != 2:
        raise DictionaryFormatError(f"{path} lacks the matrix 'w_enc' (has {sorted(tensors)})")
    if "w_dec" in tensors and tensors["w_dec"].ndim == 3:
        raise DictionaryFormatError(f"{path} is one layer of a Gemma Scope 2 cross-layer transcoder (w_dec "
                                    f"{tuple(tensors['w_dec'].shape)}); load its folder with load_transcoder_set")
    d_in, d_sae = (int(s) for s in tensors["w_enc"].shape)
    d_out = int(tensors["b_dec"].shape[0]) if "b_dec" in tensors and tensors["b_dec"].ndim == 1 else d_in
    expected: dict[str, tuple[int, ...]] = {"w_enc": (d_in, d_sae), "w_dec": (d_sae, d_out), "b_enc": (d_sae,),
                                            "b_dec": (d_out,), "threshold": (d_sae,)}
    has_skip = "affine_skip_connection" in tensors
    if has_skip:
        expected["affine_skip_connection"] = (d_in, d_out)
    check_shapes(tensors, expected, str(path))
    check_no_extra(tensors, expected, str(path))
    check_floating(tensors, str(path))
    if "affine_connection" in cfg and as_bool(cfg["affine_connection"], "affine_connection") != has_skip:
        raise DictionaryFormatError(f"{path}: config.json affine_connection={cfg['affine_connection']} but the "
                                    f"file {'has' if has_skip else 'lacks'} affine_skip_connection")
    if "width" in cfg and cfg["width"] != d_sae:
        raise DictionaryFormatError(f"{path}: config.json width={cfg['width']!r}, the weights have {d_sae}")
    point_in, point_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if point_in is None:
        m = _GS2_SITE_RE.search(path.parent.as_posix())
        if m and m.group(1) in _GS2_INFERRED:
            pin, pout = _GS2_INFERRED[m.group(1)]
            point_in, point_out = pin.format(l=m.group(2)), pout.format(l=m.group(2)) if pout else None
    hooks = HookMapping(_gs2_model(path, cfg, model), str(path.parent))
    hook_in = hooks.hf(point_in) if point_in else None
    hook_out = hooks.hf(point_out) if point_out else hook_in
    transcoder = kind == "transcoder" or hook_in != hook_out or has_skip or d_out != d_in
    reshape = "hook_z" if hook_in is not None and hook_in.endswith("attn.hook_z") else "none"
    if reshape == "hook_z" and transcoder:
        raise DictionaryFormatError(f"{path}: a transcoder reading attn.hook_z is not supported")
    dt = dtype or tensors["w_enc"].dtype
    t = _cast(tensors, dt)
    meta: dict[str, Any] = {k: cfg[k] for k in ("model_name", "l0", "width") if k in cfg}
    return PretrainedDictionary(
        W_enc=t["w_enc"], W_dec=t["w_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"], architecture="jumprelu",
        threshold=t["threshold"], skip=t.get("affine_skip_connection"), apply_b_dec_to_input=False,
        transcoder=transcoder, reshape_activations=reshape, hook_in=hook_in, hook_out=hook_out,
        source_format="gemma_scope_2", metadata=meta,
    )


# ----------------------------------------------------------------------------------------------- circuit-tracer
CT_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip", "k"}


def load_circuit_tracer_file(path: Path, dtype: torch.dtype | None, *, activation: str | None = None,
                             k: int | None = None, hook_in: str | None = None, hook_out: str | None = None,
                             ) -> PretrainedDictionary:
    """One circuit-tracer per-layer transcoder (``SingleLayerTranscoder.to_safetensors``): ``W_enc [d_sae, d_in]``
    (transposed against SAELens), ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, optional
    ``activation_function.threshold`` (JumpReLU ``pre * (pre > threshold)``), ``W_skip [d_out, d_in]`` (added as
    ``x @ W_skip.T``) and ``k`` (TopK, no ReLU). ``activation``/``k`` come from the set's ``config.yaml``."""
    tensors = read_safetensors(path)
    check_no_extra(tensors, CT_KEYS, str(path))
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in tensors:
            raise DictionaryFormatError(f"{path} lacks tensor {key!r}")
    if tensors["W_enc"].ndim != 2:
        raise DictionaryFormatError(f"{path}: W_enc has shape {tuple(tensors['W_enc'].shape)}, expected a matrix")
    d_sae, d_in = (int(s) for s in tensors["W_enc"].shape)
    d_out = int(tensors["b_dec"].shape[0]) if tensors["b_dec"].ndim == 1 else -1
    expected: dict[str, tuple[int, ...]] = {"W_enc": (d_sae, d_in), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
                                            "b_dec": (d_out,)}
    threshold = tensors.get("activation_function.threshold")
    if threshold is not None:
        expected["activation_function.threshold"] = (d_sae,)
    if "W_skip" in tensors:
        expected["W_skip"] = (d_out, d_in)
    check_shapes(tensors, expected, str(path))
    check_floating(tensors, str(path), set(expected))
    file_k: int | None = None
    if "k" in tensors:
        kt = tensors["k"]
        if kt.numel() != 1 or kt.is_floating_point():
            raise DictionaryFormatError(f"{path}: k must be one integer, got {kt.dtype} of shape {tuple(kt.shape)}")
        file_k = int(kt.item())
    if activation is None:
        arch = "jumprelu" if threshold is not None else ("topk_no_relu" if file_k is not None else "standard")
    elif activation == "relu":
        arch = "standard"
    elif activation == "topk":
        arch = "topk_no_relu"
    else:
        raise DictionaryFormatError(f"activation={activation!r} is not supported (relu, topk, or a threshold "
                                    "in the file for JumpReLU)")
    if activation is not None and threshold is not None:
        raise DictionaryFormatError(f"{path} has a JumpReLU threshold but config.yaml says "
                                    f"activation={activation!r}")
    if arch == "topk_no_relu":
        if k is not None and file_k is not None and k != file_k:
            raise DictionaryFormatError(f"{path}: k={file_k} in the file, k={k} in config.yaml")
        k = positive_int(k if k is not None else file_k, "k")
    elif file_k is not None or k is not None:
        raise DictionaryFormatError(f"{path}: k={file_k if file_k is not None else k} given for a "
                                    f"{arch} transcoder (k is for activation: topk)")
    dt = dtype or tensors["W_enc"].dtype
    t = _cast({key: v for key, v in tensors.items() if key != "k"}, dt)
    thr = t.get("activation_function.threshold")
    if thr is not None and bool((thr < 0).any()):
        arch = "jumprelu_no_relu"  # circuit-tracer's pre * (pre > threshold) differs from relu form only here
    return PretrainedDictionary(
        W_enc=t["W_enc"].T, W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"], architecture=arch,
        threshold=thr, k=k, skip=t["W_skip"].T if "W_skip" in t else None, apply_b_dec_to_input=False,
        transcoder=True, hook_in=hook_in, hook_out=hook_out, source_format="circuit_tracer",
    )


# ----------------------------------------------------------------------------------------------- sparsify
SPARSIFY_CFG_KEYS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                     "skip_connection", "transcode", "d_in"}


def _sparsify_model(folder: Path, model: str | None) -> str | None:
    """``model=`` if given, else the ``model`` of the training run's ``config.json`` one folder up."""
    if model:
        return model
    run_cfg = folder.parent / "config.json"
    if run_cfg.is_file():
        value = read_json(run_cfg).get("model")
        return str(value) if value else None
    return None


def load_sparsify(folder: Path, dtype: torch.dtype | None, model: str | None = None) -> PretrainedDictionary:
    """One EleutherAI sparsify coder: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``
    (``encoder.weight [n, d_in]``, ``encoder.bias``, ``W_dec [n, d_in]``, ``b_dec``, optional ``W_skip``).
    The folder's name is the hookpoint (a Hugging Face module path: an SAE reads its output, a transcoder its
    input and predicts its output)."""
    cfg_path, w_path = folder / SAELENS_CFG, folder / SPARSIFY_WEIGHTS
    cfg = read_json(cfg_path)
    unknown = sorted(set(cfg) - SPARSIFY_CFG_KEYS)
    if unknown:
        raise DictionaryFormatError(f"{cfg_path}: field(s) {unknown} are not supported (sparsify's "
                                    f"SparseCoderConfig fields: {sorted(SPARSIFY_CFG_KEYS)})")
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryFormatError(f"{cfg_path}: activation={cfg['activation']!r} is not supported (topk)")
    d_in = positive_int(cfg.get("d_in"), "d_in")
    k = positive_int(cfg.get("k", 32), "k")
    transcode = as_bool(cfg.get("transcode", False), "transcode")
    has_skip = as_bool(cfg.get("skip_connection", False), "skip_connection")
    for flag in ("normalize_decoder", "multi_topk"):  # training-time only: checked for type, no effect here
        as_bool(cfg.get(flag, False), flag)
    num = cfg.get("num_latents", 0) or d_in * positive_int(cfg.get("expansion_factor", 32), "expansion_factor")
    num = positive_int(num, "num_latents")
    tensors = read_safetensors(w_path)
    expected: dict[str, tuple[int, ...]] = {"encoder.weight": (num, d_in), "encoder.bias": (num,),
                                            "W_dec": (num, d_in), "b_dec": (d_in,)}
    if has_skip:
        expected["W_skip"] = (d_in, d_in)
    check_shapes(tensors, expected, str(w_path))
    check_no_extra(tensors, expected, str(w_path))
    check_floating(tensors, str(w_path))
    hooks = HookMapping(_sparsify_model(folder, model), str(folder))
    point = folder.name
    if transcode:
        hook_in, hook_out = hooks.hf(point, default_io="input"), hooks.hf(point, default_io="output")
    else:
        hook_in = hook_out = hooks.hf(point, default_io="output")
    dt = dtype or tensors["encoder.weight"].dtype
    t = _cast(tensors, dt)
    return PretrainedDictionary(
        W_enc=t["encoder.weight"].T, W_dec=t["W_dec"], b_enc=t["encoder.bias"], b_dec=t["b_dec"],
        architecture="topk", k=k, skip=t["W_skip"].T if has_skip else None,
        apply_b_dec_to_input=not transcode, transcoder=transcode, hook_in=hook_in, hook_out=hook_out,
        source_format="sparsify", metadata={"hookpoint": point},
    )


# ----------------------------------------------------------------------------------------------- dictionary_learning
_DL_SUBMODULE_RE = re.compile(r"^(resid_post|resid_pre|mlp_out|attn_out)_layer_?(\d+)$")


def read_weights_only_torch(path: Path) -> dict[str, Tensor]:
    """A state dict from a torch file with ``torch.load(weights_only=True)`` (never full unpickling)."""
    if not path.is_file():
        raise DictionaryNotFoundError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError,
            TypeError, IndexError, KeyError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DictionaryFormatError(f"{path} is not a weights-only torch state dict and is never unpickled "
                                    f"({first[:160]}); convert it to safetensors") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise DictionaryFormatError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def load_dictionary_learning(folder: Path, dtype: torch.dtype | None, model: str | None = None,
                             ) -> PretrainedDictionary:
    """saprmarks/dictionary_learning: ``ae.pt`` (a state dict, read with ``weights_only=True``) + ``config.json``
    (``trainer.dict_class`` and sizes). Classes: AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder,
    AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE (their default ``encode``)."""
    cfg_path, w_path = folder / DICTIONARY_LEARNING_CFG, folder / DICTIONARY_LEARNING_WEIGHTS
    if not cfg_path.is_file():
        raise DictionaryNotFoundError(f"{folder} has {DICTIONARY_LEARNING_WEIGHTS} but no {DICTIONARY_LEARNING_CFG}")
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise DictionaryFormatError(f"{cfg_path} lacks the 'trainer' object")
    cls = trainer.get("dict_class")
    sd = read_weights_only_torch(w_path)
    where = str(w_path)
    d = positive_int(trainer.get("activation_dim"), "activation_dim")
    n = positive_int(trainer.get("dict_size"), "dict_size")
    args: dict[str, Any] = {}
    if cls in ("AutoEncoder", "AutoEncoderNew"):
        exp = {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n)}
        exp.update({"bias": (d,)} if cls == "AutoEncoder" else {"decoder.bias": (d,)})
        check_shapes(sd, exp, where)
        check_no_extra(sd, exp, where)
        args = dict(W_enc=sd["encoder.weight"].T, b_enc=sd["encoder.bias"], W_dec=sd["decoder.weight"].T,
                    b_dec=sd["bias"] if cls == "AutoEncoder" else sd["decoder.bias"], architecture="standard",
                    apply_b_dec_to_input=cls == "AutoEncoder")
    elif cls == "GatedAutoEncoder":
        exp = {"encoder.weight": (n, d), "decoder.weight": (d, n), "decoder_bias": (d,), "r_mag": (n,),
               "gate_bias": (n,), "mag_bias": (n,)}
        check_shapes(sd, exp, where)
        check_no_extra(sd, exp, where)
        W = sd["encoder.weight"].T
        args = dict(W_enc=W * sd["r_mag"].exp(), b_enc=sd["mag_bias"], W_gate=W, b_gate=sd["gate_bias"],
                    W_dec=sd["decoder.weight"].T, b_dec=sd["decoder_bias"], architecture="gated",
                    apply_b_dec_to_input=True)
    elif cls == "JumpReluAutoEncoder":
        exp = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)}
        check_shapes(sd, exp, where)
        check_no_extra(sd, exp, where)
        # relu(pre * (pre > threshold)) == relu(pre) * (pre > threshold)
        args = dict(W_enc=sd["W_enc"], b_enc=sd["b_enc"], W_dec=sd["W_dec"], b_dec=sd["b_dec"],
                    threshold=sd["threshold"], architecture="jumprelu", apply_b_dec_to_input=False)
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        if cls == "MatryoshkaBatchTopKSAE":
            exp = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "k": (), "threshold": ()}
            known = {**exp, "group_sizes": tuple(sd["group_sizes"].shape) if "group_sizes" in sd else ()}
        else:
            exp = {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), "b_dec": (d,),
                   "k": (), "threshold": ()}
            known = exp
        check_shapes(sd, exp, where)
        check_no_extra(sd, known, where)
        k = int(sd["k"].item())
        if trainer.get("k") is not None and int(trainer["k"]) != k:
            raise DictionaryFormatError(f"{where}: k={k}, config.json says k={trainer['k']}")
        if cls == "MatryoshkaBatchTopKSAE":
            W_enc, b_enc, W_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"]
        else:
            W_enc, b_enc, W_dec = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T
        args = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=sd["b_dec"], apply_b_dec_to_input=True)
        if cls == "AutoEncoderTopK":  # encode(): relu, then the k largest per token
            args.update(architecture="topk", k=positive_int(k, "k"))
        else:
            # encode() at inference: relu(pre) * (relu(pre) > threshold), one global threshold (negative while
            # unset, which keeps every positive value) == relu(pre) * (pre > max(threshold, 0))
            thr = float(sd["threshold"].item())
            args.update(architecture="jumprelu", threshold=torch.full((n,), max(thr, 0.0), dtype=W_enc.dtype))
    else:
        raise DictionaryFormatError(f"{cfg_path}: dict_class={cls!r} is not supported (AutoEncoder, "
                                    "AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, "
                                    "BatchTopKSAE, MatryoshkaBatchTopKSAE)")
    floats = {key: v for key, v in sd.items() if key not in ("k", "group_sizes")}
    check_floating(floats, where)
    dt = dtype or next(iter(floats.values())).dtype
    args = {key: v.to(dt) if isinstance(v, Tensor) else v for key, v in args.items()}
    sub = trainer.get("submodule_name")
    hook: str | None = None
    m = _DL_SUBMODULE_RE.match(str(sub)) if sub else None
    if m:
        hooks = HookMapping(model or trainer.get("lm_name"), str(cfg_path))
        site, layer = m.group(1), int(m.group(2))
        tl = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "mlp_out": "mlp.hook_out",
              "attn_out": "attn.hook_out"}[site]  # nnsight submodule outputs: the module's own output
        hook = hooks.tl(f"blocks.{layer}.{tl}")
    meta = {key: trainer[key] for key in ("lm_name", "layer", "submodule_name") if trainer.get(key) is not None}
    return PretrainedDictionary(**args, hook_in=hook, hook_out=hook, source_format="dictionary_learning",
                                metadata=meta)


# ----------------------------------------------------------------------------------------------- dispatch
def _safetensors_kind(path: Path) -> str:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryFormatError(f"{path} is not a readable safetensors file: {e}") from e
    if "w_enc" in keys and "w_dec" in keys:
        return "gemma_scope_2"
    if "encoder.weight" in keys:
        return "sparsify"
    if any(k.startswith("W_enc_") for k in keys):
        return "circuit_tracer_clt"
    if "W_enc" in keys:
        return "circuit_tracer"
    raise DictionaryFormatError(f"{path}: tensors {sorted(keys)[:8]} match no known dictionary format")


def circuit_tracer_set_layer(path: Path) -> int | None:
    """The layer of ``path`` when it is ``layer_N.safetensors`` next to a circuit-tracer ``config.yaml``, else None."""
    m = re.fullmatch(r"layer_(\d+)\.safetensors", path.name)
    return int(m.group(1)) if m and (path.parent / CIRCUIT_TRACER_CFG).is_file() else None


def load_path(path: Path, dtype: torch.dtype | None, model: str | None = None) -> PretrainedDictionary:
    """Load the dictionary at a local folder or file, choosing the format from the files present."""
    if path.is_file():
        name, suffix = path.name, path.suffix
        if suffix == ".npz":
            return load_gemma_scope_npz(path, dtype)
        if name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
            return load_path(path.parent, dtype, model)
        if name == DICTIONARY_LEARNING_WEIGHTS:
            return load_dictionary_learning(path.parent, dtype, model)
        if suffix == ".safetensors":
            kind = _safetensors_kind(path)
            if kind == "gemma_scope_2":
                return load_gemma_scope_2_file(path, dtype, model)
            if kind == "sparsify":
                return load_path(path.parent, dtype, model)
            if kind == "circuit_tracer":
                if circuit_tracer_set_layer(path) is not None:
                    raise DictionaryFormatError(f"{path} is one layer of the circuit-tracer set in {path.parent}; "
                                                "load it with load_dictionary (which reads the set's config.yaml) "
                                                "or load_transcoder_set")
                return load_circuit_tracer_file(path, dtype)
            raise DictionaryFormatError(f"{path} is one layer of a circuit-tracer cross-layer transcoder; "
                                        "load it with load_transcoder_set on its folder")
        if suffix in PICKLE_SUFFIXES:
            raise DictionaryFormatError(f"{path} is a pickle/torch file, which is never unpickled; only "
                                        f"dictionary_learning's {DICTIONARY_LEARNING_WEIGHTS} is read (weights only)")
        raise DictionaryFormatError(f"{path}: file format not supported (SAELens folder, Gemma Scope params.npz "
                                    "or params.safetensors, circuit-tracer layer_N.safetensors, sparsify or "
                                    "dictionary_learning folder)")
    if not path.is_dir():
        raise DictionaryNotFoundError(f"{path} does not exist")
    if (path / SAELENS_CFG).is_file():
        if (path / SPARSIFY_WEIGHTS).is_file() and not (path / SAELENS_WEIGHTS).is_file():
            return load_sparsify(path, dtype, model)
        return load_saelens(path, dtype, model)
    if (path / GEMMA_SCOPE_NPZ).is_file():
        return load_gemma_scope_npz(path / GEMMA_SCOPE_NPZ, dtype)
    if (path / GEMMA_SCOPE_2_WEIGHTS).is_file():
        return load_gemma_scope_2_file(path / GEMMA_SCOPE_2_WEIGHTS, dtype, model)
    if (path / DICTIONARY_LEARNING_WEIGHTS).is_file():
        return load_dictionary_learning(path, dtype, model)
    if (path / SAELENS_WEIGHTS).is_file():
        raise DictionaryNotFoundError(f"{path} has {SAELENS_WEIGHTS} but no {SAELENS_CFG}")
    if (path / CIRCUIT_TRACER_CFG).is_file() or any(path.glob("layer_*.safetensors")) \
            or any(path.glob("params_layer_*.safetensors")) or (path / "W_enc_0.safetensors").is_file():
        raise DictionaryFormatError(f"{path} holds a transcoder set (one dictionary per layer, or a cross-layer "
                                    "transcoder); load it with load_transcoder_set")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DictionaryFormatError(f"{path} holds only pickle/torch files {pickles[:3]}, which are never "
                                    "unpickled; use a safetensors-based format")
    raise DictionaryNotFoundError(f"{path} holds no dictionary in a known format ({SAELENS_CFG} + "
                                  f"{SAELENS_WEIGHTS}, {GEMMA_SCOPE_NPZ}, {GEMMA_SCOPE_2_WEIGHTS}, sparsify "
                                  f"{SAELENS_CFG} + {SPARSIFY_WEIGHTS}, dictionary_learning "
                                  f"{DICTIONARY_LEARNING_WEIGHTS} + {DICTIONARY_LEARNING_CFG})")


# ----------------------------------------------------------------------------------------------- Hugging Face
_HUB_RE = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*)/([\w.-]+)(/[^?@]*)?(?:@([\w./-]+)|\?revision=([\w./-]+))?$")


def parse_hub_id(source: str) -> tuple[str, str, str | None] | None:
    """``(repo_id, path inside, revision)`` for ``owner/repo[/path][@rev]`` or ``hf://owner/repo/path?revision=``."""
    m = _HUB_RE.match(source.strip())
    if not m:
        return None
    return f"{m.group(1)}/{m.group(2)}", (m.group(3) or "").strip("/"), m.group(4) or m.group(5)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_snapshot(repo_id: str, revision: str | None, *, allow_download: bool,
                 allow_patterns: list[str] | None, exists: Any = None) -> Path:
    """The local snapshot folder of ``repo_id``: the local Hugging Face cache first (``local_files_only``); only
    when ``allow_download`` and online, a download of ``allow_patterns``. ``exists(root)`` says whether the
    cached snapshot already holds what is needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    root: Path | None = None
    try:
        root = Path(str(snapshot_download(repo_id, revision=revision, local_files_only=True)))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        root = None
    if root is not None and (exists is None or exists(root)):
        return root
    what = f"{repo_id}{'@' + revision if revision else ''}" + (f" ({', '.join(allow_patterns)})"
                                                               if allow_patterns else "")
    if not allow_download:
        raise DictionaryNotFoundError(
            f"{what} is not in the local Hugging Face cache and downloads were not allowed: fetch it first "
            f"(`hf download {repo_id}" + (f" --include '{allow_patterns[0]}'" if allow_patterns else "") +
            "`), pass allow_download=True, or pass a local folder")
    if _offline():
        raise DictionaryNotFoundError(f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                                      "fetch it on a machine that is online or pass a local folder")
    try:
        root = Path(str(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DictionaryNotFoundError(f"{what} could not be downloaded ({first[:200]}); check the id and your "
                                      "access, or pass a local folder") from e
    if exists is not None and not exists(root):
        raise DictionaryNotFoundError(f"{what}: the download does not hold the requested files; check the path")
    return root


def resolve_source(source: str | os.PathLike, *, allow_download: bool = False) -> Path:
    """A local path for ``source``: an existing local file/folder, or a Hugging Face id resolved through the
    local cache (downloading only when ``allow_download``)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    s = os.fspath(source)
    hub = parse_hub_id(s) if isinstance(s, str) and not s.startswith((".", "/", "~")) else None
    if hub is None:
        raise DictionaryNotFoundError(f"{source} does not exist (and is not a Hugging Face id owner/repo[/path])")
    repo_id, sub, revision = hub
    patterns = [f"{sub}/*", sub] if sub else None
    root = hub_snapshot(repo_id, revision, allow_download=allow_download, allow_patterns=patterns,
                        exists=lambda r: (r / sub).exists() if sub else True)
    return root / sub if sub else root
