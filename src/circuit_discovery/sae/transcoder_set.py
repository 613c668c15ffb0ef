"""Transcoder sets: what feature graphs replace the MLPs with.

A :class:`TranscoderSet` is either

* **per-layer** transcoders (``per_layer[l]`` reads ``hook_in`` at layer ``l`` and predicts ``hook_out`` at the same
  layer; each may carry an affine skip connection ``skip [d_in, d_out]``, added as ``x @ skip`` to the
  reconstruction, as in Gemma Scope 2 and circuit-tracer's ``W_skip``), or
* one **cross-layer transcoder** (:class:`CrossLayerTranscoder`, circuit-tracer's CLT): features encoded at layer
  ``l`` from ``hook_in`` at ``l`` write to ``hook_out`` at every layer ``l' >= l``.

Hook names are templates with ``{layer}``; the defaults are this project's names for what transcoders read and
write (``blocks.{layer}.mlp.hook_in`` -- the MLP's actual input, after the norm's gain -- and
``blocks.{layer}.hook_mlp_out`` -- what the MLP block adds to the residual stream).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from circuit_discovery.errors import CircuitDiscoveryError

__all__ = ["CrossLayerTranscoder", "DictionaryMismatchError", "TranscoderSet", "DEFAULT_HOOK_IN", "DEFAULT_HOOK_OUT"]

DEFAULT_HOOK_IN = "blocks.{layer}.mlp.hook_in"
DEFAULT_HOOK_OUT = "blocks.{layer}.hook_mlp_out"
ACTIVATIONS = ("relu", "jumprelu", "jumprelu_no_relu", "topk", "topk_relu")


class DictionaryMismatchError(CircuitDiscoveryError, ValueError):
    """A dictionary does not fit the model it is used with (width, layer count or hook); the message says which."""


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder over ``n_layers`` layers (circuit-tracer's CLT layout).

    ``W_enc [n_layers, d_in, d_sae]``, ``b_enc [n_layers, d_sae]``, ``threshold [n_layers, d_sae]`` (JumpReLU),
    ``W_dec[l] [d_sae, n_layers - l, d_out]`` (source layer ``l`` to target layers ``l, l+1, ...``),
    ``b_dec [n_layers, d_out]``, optionally ``skip [n_layers, d_in, d_out]`` (an affine skip connection per layer,
    added as ``x_l @ skip[l]`` to layer ``l``'s reconstruction, as Gemma Scope 2's affine CLTs).
    Activations: ``relu``; ``jumprelu`` (``relu(pre) * (pre > threshold)``, as SAELens and Gemma Scope);
    ``topk`` (the ``k`` largest pre-activations per layer, kept as they are -- no ReLU, as circuit-tracer's TopK);
    ``topk_relu``; ``jumprelu_no_relu`` (``pre * (pre > threshold)``, circuit-tracer's JumpReLU, which keeps a
    negative pre-activation above a negative threshold).
    """

    def __init__(self, n_layers: int, d_in: int, d_sae: int, d_out: int | None = None, *,
                 activation: str = "jumprelu", k: int | None = None, hook_in: str = DEFAULT_HOOK_IN,
                 hook_out: str = DEFAULT_HOOK_OUT, dtype: torch.dtype = torch.float32, skip: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise DictionaryMismatchError(f"unknown CLT activation {activation!r}; use one of {ACTIVATIONS}")
        if activation.startswith("topk") and not k:
            raise DictionaryMismatchError("a TopK cross-layer transcoder needs k > 0")
        d_out = d_in if d_out is None else d_out
        self.n_layers, self.d_in, self.d_sae, self.d_out = n_layers, d_in, d_sae, d_out
        self.activation_name, self.k = activation, k
        self.hook_in, self.hook_out = hook_in, hook_out
        self.W_enc = nn.Parameter(torch.zeros(n_layers, d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae, dtype=dtype))
        self.threshold = nn.Parameter(torch.zeros(n_layers, d_sae, dtype=dtype))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(d_sae, n_layers - l, d_out, dtype=dtype))
                                       for l in range(n_layers)])
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, dtype=dtype))
        self.skip = nn.Parameter(torch.zeros(n_layers, d_in, d_out, dtype=dtype)) if skip else None

    def hidden_pre(self, layer: int, x: Tensor) -> Tensor:
        """Pre-activations ``[..., d_sae]`` of the features encoded at ``layer`` from its input ``x [..., d_in]``."""
        return x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def activation(self, layer: int, pre: Tensor) -> Tensor:
        if self.activation_name == "relu":
            return torch.relu(pre)
        if self.activation_name == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold[layer])
        if self.activation_name == "jumprelu_no_relu":
            return pre * (pre > self.threshold[layer])
        vals, idx = pre.topk(int(self.k or 0), dim=-1)
        if self.activation_name == "topk_relu":
            vals = torch.relu(vals)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def encode(self, layer: int, x: Tensor) -> Tensor:
        return self.activation(layer, self.hidden_pre(layer, x))

    def decoder(self, source: int, target: int) -> Tensor:
        """``[d_sae, d_out]``: how features encoded at ``source`` write to ``hook_out`` at ``target >= source``."""
        if not source <= target < self.n_layers:
            raise DictionaryMismatchError(f"CLT features at layer {source} do not write to layer {target}")
        return self.W_dec[source][:, target - source]

    def decode(self, feats: Mapping[int, Tensor], target: int) -> Tensor:
        """Reconstruction of ``hook_out`` at ``target``: ``b_dec[target] + sum_{s<=target} f[s] @ W_dec[s->t]``."""
        out = self.b_dec[target]
        for s, f in feats.items():
            if s <= target:
                out = out + f.to(self.W_enc.dtype) @ self.decoder(s, target)
        return out

    def forward(self, xs: Mapping[int, Tensor]) -> dict[int, Tensor]:
        """Inputs per layer (all ``n_layers``) to reconstructions per layer (with the skip term when there is one)."""
        feats = {l: self.encode(l, x) for l, x in xs.items()}
        out = {l: self.decode(feats, l) for l in range(self.n_layers)}
        if self.skip is not None:
            out = {l: r + xs[l].to(self.W_enc.dtype) @ self.skip[l] for l, r in out.items()}
        return out

    def __repr__(self) -> str:
        return (f"CrossLayerTranscoder(n_layers={self.n_layers}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"activation={self.activation_name}, skip={self.skip is not None}, {self.hook_in} -> {self.hook_out})")


@dataclass
class TranscoderSet:
    """Per-layer transcoders (``per_layer``) or one cross-layer transcoder (``cross_layer``), with their hooks."""

    per_layer: dict[int, Any] = field(default_factory=dict)
    cross_layer: CrossLayerTranscoder | None = None
    hook_in: str = DEFAULT_HOOK_IN
    hook_out: str = DEFAULT_HOOK_OUT
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.cross_layer is None) == (not self.per_layer):
            raise DictionaryMismatchError("a TranscoderSet holds either per-layer transcoders or one cross-layer "
                                          "transcoder, not both and not neither")

    @property
    def kind(self) -> str:
        """``cross_layer``, ``skip_transcoder`` (any per-layer transcoder has a skip) or ``transcoder``."""
        if self.cross_layer is not None:
            return "cross_layer"
        return "skip_transcoder" if any(getattr(t, "skip", None) is not None for t in self.per_layer.values()) \
            else "transcoder"

    @property
    def layers(self) -> list[int]:
        return list(range(self.cross_layer.n_layers)) if self.cross_layer is not None else sorted(self.per_layer)

    def hook_in_at(self, layer: int) -> str:
        return self.hook_in.format(layer=layer)

    def hook_out_at(self, layer: int) -> str:
        return self.hook_out.format(layer=layer)

    def d_in(self) -> int:
        if self.cross_layer is not None:
            return self.cross_layer.d_in
        return int(next(iter(self.per_layer.values())).W_enc.shape[0])

    def check_model(self, model) -> None:
        """Raise :class:`DictionaryMismatchError` (one line) unless widths, layers and hooks fit ``model``."""
        n, d = model.cfg.n_layers, model.cfg.d_model
        if self.cross_layer is not None and self.cross_layer.n_layers != n:
            raise DictionaryMismatchError(f"the cross-layer transcoder covers {self.cross_layer.n_layers} layers, "
                                          f"{model.cfg.model_name} has {n}; use a dictionary made for this model")
        names = set(model.hook_names())
        for l in self.layers:
            if l >= n:
                raise DictionaryMismatchError(f"{self.source or 'the dictionary'} has a transcoder for layer {l}, "
                                              f"{model.cfg.model_name} has {n} layers; use one made for this model")
            for h in (self.hook_in_at(l), self.hook_out_at(l)):
                if h not in names:
                    raise DictionaryMismatchError(f"{self.source or 'the dictionary'} uses hook {h}, which "
                                                  f"{model.cfg.model_name} does not have (see hook_names())")
            if self.cross_layer is None:
                tc = self.per_layer[l]
                d_in, d_out = int(tc.W_enc.shape[0]), int(tc.W_dec.shape[-1])
                if d_in != d or d_out != d:
                    raise DictionaryMismatchError(
                        f"{self.source or 'the dictionary'}: layer {l} maps {d_in} -> {d_out} dimensions, "
                        f"{model.cfg.model_name} has d_model = {d}; use a dictionary made for this model")
        if self.cross_layer is not None and (self.cross_layer.d_in != d or self.cross_layer.d_out != d):
            raise DictionaryMismatchError(
                f"{self.source or 'the dictionary'}: the cross-layer transcoder maps {self.cross_layer.d_in} -> "
                f"{self.cross_layer.d_out} dimensions, {model.cfg.model_name} has d_model = {d}")
