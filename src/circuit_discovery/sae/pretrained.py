"""Load published dictionaries (SAEs and transcoders) from local files or the local Hugging Face cache.

::

    from circuit_discovery.sae import load_dictionary
    d = load_dictionary("path/to/saelens_folder")          # cfg.json + sae_weights.safetensors
    d = load_dictionary("path/to/layer_12/width_16k/average_l0_82/params.npz")   # Gemma Scope 1
    d = load_dictionary("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")  # HF cache only
    f = d.encode(x); x_hat = d.decode(f); out = d(x)       # out.recon, out.feats
    d.d_in, d.d_sae, d.architecture, d.hook_in, d.hook_out, d.skip

Supported formats (this module never downloads, never unpickles):

* **SAELens folders** (``cfg.json`` + ``sae_weights.safetensors``), v6 and pre-6 configs, architectures
  ``standard``, ``jumprelu``, ``topk``, ``transcoder``, ``jumprelu_transcoder``, ``skip_transcoder``; also every
  folder written by :func:`circuit_discovery.sae.save_sae`.
* **Gemma Scope 1** ``params.npz`` (JumpReLU; read with ``numpy.load(..., allow_pickle=False)``).

Every config value that changes the computation is either implemented or refused with a
:class:`DictionaryFormatError` naming the field and the value; nothing is silently ignored. Hook names are
returned in this project's names (``HookedModel.hook_names()``); a hook that has no exact counterpart here is an
error, except that a Gemma Scope ``params.npz`` outside its published folder layout carries no hook at all
(``hook_in = hook_out = None``).

The returned :class:`PretrainedDictionary` is a :class:`~circuit_discovery.sae.architectures.SparseAutoencoder`
(same ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``cfg``), so the evaluation helpers
accept it. ``forward(x)`` returns ``SAEForwardOutput(recon, feats, {})`` where ``recon`` includes the skip term;
``decode(f)`` does not (as in SAELens's ``SkipTranscoder``).
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.sae.architectures import SAEConfig, SAEForwardOutput, SparseAutoencoder

__all__ = [
    "DictionaryFormatError",
    "DictionaryNotFoundError",
    "PretrainedDictionary",
    "load_dictionary",
    "map_hook_name",
]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMA_SCOPE_NPZ = "params.npz"

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


class DictionaryFormatError(CircuitDiscoveryError, ValueError):
    """A dictionary file uses a format, field or value this loader does not support (the message names it)."""


class DictionaryNotFoundError(CircuitDiscoveryError, FileNotFoundError):
    """The dictionary's files are missing, or a hub id is not in the local Hugging Face cache."""


# ----------------------------------------------------------------------------------------------- the module
class PretrainedDictionary(SparseAutoencoder):
    """An inference-only SAE or transcoder loaded from a published format.

    ``architecture`` is the activation: ``standard`` (ReLU), ``topk`` (ReLU of the k largest pre-activations) or
    ``jumprelu`` (``relu(pre) * (pre > threshold)``, SAELens and Gemma Scope). ``skip`` is ``None`` or a
    ``[d_in, d_out]`` matrix added as ``x @ skip`` to ``forward``'s reconstruction. With
    ``rescale_acts_by_decoder_norm`` the pre-activations are multiplied by ``||W_dec[i]||`` before the activation
    and the features divided by it before decoding (SAELens ``topk``).
    """

    def __init__(
        self,
        *,
        W_enc: Tensor,
        W_dec: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        architecture: str,
        threshold: Tensor | None = None,
        k: int | None = None,
        skip: Tensor | None = None,
        apply_b_dec_to_input: bool = False,
        rescale_acts_by_decoder_norm: bool = False,
        transcoder: bool = False,
        hook_in: str | None = None,
        hook_out: str | None = None,
        source_format: str = "",
        metadata: dict[str, Any] | None = None,
    ):
        nn.Module.__init__(self)  # the base class would allocate random weights first
        if architecture not in ("standard", "topk", "jumprelu"):
            raise DictionaryFormatError(f"architecture={architecture!r} is not supported")
        d_in, d_sae = (int(s) for s in W_enc.shape)
        d_out = int(W_dec.shape[1])
        dt = W_enc.dtype
        if dt not in _DTYPE_NAMES:
            raise DictionaryFormatError(f"dtype={dt} is not supported; use one of {sorted(_DTYPE_NAMES.values())}")
        try:
            self.cfg = SAEConfig(
                d_in=d_in, d_sae=d_sae, architecture=architecture, d_out=d_out, transcoder=transcoder, k=k,
                apply_b_dec_to_input=apply_b_dec_to_input, dtype=_DTYPE_NAMES[dt],
                metadata={**(metadata or {}), "hook_name": hook_in, "hook_name_out": hook_out},
            )
        except ValueError as e:
            raise DictionaryFormatError(str(e)) from e
        self.architecture = architecture
        self.hook_in = hook_in
        self.hook_out = hook_out
        self.source_format = source_format
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.W_enc = nn.Parameter(W_enc.contiguous(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.to(dt).contiguous(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.to(dt).contiguous(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.to(dt).contiguous(), requires_grad=False)
        self.threshold: Tensor | None
        self.skip: Tensor | None
        self.register_buffer("threshold", None if threshold is None else threshold.to(dt).contiguous())
        self.register_buffer("skip", None if skip is None else skip.to(dt).contiguous())
        if (architecture == "jumprelu") != (threshold is not None):
            raise DictionaryFormatError(f"architecture={architecture!r} with threshold "
                                        f"{'present' if threshold is not None else 'missing'}")
        self.eval()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        assert self.cfg.d_sae is not None
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        assert self.cfg.d_out is not None
        return self.cfg.d_out

    @property
    def transcoder(self) -> bool:
        return self.cfg.transcoder

    def hidden_pre(self, x: Tensor) -> Tensor:
        pre = super().hidden_pre(x)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activation(self, hidden_pre: Tensor) -> Tensor:
        if self.architecture == "standard":
            return torch.relu(hidden_pre)
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return torch.relu(hidden_pre) * (hidden_pre > self.threshold)
        assert self.cfg.k is not None
        vals, idx = hidden_pre.topk(int(self.cfg.k), dim=-1)
        return torch.zeros_like(hidden_pre).scatter(-1, idx, torch.relu(vals))

    def decode(self, feats: Tensor) -> Tensor:
        if self.rescale_acts_by_decoder_norm:
            feats = feats / self.W_dec.norm(dim=-1)
        return super().decode(feats)

    def forward(self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None) -> SAEForwardOutput:
        """``SAEForwardOutput(recon, feats, {})``; ``recon`` includes the skip term ``x @ skip``."""
        feats = self.encode(x)
        recon = self.decode(feats)
        if self.skip is not None:
            recon = recon + x.to(self.skip.dtype) @ self.skip
        return SAEForwardOutput(recon, feats, {})

    def __repr__(self) -> str:
        kind = "transcoder" if self.transcoder else "SAE"
        return (f"PretrainedDictionary({self.source_format} {self.architecture} {kind}, d_in={self.d_in}, "
                f"d_sae={self.d_sae}, d_out={self.d_out}, hook_in={self.hook_in!r}, hook_out={self.hook_out!r}"
                f"{', skip' if self.skip is not None else ''})")


# ----------------------------------------------------------------------------------------------- hook names
_OUR_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_in",
              "hook_mlp_out", "mlp.hook_post", "ln2.hook_normalized")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def map_hook_name(name: str | None, *, ours: bool = False) -> str | None:
    """This project's hook name for a TransformerLens/SAELens hook ``name`` (None stays None).

    * same meaning, same name: ``hook_embed``, ``hook_pos_embed``, ``blocks.L.{hook_resid_pre, hook_resid_mid,
      hook_resid_post, hook_attn_out, hook_mlp_in, hook_mlp_out, mlp.hook_post}``;
    * ``blocks.L.mlp.hook_in`` (SAELens/circuit-tracer: the MLP's input after its norm *and gain*) ->
      ``blocks.L.ln2.hook_normalized`` (here the norm module's output, i.e. after the gain);
    * ``blocks.L.ln2.hook_normalized`` in TransformerLens means the normalised value *before* the gain, which this
      project has no hook for: an error, unless ``ours`` (a folder written by this project, where it means ours).
    * ``attn.hook_z`` (needs a per-head reshape), ``hook_attn_in`` and anything else: an error.
    """
    if name is None or name == "":
        return None
    if name in ("hook_embed", "hook_pos_embed"):
        return name
    m = _BLOCK_RE.match(name)
    if m:
        layer, site = m.group(1), m.group(2)
        if site == "mlp.hook_in":
            return f"blocks.{layer}.ln2.hook_normalized"
        if site == "ln2.hook_normalized" and not ours:
            raise DictionaryFormatError(
                f"hook_name={name!r}: in TransformerLens/SAELens/Gemma Scope this is the normalised MLP input "
                "*before* the norm's gain; this project's blocks.L.ln2.hook_normalized is *after* the gain "
                "(TransformerLens blocks.L.mlp.hook_in), so the dictionary cannot be attached to it")
        if site in _OUR_SITES:
            return name
    raise DictionaryFormatError(f"hook_name={name!r} has no counterpart among this project's hooks "
                                f"(supported: hook_embed, hook_pos_embed, blocks.L.{{{', '.join(_OUR_SITES)}, "
                                "mlp.hook_in}})")


# ----------------------------------------------------------------------------------------------- helpers
def _torch_dtype(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    s = str(name).removeprefix("torch.")
    for dt, n in _DTYPE_NAMES.items():
        if n == s:
            return dt
    raise DictionaryFormatError(f"dtype={name!r} is not supported; use one of {sorted(_DTYPE_NAMES.values())}")


def _check_shapes(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    for key, shape in expected.items():
        if key not in tensors:
            raise DictionaryFormatError(f"{where} lacks tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise DictionaryFormatError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


def _is_false(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "none"


# ----------------------------------------------------------------------------------------------- SAELens
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                 "activation_fn_str": "activation_fn", "hook_point_layer": "hook_layer"}
_SAELENS_ARCHS = {
    # SAELens architecture -> (activation, transcoder, has W_skip)
    "standard": ("standard", False, False),
    "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False),
    "transcoder": ("standard", True, False),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "skip_transcoder": ("standard", True, True),
    # written by this project's save_sae for a TopK transcoder
    "topk_transcoder": ("topk", True, False),
}


def _load_saelens(folder: Path, dtype: torch.dtype | None) -> PretrainedDictionary:
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not w_path.is_file():
        raise DictionaryNotFoundError(f"{folder} has {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DictionaryFormatError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DictionaryFormatError(f"{cfg_path} must hold a JSON object")
    ours = "circuit_discovery" in raw
    d: dict[str, Any] = {_PRE6_RENAMES.get(str(k), str(k)): v for k, v in raw.items()}
    raw_meta = d.get("metadata")
    meta: dict[str, Any] = {}
    if isinstance(raw_meta, dict):
        meta = {_PRE6_RENAMES.get(str(k), str(k)): v for k, v in raw_meta.items()}
    # metadata keys (v6) may sit at top level (pre-6); the nested value wins
    merged: dict[str, Any] = {**d, **meta}

    arch_value = d.get("architecture", "standard")
    activation_fn = merged.get("activation_fn")
    if arch_value == "standard" and activation_fn not in (None, "relu"):
        if activation_fn != "topk":
            raise DictionaryFormatError(f"activation_fn={activation_fn!r} is not supported (relu, topk)")
        arch_value = "topk"  # pre-6 TopK: architecture 'standard' + activation_fn_str 'topk'
    if arch_value == "gated":
        raise DictionaryFormatError("architecture='gated' is not supported yet")
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
                f"which is not in {cfg_path}; fold it into the weights (W_enc*s, W_dec/s, b_dec/s) or add "
                "'norm_scaling_factor' to cfg.json")
        if transcoder:
            raise DictionaryFormatError("normalize_activations='expected_average_only_in' is not supported "
                                        f"for architecture={arch_value!r}")
        scale = float(factor)
    elif norm != "none":
        raise DictionaryFormatError(f"normalize_activations={norm!r} is not supported "
                                    "(none, expected_average_only_in with norm_scaling_factor)")

    reshape = d.get("reshape_activations", "none") or "none"
    if reshape != "none":
        raise DictionaryFormatError(f"reshape_activations={reshape!r} is not supported yet (attn.hook_z "
                                    "dictionaries need a per-head reshape)")
    for key in ("hook_head_index", "hook_head_index_out"):
        if merged.get(key) is not None:
            raise DictionaryFormatError(f"{key}={merged[key]!r} is not supported yet (per-head dictionaries)")
    if not _is_false(merged.get("finetuning_scaling_factor")):
        raise DictionaryFormatError(f"finetuning_scaling_factor={merged['finetuning_scaling_factor']!r} "
                                    "is not supported")
    rescale = merged.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise DictionaryFormatError(f"rescale_acts_by_decoder_norm={rescale!r} must be true or false")
    if rescale and activation != "topk":
        raise DictionaryFormatError(f"rescale_acts_by_decoder_norm=True with architecture={arch_value!r} "
                                    "is not supported (SAELens defines it for topk)")
    mkw = merged.get("model_from_pretrained_kwargs") or {}
    if isinstance(mkw, dict) and mkw.get("center_writing_weights"):
        raise DictionaryFormatError("model_from_pretrained_kwargs.center_writing_weights=True is not supported: "
                                    "this project's activations come from uncentred weights")

    apply_b_dec = d.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise DictionaryFormatError(f"apply_b_dec_to_input={apply_b_dec!r} must be true or false")
    if transcoder:
        apply_b_dec = False  # SAELens's Transcoder.process_sae_in never subtracts b_dec (it lives in output space)

    hook_in = map_hook_name(merged.get("hook_name"), ours=ours)
    hook_out = map_hook_name(merged.get("hook_name_out"), ours=ours) if transcoder else hook_in

    try:
        tensors = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise DictionaryFormatError(f"{w_path} is not a readable safetensors file: {e}") from e
    try:
        d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
        d_out = int(d.get("d_out", d_in)) if transcoder else d_in
    except (KeyError, TypeError, ValueError) as e:
        raise DictionaryFormatError(f"{cfg_path} needs integer d_in and d_sae (and d_out for transcoders)") from e
    expected: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
                                            "b_dec": (d_out,)}
    if activation == "jumprelu":
        expected["threshold"] = (d_sae,)
    if has_skip:
        expected["W_skip"] = (d_out, d_in)
    _check_shapes(tensors, expected, str(w_path))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DictionaryFormatError(f"{w_path} holds tensors this loader does not use: {extra}")
    dt = dtype or _torch_dtype(d.get("dtype")) or tensors["W_enc"].dtype
    t = {key: v.to(dt) for key, v in tensors.items()}
    meta_out = {key: merged.get(key) for key in ("model_name", "context_size", "prepend_bos", "dataset_path",
                                                 "neuronpedia_id") if merged.get(key) is not None}
    dic = PretrainedDictionary(
        W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"], architecture=activation,
        threshold=t.get("threshold"), k=k, skip=t["W_skip"].T if has_skip else None,
        apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale, transcoder=transcoder,
        hook_in=hook_in, hook_out=hook_out, source_format="saelens", metadata=meta_out,
    )
    if scale is not None:
        dic.fold_activation_norm_scaling_factor(scale)
    return dic


# ----------------------------------------------------------------------------------------------- Gemma Scope 1
_GS1_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_GS1_REPO_RE = re.compile(r"gemma-scope-(?:2b|9b|27b)-(?:pt|it)-(res|mlp|att|transcoders)")
_GS1_LAYER_RE = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


def _gemma_scope_hooks(path: Path) -> tuple[str | None, str | None, bool]:
    """(hook_in, hook_out, transcoder) from a Gemma Scope path; (None, None, False) if the path says nothing."""
    s = path.as_posix()
    kind_m, layer_m = _GS1_REPO_RE.search(s), _GS1_LAYER_RE.search(s)
    if not kind_m or not layer_m:
        return None, None, False
    kind, layer = kind_m.group(1), int(layer_m.group(1))
    if kind == "res":
        return f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_resid_post", False
    if kind == "mlp":
        return f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_mlp_out", False
    if kind == "att":
        raise DictionaryFormatError(f"Gemma Scope attention SAEs (hook blocks.{layer}.attn.hook_z, "
                                    "reshape_activations='hook_z') are not supported yet")
    # transcoders read the pre-gain ln2 output: refused by map_hook_name with the reason
    return map_hook_name(f"blocks.{layer}.ln2.hook_normalized"), f"blocks.{layer}.hook_mlp_out", True


def _load_gemma_scope_npz(path: Path, dtype: torch.dtype | None) -> PretrainedDictionary:
    if not path.is_file():
        raise DictionaryNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            arrays = {name: npz[name] for name in names}
    except ValueError as e:  # object arrays need pickle: refused
        raise DictionaryFormatError(f"{path} holds pickled (object) arrays, which are never loaded: {e}") from e
    except (OSError, zipfile.BadZipFile) as e:
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
    if "W_enc" not in tensors or "W_dec" not in tensors:
        raise DictionaryFormatError(f"{path} lacks W_enc/W_dec (has {names})")
    d_in, d_sae = tuple(tensors["W_enc"].shape)
    d_out = int(tensors["W_dec"].shape[-1])
    _check_shapes(tensors, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
                            "b_dec": (d_out,), "threshold": (d_sae,)}, str(path))
    hook_in, hook_out, transcoder = _gemma_scope_hooks(path.resolve())
    if d_out != d_in:
        transcoder = True
    dt = dtype or tensors["W_enc"].dtype
    t = {k: v.to(dt) for k, v in tensors.items()}
    return PretrainedDictionary(
        W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"], architecture="jumprelu",
        threshold=t["threshold"], apply_b_dec_to_input=False, transcoder=transcoder, hook_in=hook_in,
        hook_out=hook_out, source_format="gemma_scope_1",
    )


# ----------------------------------------------------------------------------------------------- dispatch
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:/[^\s]+)?$")


def _resolve_hub(source: str) -> Path:
    """The local path of ``owner/repo[/sub/path]`` in the Hugging Face cache; never downloads."""
    parts = source.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise DictionaryNotFoundError(f"{source!r} is not a local path and huggingface_hub is missing") from e
    try:
        snapshot = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        raise DictionaryNotFoundError(
            f"{source!r} is neither a local path nor in the local Hugging Face cache (repo {repo_id!r}); this "
            "loader never downloads: fetch it first, e.g. `huggingface-cli download "
            f"{repo_id}{' --include ' + repr(sub + '/*') if sub else ''}`, or pass a local folder") from e
    if not isinstance(snapshot, str):  # pragma: no cover - only with dry_run
        raise DictionaryNotFoundError(f"{source!r}: unexpected answer from the Hugging Face cache")
    root = Path(snapshot)
    path = root / sub if sub else root
    if not path.exists():
        raise DictionaryNotFoundError(f"{sub!r} is not in the cached snapshot of {repo_id!r} ({root}); "
                                      "this loader never downloads")
    return path


def _load_path(path: Path, dtype: torch.dtype | None) -> PretrainedDictionary:
    if path.is_file():
        if path.suffix == ".npz":
            return _load_gemma_scope_npz(path, dtype)
        if path.name in (SAELENS_CFG, SAELENS_WEIGHTS):
            return _load_path(path.parent, dtype)
        raise DictionaryFormatError(f"{path}: file format not supported (expected a SAELens folder, "
                                    f"{SAELENS_CFG}, {SAELENS_WEIGHTS} or a Gemma Scope {GEMMA_SCOPE_NPZ})")
    if not path.is_dir():
        raise DictionaryNotFoundError(f"{path} does not exist")
    if (path / SAELENS_CFG).is_file():
        if (path / "sae.safetensors").is_file() and not (path / SAELENS_WEIGHTS).is_file():
            raise DictionaryFormatError(f"{path} looks like an EleutherAI sparsify folder (sae.safetensors), "
                                        "which is not supported yet")
        return _load_saelens(path, dtype)
    if (path / GEMMA_SCOPE_NPZ).is_file():
        return _load_gemma_scope_npz(path / GEMMA_SCOPE_NPZ, dtype)
    if (path / SAELENS_WEIGHTS).is_file():
        raise DictionaryNotFoundError(f"{path} has {SAELENS_WEIGHTS} but no {SAELENS_CFG}")
    if (path / "config.yaml").is_file():
        raise DictionaryFormatError(f"{path} looks like a circuit-tracer transcoder set (config.yaml), "
                                    "which is not supported yet")
    if (path / "ae.pt").is_file():
        raise DictionaryFormatError(f"{path} looks like a dictionary_learning folder (pickled ae.pt), "
                                    "which is not supported")
    raise DictionaryNotFoundError(f"{path} holds no dictionary ({SAELENS_CFG} + {SAELENS_WEIGHTS}, "
                                  f"or {GEMMA_SCOPE_NPZ})")


def load_dictionary(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> PretrainedDictionary:
    """Load one published SAE or transcoder from a local folder/file or the local Hugging Face cache.

    ``source``: a SAELens folder (or its ``cfg.json``), a Gemma Scope ``params.npz`` (or its folder), or a hub id
    ``owner/repo[/path/inside]`` read from the local cache only (``local_files_only=True``; never downloads).
    ``device`` defaults to CPU; ``dtype`` to the config's dtype, else the stored tensors' dtype.

    Raises :class:`DictionaryNotFoundError` (missing files, not cached) or :class:`DictionaryFormatError`
    (an unsupported format, field value or hook).
    """
    dt = _torch_dtype(dtype)
    path = Path(source).expanduser()
    if not path.exists() and isinstance(source, str) and _HUB_ID_RE.match(source) and not source.startswith("."):
        path = _resolve_hub(source)
    dic = _load_path(path, dt)
    return dic.to(device if device is not None else "cpu")
