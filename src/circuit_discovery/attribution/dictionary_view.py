"""The transcoder side of feature attribution graphs (:mod:`circuit_discovery.attribution.feature_graph`): the
frozen replay of a prompt's norms and attention (:class:`FrozenReplay`) and the affine reading of a transcoder set
(:class:`DictionaryView`), which the feature-circuit evaluator (:mod:`circuit_discovery.validation.features`) uses
too.

:class:`FrozenReplay` records every normalisation scale and every attention query/key of one forward pass and
replays them, so that later passes are affine in the residual stream. :class:`DictionaryView` reads a
:class:`TranscoderSet` (per-layer transcoders, with or without skip connections, or a cross-layer transcoder) as
encoder, decoder and skip matrices per layer, after checking its hooks (:data:`IN_HOOKS`, :data:`OUT_HOOKS`) and
that each per-layer dictionary computes those affine maps.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from circuit_discovery.errors import InputError
from circuit_discovery.models.arch import get_module
from circuit_discovery.sae.transcoder_set import CrossLayerTranscoder, DictionaryMismatchError, TranscoderSet

__all__ = ["FrozenReplay", "DictionaryView", "IN_HOOKS", "OUT_HOOKS", "TranscoderDict", "as_transcoder_set",
           "dictionary_view"]


# ------------------------------------------------------------------------------------- freezing
def _norm_modules(model) -> list[nn.Module]:
    """Every RMSNorm/LayerNorm of the model except the MLP-output post-norm (its output is replaced)."""
    skip = set()
    if model.spec.mlp_out != "mlp":
        for layer in model._layers:
            skip.add(id(get_module(layer, model.spec.mlp_out)))
    out = []
    for m in model.hf_model.modules():
        name = type(m).__name__
        if (isinstance(m, nn.LayerNorm) or name.endswith("RMSNorm")) and id(m) not in skip:
            out.append(m)
    return out


def _eps(m: nn.Module) -> float:
    return float(getattr(m, "eps", getattr(m, "variance_epsilon", 1e-6)))


class FrozenReplay:
    """Record norm scales and attention queries/keys in one forward pass, then replay them.

    Inside ``with replay.recording():`` a forward pass (batch 1) stores, for each norm module, the scale
    ``1 / rms(x)`` (or ``1 / std(x)`` for LayerNorm), and each layer's query and key projections. Inside
    ``with replay.replaying(batch):`` every later pass uses those stored values (expanded to ``batch``), so
    norms are linear maps and attention patterns are constants: the network is affine in the residual
    stream, and its gradients are the replacement model's direct effects.
    """

    def __init__(self, model):
        self.model = model
        self.norms = _norm_modules(model)
        self.gamma: dict[int, Tensor] = {}
        for m in self.norms:
            if isinstance(m, nn.LayerNorm):
                continue
            eps = _eps(m)
            with torch.no_grad():
                ones = torch.ones(m.weight.shape[-1] if getattr(m, "weight", None) is not None else model.cfg.d_model,
                                  dtype=torch.float32, device=model.device)
                self.gamma[id(m)] = (m(ones).float() * math.sqrt(1.0 + eps)).detach()
        self.scales: dict[int, Tensor] = {}
        self.qk: dict[tuple[int, str], Tensor] = {}
        self._mode: str | None = None
        self._batch = 1

    # -- norm hooks
    def _norm_hook(self, module, args, output):
        x = args[0]
        key = id(module)
        xf = x.float()
        if isinstance(module, nn.LayerNorm):
            xc = xf - xf.mean(-1, keepdim=True)
            if self._mode == "record":
                self.scales[key] = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + module.eps).detach()
            s = self.scales[key]
            s = s.expand(x.shape[0], *s.shape[1:]) if s.shape[0] != x.shape[0] else s
            y = xc * s
            if module.weight is not None:
                y = y * module.weight.float()
            if module.bias is not None:
                y = y + module.bias.float()
            return y.to(output.dtype)
        if self._mode == "record":
            self.scales[key] = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(module)).detach()
        s = self.scales[key]
        s = s.expand(x.shape[0], *s.shape[1:]) if s.shape[0] != x.shape[0] else s
        return (xf * s * self.gamma[key]).to(output.dtype)

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        """``module``'s input ``x`` normalised with the replayed scale, before the gain (float32; LayerNorm centred):
        ``ln2.hook_normalized`` of the frozen network."""
        s = self.scales[id(module)]
        s = s.expand(x.shape[0], *s.shape[1:]) if s.shape[0] != x.shape[0] else s
        xf = x.float()
        if isinstance(module, nn.LayerNorm):
            xf = xf - xf.mean(-1, keepdim=True)
        return xf * s

    def _qk_hook(self, key, sl, module, args, output):
        if self._mode == "record":
            self.qk[key] = output.detach()[..., sl] if sl is not None else output.detach()
        stored = self.qk[key]
        stored = stored.expand(output.shape[0], *stored.shape[1:]) if stored.shape[0] != output.shape[0] else stored
        if sl is None:
            return stored
        out = output.clone()
        out[..., sl] = stored
        return out

    def _qk_modules(self):
        """(key, module, slice) for every query/key projection."""
        out = []
        d = self.model.cfg.d_model
        for l, layer in enumerate(self.model._layers):
            attn = get_module(layer, self.model.spec.attn)
            if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
                out.append(((l, "q"), attn.q_proj, None))
                out.append(((l, "k"), attn.k_proj, None))
            elif hasattr(attn, "c_attn"):  # GPT-2: one projection [q | k | v]
                out.append(((l, "qk"), attn.c_attn, slice(0, 2 * d)))
            else:
                raise InputError(f"feature graphs do not know how to freeze attention of {type(attn).__name__}")
        return out

    @contextlib.contextmanager
    def _hooks(self, mode: str):
        self._mode = mode
        handles = [m.register_forward_hook(self._norm_hook, prepend=True) for m in self.norms]
        for key, mod, sl in self._qk_modules():
            handles.append(mod.register_forward_hook(
                lambda module, args, output, key=key, sl=sl: self._qk_hook(key, sl, module, args, output),
                prepend=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._mode = None

    def recording(self):
        self.scales.clear()
        self.qk.clear()
        return self._hooks("record")

    def replaying(self):
        if not self.scales:
            raise RuntimeError("FrozenReplay.replaying() needs a recording() pass first")
        return self._hooks("replay")


# ------------------------------------------------------------------------------------- the dictionaries
#: transcoder input hooks feature graphs read (templates) -> how the replayed pass gets them: ``mlp_in`` the MLP
#: norm's output (after the gain), ``normalized`` the norm's input times its frozen scale (before the gain),
#: ``resid`` the residual stream in front of the MLP's norm.
IN_HOOKS = {"blocks.{layer}.mlp.hook_in": "mlp_in", "blocks.{layer}.ln2.hook_normalized": "normalized",
            "blocks.{layer}.hook_resid_mid": "resid", "blocks.{layer}.hook_mlp_in": "resid"}
#: transcoder output hooks feature graphs replace (what the MLP block adds to the residual stream).
OUT_HOOKS = ("blocks.{layer}.hook_mlp_out",)


class TranscoderDict(dict):
    """Per-layer transcoders ``{layer: transcoder}`` that remember their :class:`TranscoderSet` (``.set``: hooks,
    source, metadata such as the dictionary quality): a dict for code that indexes layers, the set for feature
    graphs."""

    def __init__(self, ts: TranscoderSet):
        if ts.cross_layer is not None:
            raise InputError("a cross-layer transcoder has no per-layer dictionaries; pass its TranscoderSet")
        super().__init__(sorted(ts.per_layer.items()))
        self.set = ts


def as_transcoder_set(transcoders: Any) -> TranscoderSet:
    """``transcoders`` as a :class:`TranscoderSet`: a set as it is, a :class:`CrossLayerTranscoder` or a
    ``{layer: transcoder}`` mapping (per-layer, default hooks ``blocks.{layer}.mlp.hook_in -> hook_mlp_out``)."""
    if isinstance(transcoders, (DictionaryView, TranscoderDict)):
        return transcoders.set
    if isinstance(transcoders, TranscoderSet):
        return transcoders
    if isinstance(transcoders, CrossLayerTranscoder):
        return TranscoderSet(cross_layer=transcoders, hook_in=transcoders.hook_in, hook_out=transcoders.hook_out)
    if isinstance(transcoders, Mapping):
        if not transcoders:
            raise InputError("feature graphs need at least one transcoder; train them with "
                             "circuit_discovery.sae.train_transcoders(model)")
        return TranscoderSet(per_layer={int(l): tc for l, tc in transcoders.items()})
    raise InputError(f"feature graphs take a TranscoderSet or {{layer: transcoder}}, not {type(transcoders).__name__}")


def _hook_of(tc: Any, key: str) -> str | None:
    """The hook a per-layer dictionary declares (``hook_in``/``hook_out`` or SAELens metadata), if any."""
    attr = getattr(tc, key, None)
    if isinstance(attr, str):
        return attr
    meta = getattr(getattr(tc, "cfg", None), "metadata", None) or {}
    v = meta.get("hook_name" if key == "hook_in" else "hook_name_out")
    return v if isinstance(v, str) else None


class DictionaryView:
    """The affine reading of a transcoder set that feature graphs and the feature-circuit evaluator use.

    For every source layer ``s`` a feature's *input* is ``x_s @ W_enc[s][:, f]`` (its pre-activation minus the
    effective encoder bias ``b_enc[s]``; ``apply_b_dec_to_input`` and ``rescale_acts_by_decoder_norm`` are folded
    into ``W_enc``/``b_enc``/the decoder), its activation is the dictionary's own ``encode`` (ReLU, JumpReLU, TopK
    with or without ReLU: the selection is whatever ``encode`` picked on the prompt), and it writes
    ``a * dec(s, t)[f]`` to ``hook_mlp_out`` at every target layer ``t`` of :meth:`targets` (``[s]`` for per-layer
    transcoders, ``s .. L-1`` for a cross-layer transcoder). Layer ``t``'s replacement MLP output is
    ``b_dec[t] + sum_s a_s dec(s, t) + x_t @ skip[t]`` (the skip term only where the transcoder has one).

    Built from a :class:`TranscoderSet`, a :class:`CrossLayerTranscoder` or ``{layer: transcoder}``; checks the
    hooks (:data:`IN_HOOKS`, :data:`OUT_HOOKS`), the layers and, numerically on random inputs, that each per-layer
    dictionary's ``hidden_pre`` and ``decode`` are the affine maps read here (a dictionary with some other
    computation raises :class:`DictionaryMismatchError` instead of giving wrong graphs).
    """

    def __init__(self, model, transcoders: Any):
        ts = as_transcoder_set(transcoders)
        self.set = ts
        self.clt: CrossLayerTranscoder | None = ts.cross_layer
        L, d = model.cfg.n_layers, model.cfg.d_model
        self.n_layers = L
        where = ts.source or "the dictionary"
        if ts.hook_in not in IN_HOOKS:
            raise DictionaryMismatchError(f"{where} reads {ts.hook_in}; feature graphs read transcoders at "
                                          f"{', '.join(IN_HOOKS)}")
        if ts.hook_out not in OUT_HOOKS:
            raise DictionaryMismatchError(f"{where} writes {ts.hook_out}; feature graphs replace "
                                          f"{', '.join(OUT_HOOKS)} (what the MLP block adds to the residual)")
        self.hook_in, self.hook_out = ts.hook_in, ts.hook_out
        self.in_kind = IN_HOOKS[ts.hook_in]
        if self.clt is not None and self.clt.n_layers != L:
            raise DictionaryMismatchError(f"{where}: the cross-layer transcoder covers {self.clt.n_layers} layers, "
                                          f"the model has {L}; use one made for this model")
        self.layers = sorted(int(l) for l in ts.layers)
        for l in self.layers:
            if not 0 <= l < L:
                raise InputError(f"transcoder layer {l} out of range for a {L}-layer model")
        self.W_enc: dict[int, Tensor] = {}
        self.b_enc: dict[int, Tensor] = {}
        self.b_dec: dict[int, Tensor] = {}
        self.skip: dict[int, Tensor] = {}
        self.d_sae: dict[int, int] = {}
        self._W_dec: dict[int, Tensor] = {}
        if self.clt is not None:
            c = self.clt
            if c.d_in != d or c.d_out != d:
                raise DictionaryMismatchError(f"{where}: the cross-layer transcoder maps {c.d_in} -> {c.d_out} "
                                              f"dimensions, the model has d_model = {d}")
            for l in range(L):
                self.W_enc[l] = c.W_enc[l].detach().float()
                self.b_enc[l] = c.b_enc[l].detach().float()
                self.b_dec[l] = c.b_dec[l].detach().float()
                self.d_sae[l] = c.d_sae
                if c.skip is not None:  # Gemma Scope 2's affine CLTs: x_l @ skip[l], a direct path like per-layer
                    self.skip[l] = c.skip[l].detach().float()
            self.activation = c.activation_name
        else:
            acts = set()
            for l in self.layers:
                tc = ts.per_layer[l]
                self._read_per_layer(l, tc, where, d)
                acts.add(str(getattr(tc, "architecture", None) or getattr(tc.cfg, "architecture", "?")))
            self.activation = "/".join(sorted(acts))

    def _read_per_layer(self, l: int, tc: Any, where: str, d: int) -> None:
        cfg = getattr(tc, "cfg", None)
        if not getattr(cfg, "transcoder", False):
            raise InputError(f"the dictionary at layer {l} is an SAE, not a transcoder; feature graphs need "
                             "transcoders (mlp.hook_in -> hook_mlp_out)")
        for key, template in (("hook_in", self.hook_in), ("hook_out", self.hook_out)):
            declared = _hook_of(tc, key)
            if declared is not None and declared != template.format(layer=l):
                raise DictionaryMismatchError(f"{where}: the transcoder at layer {l} declares {key} {declared}, the "
                                              f"set uses {template.format(layer=l)}; load it with its own hooks")
        W_enc, b_enc = tc.W_enc.detach().float(), tc.b_enc.detach().float()
        W_dec, b_dec = tc.W_dec.detach().float(), tc.b_dec.detach().float()
        if W_enc.shape[0] != d or W_dec.shape[-1] != d:
            raise DictionaryMismatchError(f"{where}: layer {l} maps {W_enc.shape[0]} -> {W_dec.shape[-1]} "
                                          f"dimensions, the model has d_model = {d}")
        if getattr(cfg, "apply_b_dec_to_input", False):
            b_enc = b_enc - b_dec @ W_enc
        if getattr(tc, "rescale_acts_by_decoder_norm", False):
            nrm = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * nrm, b_enc * nrm, W_dec / nrm[:, None]
        skip = getattr(tc, "skip", None)
        self.W_enc[l], self.b_enc[l], self._W_dec[l], self.b_dec[l] = W_enc, b_enc, W_dec, b_dec
        self.d_sae[l] = int(W_enc.shape[1])
        if skip is not None:
            self.skip[l] = skip.detach().float()
        self._check_affine(l, tc, where)

    @torch.no_grad()
    def _check_affine(self, l: int, tc: Any, where: str) -> None:
        """``hidden_pre(x) == x @ W_enc + b_enc`` and ``decode(f) == f @ W_dec + b_dec`` on random inputs."""
        if not hasattr(tc, "hidden_pre") or not hasattr(tc, "decode"):
            raise DictionaryMismatchError(f"{where}: the transcoder at layer {l} has no hidden_pre/decode; feature "
                                          "graphs need both")
        gen = torch.Generator().manual_seed(l)
        W = self.W_enc[l]
        x = torch.randn(3, W.shape[0], generator=gen)
        f = torch.randn(3, self.d_sae[l], generator=gen) * (torch.rand(3, self.d_sae[l], generator=gen) < 0.05)
        dt = tc.W_enc.dtype
        tol = 1e-4 if dt in (torch.float32, torch.float64) else 3e-2
        dev = tc.W_enc.device
        pre = tc.hidden_pre(x.to(device=dev, dtype=dt)).float().cpu()
        want = x @ W.cpu() + self.b_enc[l].cpu()
        rec = tc.decode(f.to(device=dev, dtype=dt)).float().cpu()
        want_rec = f @ self._W_dec[l].cpu() + self.b_dec[l].cpu()
        for got, ref, what in ((pre, want, "pre-activations"), (rec, want_rec, "decoder")):
            if float((got - ref).abs().max()) > tol * max(1.0, float(ref.abs().max())):
                raise DictionaryMismatchError(f"{where}: the transcoder at layer {l} computes its {what} in a way "
                                              "feature graphs do not read (not affine in W_enc/W_dec); report this "
                                              "dictionary format")

    # -- reading
    @property
    def kind(self) -> str:
        """``topk_transcoder``, ``jumprelu_skip_transcoder``, ... for per-layer sets; ``clt`` (activation
        :attr:`activation`) for a cross-layer transcoder."""
        if self.clt is not None:
            return "clt"
        return f"{self.activation}_{'skip_' if self.skip else ''}transcoder"

    @property
    def out_layers(self) -> list[int]:
        """Layers whose MLP output is replaced (has ``b_dec``); the others are whole error nodes."""
        return list(range(self.n_layers)) if self.clt is not None else list(self.layers)

    def targets(self, s: int) -> list[int]:
        """Layers a feature encoded at ``s`` writes to."""
        return list(range(s, self.n_layers)) if self.clt is not None else [s]

    def dec(self, s: int, t: int) -> Tensor:
        """``[d_sae, d_model]``: how features encoded at ``s`` write to ``hook_mlp_out`` at ``t``."""
        if self.clt is not None:
            return self.clt.decoder(s, t).detach().float()
        if s != t:
            raise InputError(f"per-layer transcoder features at layer {s} do not write to layer {t}")
        return self._W_dec[s]

    def encode(self, l: int, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` (float32) of the features encoded at ``l`` from ``x [..., d_in]``."""
        if self.clt is not None:
            return self.clt.encode(l, x.to(self.clt.W_enc.dtype)).float()
        tc = self.set.per_layer[l]
        return tc.encode(x.to(device=tc.W_enc.device, dtype=tc.W_enc.dtype)).float().to(x.device)

    def decode_to(self, t: int, acts: Mapping[int, Tensor], with_bias: bool = True) -> Tensor:
        """What the features in ``acts`` (``{source layer: [..., d_sae]}``) write to layer ``t`` (+ ``b_dec[t]``)."""
        out: Tensor | None = None
        for s, a in acts.items():
            if s <= t and t in self.targets(s):
                part = a.float() @ self.dec(s, t)
                out = part if out is None else out + part
        if out is None:
            raise InputError(f"no features write to layer {t}")
        return out + self.b_dec[t] if with_bias and t in self.b_dec else out

    def skip_out(self, l: int, x: Tensor) -> Tensor | None:
        """The skip term ``x @ skip[l]`` of layer ``l`` (None without a skip)."""
        return x.float() @ self.skip[l] if l in self.skip else None

    def direction(self, l: int, f: int) -> Tensor:
        """``[d_model]``: feature ``f`` of layer ``l``'s total write to the residual stream (its decoder rows summed
        over its target layers)."""
        return torch.stack([self.dec(l, t)[f] for t in self.targets(l)]).sum(0)

    def module(self, l: int) -> Any:
        """The object holding layer ``l``'s features (a per-layer transcoder, or the cross-layer transcoder)."""
        return self.clt if self.clt is not None else self.set.per_layer[l]

    def in_hook(self, l: int) -> str:
        return self.hook_in.format(layer=l)


def dictionary_view(model, transcoders: Any) -> DictionaryView:
    """``transcoders`` as a :class:`DictionaryView` (a view is returned as it is)."""
    return transcoders if isinstance(transcoders, DictionaryView) else DictionaryView(model, transcoders)
