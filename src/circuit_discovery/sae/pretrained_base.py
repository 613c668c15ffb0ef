"""The module every published dictionary loads into (:class:`PretrainedDictionary`), its errors and file helpers.

Used by :mod:`circuit_discovery.sae.pretrained` (``load_dictionary``) and
:mod:`circuit_discovery.sae.pretrained_sets` (``load_transcoder_set``). Nothing here unpickles or downloads.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.sae.architectures import SAEConfig, SAEForwardOutput, SparseAutoencoder

__all__ = [
    "ARCHITECTURES",
    "DictionaryFormatError",
    "DictionaryNotFoundError",
    "PretrainedDictionary",
]

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}

# architecture -> the registered SparseAutoencoder architecture whose config fields it uses
ARCHITECTURES = {
    "standard": "standard",          # relu(pre)
    "topk": "topk",                  # relu of the k largest pre-activations (SAELens, sparsify, dictionary_learning)
    "topk_no_relu": "topk",          # the k largest pre-activations as they are (circuit-tracer's TopK)
    "jumprelu": "jumprelu",          # relu(pre) * (pre > threshold) (SAELens, Gemma Scope, dictionary_learning)
    "jumprelu_no_relu": "jumprelu",  # pre * (pre > threshold) (circuit-tracer's JumpReLU)
    "gated": "standard",             # (pre_gate > 0) * relu(pre_mag) (SAELens gated, dictionary_learning gated)
}


class DictionaryFormatError(CircuitDiscoveryError, ValueError):
    """A dictionary file uses a format, field or value this loader does not support (the message names it)."""


class DictionaryNotFoundError(CircuitDiscoveryError, FileNotFoundError):
    """The dictionary's files are missing, or a hub id is not in the local Hugging Face cache."""


class PretrainedDictionary(SparseAutoencoder):
    """An inference-only SAE or transcoder loaded from a published format.

    Parameters in SAELens's names and shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc [d_sae]``,
    ``b_dec [d_out]``; ``threshold [d_sae]`` (JumpReLU); ``skip [d_in, d_out]`` or ``None`` (added as ``x @ skip``
    to ``forward``'s reconstruction, not to ``decode``'s, as SAELens's ``SkipTranscoder``).

    ``architecture`` is one of :data:`ARCHITECTURES`. For ``gated`` the magnitude path is ``W_enc``/``b_enc``
    (``W_enc`` already multiplied by ``exp(r_mag)``) and the gate is ``x @ W_gate + b_gate > 0``. With
    ``rescale_acts_by_decoder_norm`` the pre-activations are multiplied by ``||W_dec[i]||`` before the activation
    and the features divided by it before decoding (SAELens ``topk``). ``reshape_activations == "hook_z"``: the
    input may be ``[..., n_heads, d_head]`` (flattened to ``d_in = n_heads * d_head``) and ``forward`` returns the
    reconstruction in the input's shape; ``hook_head_index``: the dictionary reads one head of ``attn.hook_z``
    (``select_input`` picks it).
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
        W_gate: Tensor | None = None,
        b_gate: Tensor | None = None,
        apply_b_dec_to_input: bool = False,
        rescale_acts_by_decoder_norm: bool = False,
        transcoder: bool = False,
        reshape_activations: str = "none",
        hook_head_index: int | None = None,
        hook_in: str | None = None,
        hook_out: str | None = None,
        source_format: str = "",
        metadata: dict[str, Any] | None = None,
    ):
        nn.Module.__init__(self)  # the base class would allocate random weights first
        if architecture not in ARCHITECTURES:
            raise DictionaryFormatError(f"architecture={architecture!r} is not supported; "
                                        f"supported: {sorted(ARCHITECTURES)}")
        if W_enc.ndim != 2 or W_dec.ndim != 2:
            raise DictionaryFormatError(f"W_enc and W_dec must be matrices, got shapes {tuple(W_enc.shape)} "
                                        f"and {tuple(W_dec.shape)}")
        d_in, d_sae = (int(s) for s in W_enc.shape)
        d_out = int(W_dec.shape[1])
        dt = W_enc.dtype
        if dt not in _DTYPE_NAMES:
            raise DictionaryFormatError(f"dtype={dt} is not supported; use one of {sorted(_DTYPE_NAMES.values())}")
        if reshape_activations not in ("none", "hook_z"):
            raise DictionaryFormatError(f"reshape_activations={reshape_activations!r} is not supported "
                                        "(none, hook_z)")
        try:
            self.cfg = SAEConfig(
                d_in=d_in, d_sae=d_sae, architecture=ARCHITECTURES[architecture], d_out=d_out,
                transcoder=transcoder, k=k, apply_b_dec_to_input=apply_b_dec_to_input, dtype=_DTYPE_NAMES[dt],
                metadata={**(metadata or {}), "hook_name": hook_in, "hook_name_out": hook_out},
            )
        except ValueError as e:
            raise DictionaryFormatError(str(e)) from e
        self.architecture = architecture
        self.hook_in = hook_in
        self.hook_out = hook_out
        self.source_format = source_format
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.reshape_activations = reshape_activations
        self.hook_head_index = hook_head_index
        self.W_enc = nn.Parameter(W_enc.contiguous(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.to(dt).contiguous(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.to(dt).contiguous(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.to(dt).contiguous(), requires_grad=False)
        self.threshold: Tensor | None
        self.skip: Tensor | None
        self.W_gate: Tensor | None
        self.b_gate: Tensor | None
        self.register_buffer("threshold", None if threshold is None else threshold.to(dt).contiguous())
        self.register_buffer("skip", None if skip is None else skip.to(dt).contiguous())
        self.register_buffer("W_gate", None if W_gate is None else W_gate.to(dt).contiguous())
        self.register_buffer("b_gate", None if b_gate is None else b_gate.to(dt).contiguous())
        expected: dict[str, tuple[Tensor | None, tuple[int, ...]]] = {
            "W_dec": (W_dec, (d_sae, d_out)), "b_enc": (b_enc, (d_sae,)), "b_dec": (b_dec, (d_out,)),
            "threshold": (threshold, (d_sae,)), "skip": (skip, (d_in, d_out)), "W_gate": (W_gate, (d_in, d_sae)),
            "b_gate": (b_gate, (d_sae,)),
        }
        for name, (t, shape) in expected.items():
            if t is not None and tuple(t.shape) != shape:
                raise DictionaryFormatError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if architecture.startswith("jumprelu") != (threshold is not None):
            raise DictionaryFormatError(f"architecture={architecture!r} with threshold "
                                        f"{'present' if threshold is not None else 'missing'}")
        if (architecture == "gated") != (W_gate is not None and b_gate is not None):
            raise DictionaryFormatError(f"architecture={architecture!r} needs W_gate and b_gate exactly when gated")
        if self.rescale_acts_by_decoder_norm and not architecture.startswith("topk"):
            raise DictionaryFormatError(f"rescale_acts_by_decoder_norm=True with architecture={architecture!r} "
                                        "is not supported (SAELens defines it for topk)")
        self.eval()

    # ------------------------------------------------------------------ shape helpers
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

    def select_input(self, activation: Tensor) -> Tensor:
        """The dictionary's input from the activation of ``hook_in``: one head of ``attn.hook_z``
        (``[..., n_heads, d_head] -> [..., d_head]``) when ``hook_head_index`` is set; otherwise unchanged."""
        if self.hook_head_index is not None:
            return activation[..., self.hook_head_index, :]
        return activation

    def _flat(self, x: Tensor) -> Tensor:
        if (self.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-1] != self.d_in
                and x.shape[-2] * x.shape[-1] == self.d_in):
            return x.flatten(-2)
        return x

    # ------------------------------------------------------------------ inference
    def hidden_pre(self, x: Tensor) -> Tensor:
        pre = super().hidden_pre(self._flat(x))
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activation(self, hidden_pre: Tensor) -> Tensor:
        arch = self.architecture
        if arch in ("standard", "gated"):
            return torch.relu(hidden_pre)
        if arch.startswith("jumprelu"):
            assert self.threshold is not None
            gate = hidden_pre > self.threshold
            return (torch.relu(hidden_pre) if arch == "jumprelu" else hidden_pre) * gate
        assert self.cfg.k is not None
        vals, idx = hidden_pre.topk(int(self.cfg.k), dim=-1)
        if arch == "topk":
            vals = torch.relu(vals)
        return torch.zeros_like(hidden_pre).scatter(-1, idx, vals)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` of ``x [..., d_in]`` (``[..., n_heads, d_head]`` for hook_z)."""
        x = self._flat(x)
        feats = self.activation(self.hidden_pre(x))
        if self.architecture == "gated":
            assert self.W_gate is not None and self.b_gate is not None
            xg = x.to(self.W_gate.dtype)
            if self.cfg.apply_b_dec_to_input:
                xg = xg - self.b_dec
            feats = feats * ((xg @ self.W_gate + self.b_gate) > 0).to(feats.dtype)
        return feats

    def decode(self, feats: Tensor) -> Tensor:
        """Reconstruction ``[..., d_out]`` from features (without the skip term)."""
        if self.rescale_acts_by_decoder_norm:
            feats = feats / self.W_dec.norm(dim=-1)
        return super().decode(feats)

    def skip_out(self, x: Tensor) -> Tensor | None:
        if self.skip is None:
            return None
        return self._flat(x).to(self.skip.dtype) @ self.skip

    def reconstruct(self, x: Tensor) -> Tensor:
        """``decode(encode(x))`` plus the skip term, in the input's shape for hook_z dictionaries."""
        return self.forward(x).recon

    def forward(self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None) -> SAEForwardOutput:
        """``SAEForwardOutput(recon, feats, {})``; ``recon`` includes the skip term ``x @ skip``."""
        feats = self.encode(x)
        recon = self.decode(feats)
        s = self.skip_out(x)
        if s is not None:
            recon = recon + s
        if self.reshape_activations == "hook_z" and x.shape[-1] != self.d_in and self.d_out == self.d_in:
            recon = recon.reshape(*recon.shape[:-1], *x.shape[-2:])
        return SAEForwardOutput(recon, feats, {})

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale_in: float, scale_out: float | None = None) -> None:
        """Rewrite weights trained on ``x * scale_in -> y * scale_out`` to act on raw activations
        (feature activations unchanged; the reconstruction divided by ``scale_out``)."""
        scale_out = scale_in if scale_out is None else scale_out
        if self.cfg.apply_b_dec_to_input and scale_in != scale_out:
            raise DictionaryFormatError("apply_b_dec_to_input needs the same input and output scaling factor")
        if self.rescale_acts_by_decoder_norm:
            raise DictionaryFormatError("a norm scaling factor with rescale_acts_by_decoder_norm=True is not "
                                        "supported: the decoder norms would change the features")
        self.W_enc.mul_(scale_in)
        if self.W_gate is not None:
            self.W_gate.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.skip is not None:
            self.skip.mul_(scale_in / scale_out)

    def extra_state_for_saving(self) -> dict[str, Tensor]:
        """``threshold`` and ``W_skip`` for SAELens's file; architectures SAELens cannot express are refused."""
        if self.architecture not in ("standard", "topk", "jumprelu") or self.rescale_acts_by_decoder_norm \
                or self.reshape_activations != "none":
            raise DictionaryFormatError(f"a {self.architecture} dictionary from {self.source_format} cannot be "
                                        "saved in this project's SAELens format; keep its original files")
        out: dict[str, Tensor] = {}
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach()
        if self.skip is not None:
            out["W_skip"] = self.skip.T.detach()
        return out

    def __repr__(self) -> str:
        kind = "transcoder" if self.transcoder else "SAE"
        return (f"PretrainedDictionary({self.source_format} {self.architecture} {kind}, d_in={self.d_in}, "
                f"d_sae={self.d_sae}, d_out={self.d_out}, hook_in={self.hook_in!r}, hook_out={self.hook_out!r}"
                f"{', skip' if self.skip is not None else ''})")


# ----------------------------------------------------------------------------------------------- helpers
def torch_dtype(name: Any) -> torch.dtype | None:
    """``torch.float32`` etc. from ``"float32"``/``"torch.float32"``/a dtype; ``None`` stays ``None``."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if name not in _DTYPE_NAMES:
            raise DictionaryFormatError(f"dtype={name} is not supported; use one of "
                                        f"{sorted(_DTYPE_NAMES.values())}")
        return name
    s = str(name).removeprefix("torch.")
    for dt, n in _DTYPE_NAMES.items():
        if n == s:
            return dt
    raise DictionaryFormatError(f"dtype={name!r} is not supported; use one of {sorted(_DTYPE_NAMES.values())}")


def check_shapes(tensors: Mapping[str, Tensor | tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 where: str) -> None:
    """Every ``expected`` key present with its shape (a typed error naming the key otherwise); ``tensors`` may
    hold tensors or shapes."""
    for key, shape in expected.items():
        if key not in tensors:
            raise DictionaryFormatError(f"{where} lacks tensor {key!r}")
        value = tensors[key]
        got = tuple(value.shape) if isinstance(value, Tensor) else tuple(value)
        if got != shape:
            raise DictionaryFormatError(f"{where}: {key} has shape {got}, expected {shape}")


def check_no_extra(tensors: dict[str, Any], used: set[str] | dict[str, Any], where: str) -> None:
    extra = sorted(set(tensors) - set(used))
    if extra:
        raise DictionaryFormatError(f"{where} holds tensors this loader does not use: {extra}")


def check_floating(tensors: dict[str, Tensor], where: str, keys: set[str] | None = None) -> None:
    for key, t in tensors.items():
        if (keys is None or key in keys) and not t.is_floating_point():
            raise DictionaryFormatError(f"{where}: {key} has dtype {t.dtype}, expected floating point")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file on CPU (a typed error for a missing or unreadable file)."""
    if not path.is_file():
        raise DictionaryNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryFormatError(f"{path} is not a readable safetensors file: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (typed errors for a missing file, invalid JSON or a non-object)."""
    if not path.is_file():
        raise DictionaryNotFoundError(f"{path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DictionaryFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DictionaryFormatError(f"{path} must hold a JSON object")
    return raw


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DictionaryFormatError(f"{name}={value!r} must be a positive integer")
    return value


def as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise DictionaryFormatError(f"{name}={value!r} must be true or false")
    return value


def is_false(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "none"
