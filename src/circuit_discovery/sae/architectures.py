"""Sparse autoencoder (and transcoder) architectures behind one registry.

Every architecture shares SAELens's parameter names and shapes::

    W_enc  [d_in, d_sae]     b_enc [d_sae]
    W_dec  [d_sae, d_out]    b_dec [d_out]        (d_out == d_in for an SAE)
    threshold [d_sae]                             (jumprelu only)
    W_skip [d_out, d_in]                          (transcoders with ``skip=True`` only; SAELens's layout)

and the same interface::

    feats = sae.encode(x)            # x [..., d_in]  -> feats [..., d_sae]
    recon = sae.decode(feats)        # feats [..., d_sae] -> recon [..., d_out]
    out = sae(x, target=None, dead_mask=None)   # SAEForwardOutput(recon, feats, aux_losses)

``aux_losses`` holds the *unweighted* architecture-specific penalties (``l1`` for ``standard``,
``auxk`` for ``topk``, ``l0`` for ``jumprelu``); the trainer multiplies them by coefficients.

A *transcoder* is the same module with ``d_out`` set and ``transcoder=True``: it encodes the MLP's
input (``blocks.{l}.mlp.hook_in``) and decodes to the MLP's output (``blocks.{l}.hook_mlp_out``);
``b_dec`` lives in the output space and is therefore never subtracted from the input. A transcoder with
``skip=True`` also has an affine skip connection (Gemma Scope 2, SAELens ``skip_transcoder`` /
``jumprelu_skip_transcoder``, circuit-tracer ``W_skip``): ``forward``'s reconstruction adds ``x @ sae.skip``
(``sae.skip = W_skip.T``, ``[d_in, d_out]``); ``decode(feats)`` does not (as SAELens), and
:meth:`SparseAutoencoder.reconstruct` does. ``sae.skip`` is ``None`` without a skip connection.

New architectures are added with :func:`register_sae`::

    @register_sae("myarch")
    class MySAE(SparseAutoencoder): ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "SAE_REGISTRY",
    "SAEConfig",
    "SAEForwardOutput",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "JumpReLUSAE",
    "register_sae",
    "create_sae",
    "geometric_median",
    "auxk_loss",
    "batch_topk",
]

SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register_sae(name: str) -> Callable[[type[SparseAutoencoder]], type[SparseAutoencoder]]:
    """Class decorator adding an architecture to :data:`SAE_REGISTRY` under ``name``."""

    def deco(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in SAE_REGISTRY and SAE_REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture {name!r} is already registered to {SAE_REGISTRY[name].__name__}")
        cls.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class SAEConfig:
    """Shape and inference-time options of one SAE or transcoder.

    ``d_sae`` defaults to ``expansion_factor * d_in``; ``d_out`` defaults to ``d_in``.
    ``metadata`` carries SAELens's metadata keys (``model_name``, ``hook_name``, ``context_size``,
    and for transcoders ``hook_name_out``).
    """

    d_in: int
    d_sae: int | None = None
    architecture: str = "standard"
    expansion_factor: int = 4
    d_out: int | None = None
    transcoder: bool = False
    k: int | None = None  # topk: active latents per token
    apply_b_dec_to_input: bool | None = None  # None -> True for SAEs, False for transcoders
    normalize_activations: str = "none"
    dtype: str = "float32"
    decoder_init_norm: float = 0.1
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    skip: bool = False  # transcoders only: affine skip connection W_skip [d_out, d_in]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.d_in, int) or self.d_in <= 0:
            raise ValueError(f"d_in must be a positive int, got {self.d_in!r}")
        if self.d_sae is None:
            if self.expansion_factor <= 0:
                raise ValueError(f"expansion_factor must be positive, got {self.expansion_factor}")
            self.d_sae = int(self.expansion_factor * self.d_in)
        if self.d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.transcoder
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ValueError("apply_b_dec_to_input needs d_out == d_in (b_dec is subtracted from the input)")
        if self.architecture not in SAE_REGISTRY:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; registered: {sorted(SAE_REGISTRY)}")
        if self.architecture == "topk":
            if self.k is None:
                self.k = 32
            if not 0 < int(self.k) <= self.d_sae:
                raise ValueError(f"topk needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.skip and not self.transcoder:
            raise ValueError("skip=True needs transcoder=True (a skip connection maps the input hook to the output)")
        if self.normalize_activations != "none":
            raise ValueError(
                "only normalize_activations='none' is supported at inference; the trainer folds its "
                "norm scaling factor into the weights before saving"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAEForwardOutput(NamedTuple):
    recon: Tensor  # [..., d_out]
    feats: Tensor  # [..., d_sae]
    aux_losses: dict[str, Tensor]  # scalar tensors, unweighted


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Geometric median of ``points`` [n, d] by Weiszfeld's algorithm -> [d] (float64 internally)."""
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] tensor, got shape {tuple(points.shape)}")
    p = points.double()
    y = p.mean(0)
    for _ in range(max_iter):
        dist = (p - y).norm(dim=-1).clamp_min(1e-12)
        w = 1.0 / dist
        y_new = (w[:, None] * p).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, y.norm().item()):
            y = y_new
            break
        y = y_new
    return y.to(points.dtype)


class SparseAutoencoder(nn.Module):
    """Base class: linear encoder, architecture-specific activation, linear decoder."""

    architecture: str = "base"

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        assert d_sae is not None and d_out is not None  # filled in by SAEConfig.__post_init__
        dt = cfg.torch_dtype
        # Decoder rows: random directions of norm decoder_init_norm; encoder = decoder transpose
        # when the spaces coincide (Anthropic's April 2024 initialisation).
        w_dec = torch.randn(d_sae, d_out, generator=generator, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
        if d_in == d_out:
            w_enc = w_dec.T.clone()
        else:
            w_enc = torch.randn(d_in, d_sae, generator=generator, dtype=torch.float32)
            w_enc = w_enc / w_enc.norm(dim=0, keepdim=True) * cfg.decoder_init_norm
        self.W_enc = nn.Parameter(w_enc.to(dt).contiguous())
        self.W_dec = nn.Parameter(w_dec.to(dt).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dt))
        if cfg.skip:  # zero-initialised, as SAELens's SkipTranscoder
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dt))

    # ----------------------------------------------------------------- inference
    def hidden_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [..., d_sae] of input ``x`` [..., d_in]."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected input with last dim d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, hidden_pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae] of ``x`` [..., d_in]."""
        return self.activation(self.hidden_pre(x))

    def decode(self, feats: Tensor) -> Tensor:
        """Reconstruction [..., d_out] from feature activations [..., d_sae]."""
        if feats.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"expected features with last dim d_sae={self.cfg.d_sae}, got {tuple(feats.shape)}")
        return feats @ self.W_dec + self.b_dec

    def skip_out(self, x: Tensor) -> Tensor | None:
        """The skip connection's contribution ``x @ skip`` [..., d_out] to the reconstruction, or ``None``."""
        skip = getattr(self, "skip", None)
        if skip is None:
            return None
        return x.to(skip.dtype) @ skip

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruction [..., d_out] of ``x`` [..., d_in]: ``decode(encode(x))`` plus the skip term, if any."""
        recon = self.decode(self.encode(x))
        s = self.skip_out(x)
        return recon if s is None else recon + s

    def forward(self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None) -> SAEForwardOutput:
        """``x`` [..., d_in]; ``target`` [..., d_out] (defaults to ``x``); ``dead_mask`` [d_sae] bool.

        ``recon`` includes the skip term (``x @ skip``) when the transcoder has one."""
        pre = self.hidden_pre(x)
        feats = self.activation(pre)
        recon = self.decode(feats)
        s = self.skip_out(x)
        if s is not None:
            recon = recon + s
        aux = self.aux_losses(x, target if target is not None else x, pre, feats, recon, dead_mask)
        return SAEForwardOutput(recon, feats, aux)

    def aux_losses(
        self, x: Tensor, target: Tensor, pre: Tensor, feats: Tensor, recon: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        return {}

    # ----------------------------------------------------------------- training helpers
    @torch.no_grad()
    def initialize_b_dec(self, data: Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` from output-space data [n, d_out]: ``geometric_median``, ``mean`` or ``zeros``."""
        if method == "zeros":
            self.b_dec.zero_()
        elif method == "mean":
            self.b_dec.copy_(data.double().mean(0).to(self.b_dec.dtype))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(data.double()).to(self.b_dec.dtype))
        else:
            raise ValueError(f"unknown b_dec init method {method!r}; use geometric_median, mean or zeros")

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale_in: float, scale_out: float | None = None) -> None:
        """Rewrite weights trained on ``x * scale_in -> y * scale_out`` to act on raw activations.

        Feature activations are unchanged; the reconstruction is divided by ``scale_out`` (the skip matrix, which
        maps the scaled input to the scaled output, is multiplied by ``scale_in / scale_out``).
        """
        scale_out = scale_in if scale_out is None else scale_out
        if self.cfg.apply_b_dec_to_input and scale_in != scale_out:
            raise ValueError("apply_b_dec_to_input needs scale_in == scale_out")
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.cfg.skip:
            self.W_skip.mul_(scale_in / scale_out)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the component of ``W_dec.grad`` along each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * w).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * w)

    def extra_state_for_saving(self) -> dict[str, Tensor]:
        """Tensors beyond W_enc/W_dec/b_enc/b_dec written to ``sae_weights.safetensors`` (``W_skip`` if any)."""
        return {"W_skip": self.W_skip.detach()} if self.cfg.skip else {}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        if self.cfg.skip:
            if "W_skip" not in tensors:
                raise KeyError("skip transcoder weights need a 'W_skip' tensor")
            w = tensors["W_skip"]
            if tuple(w.shape) != tuple(self.W_skip.shape):
                raise ValueError(f"W_skip has shape {tuple(w.shape)}, cfg.json implies {tuple(self.W_skip.shape)}")
            with torch.no_grad():
                self.W_skip.copy_(w.to(self.W_skip.dtype))

    def __repr__(self) -> str:
        c = self.cfg
        kind = ("skip transcoder" if c.skip else "transcoder") if c.transcoder else "SAE"
        return f"{type(self).__name__}({kind}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out})"


class _OwnSkip:
    """``skip`` for the trainable architectures: ``W_skip.T`` [d_in, d_out] or ``None`` (a property, so that
    :class:`~circuit_discovery.sae.pretrained.PretrainedDictionary`, which stores ``skip`` as a buffer, is
    unaffected)."""

    @property
    def skip(self) -> Tensor | None:
        w = self.__dict__.get("_parameters", {}).get("W_skip")
        return None if w is None else w.T


@register_sae("standard")
class StandardSAE(_OwnSkip, SparseAutoencoder):
    """ReLU SAE with an L1 penalty weighted by decoder row norms: ``sum_i f_i * ||W_dec[i]||``.

    Weighting by the decoder norm makes the penalty invariant to rescaling a latent, so decoder rows
    need no re-normalisation (Anthropic, April 2024 update; SAELens ``standard``).
    """

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre)

    def aux_losses(self, x, target, pre, feats, recon, dead_mask):
        l1 = (feats * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return {"l1": l1}


@register_sae("topk")
class TopKSAE(_OwnSkip, SparseAutoencoder):
    """Keeps the ``k`` largest ReLU pre-activations per token (Gao et al. 2024).

    Decoder rows are kept at unit norm by the trainer. Dead latents get gradient from the AuxK loss:
    the ``k_aux`` largest pre-activations among dead latents reconstruct the residual error,
    normalised by the error's variance (``auxk``).
    """

    def activation(self, hidden_pre: Tensor) -> Tensor:
        assert self.cfg.k is not None  # filled in by SAEConfig.__post_init__ (topk)
        k = int(self.cfg.k)
        vals, idx = hidden_pre.topk(k, dim=-1)
        return torch.zeros_like(hidden_pre).scatter(-1, idx, torch.relu(vals))

    def aux_losses(self, x, target, pre, feats, recon, dead_mask):
        return {"auxk": auxk_loss(self, target, pre, recon, dead_mask)}


def auxk_loss(sae: SparseAutoencoder, target: Tensor, pre: Tensor, recon: Tensor, dead_mask: Tensor | None) -> Tensor:
    """AuxK (Gao et al. 2024): the ``d_in // 2`` largest pre-activations among dead latents reconstruct the residual
    ``target - recon``; squared error normalised by the residual's variance (0 without dead latents)."""
    if dead_mask is None or not bool(dead_mask.any()):
        return pre.new_zeros(())
    n_dead = int(dead_mask.sum())
    k_aux = min(max(sae.cfg.d_in // 2, 1), n_dead)
    residual = (target - recon).detach()
    masked = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k_aux, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    recon_err = acts @ sae.W_dec  # no bias: predicts the residual
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    auxk = (recon_err - residual).pow(2).sum(-1).mean() / denom
    return torch.nan_to_num(auxk, nan=0.0)


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """BatchTopK (Bussmann et al. 2024): keep the ``k * n_tokens`` largest ReLU pre-activations of the whole batch
    ``pre`` [..., d_sae] (so each token keeps ``k`` on average), zero the rest."""
    acts = torch.relu(pre)
    flat = acts.reshape(-1)
    n_keep = min(int(k) * (flat.numel() // pre.shape[-1]), flat.numel())
    vals, idx = flat.topk(n_keep)
    return torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)


class _JumpReLUFn(torch.autograd.Function):
    """JumpReLU with a straight-through (rectangle-kernel) gradient for the threshold."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = grad_out * (x > threshold)
        rect = ((x - threshold).abs() < bw / 2).to(x.dtype)
        grad_t = (-(threshold / bw) * rect * grad_out).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_t, None


class _StepFn(torch.autograd.Function):
    """Heaviside step ``x > threshold`` with a straight-through gradient for the threshold."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        rect = ((x - threshold).abs() < bw / 2).to(x.dtype)
        grad_t = (-(1.0 / bw) * rect * grad_out).reshape(-1, x.shape[-1]).sum(0)
        return torch.zeros_like(x), grad_t, None


@register_sae("jumprelu")
class JumpReLUSAE(_OwnSkip, SparseAutoencoder):
    """JumpReLU SAE or transcoder (Rajamanoharan et al. 2024): ``f = z * (z > threshold)``, ``z = x W_enc + b_enc``
    (equal to SAELens's ``relu(z) * (z > threshold)`` since ``threshold > 0``).

    Trained with an L0 penalty whose gradient reaches the threshold through the straight-through estimator (a
    rectangle kernel of width ``jumprelu_bandwidth``), as SAELens and Gemma Scope; the trainer's recipe (threshold
    initialisation at a target L0, adaptive L0 coefficient) is in :mod:`circuit_discovery.sae.training`.
    Saved as SAELens ``jumprelu`` / ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``. The threshold is
    stored as ``log_threshold`` while training and saved as ``threshold``.
    """

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        assert cfg.d_sae is not None  # filled in by SAEConfig.__post_init__
        init = torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold), dtype=cfg.torch_dtype)
        self.log_threshold = nn.Parameter(init.log())
        #: training only: BatchTopK with this k replaces the JumpReLU while ``self.training`` (the trainer then sets
        #: the threshold from the batches' smallest kept activations, SAELens's BatchTopK -> JumpReLU recipe)
        self.batchtopk_k: int | None = None

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def set_threshold(self, threshold: Tensor) -> None:
        """Set the threshold [d_sae] (values below 1e-12 are raised to 1e-12: the threshold is positive)."""
        self.log_threshold.copy_(threshold.to(self.log_threshold.dtype).clamp_min(1e-12).log())

    def activation(self, hidden_pre: Tensor) -> Tensor:
        if self.training and self.batchtopk_k:
            return batch_topk(hidden_pre, self.batchtopk_k)
        if self.training and torch.is_grad_enabled():
            return _JumpReLUFn.apply(torch.relu(hidden_pre), self.threshold, self.cfg.jumprelu_bandwidth)
        return hidden_pre * (hidden_pre > self.threshold)

    def aux_losses(self, x, target, pre, feats, recon, dead_mask):
        if self.training and self.batchtopk_k:
            return {"auxk": auxk_loss(self, target, pre, recon, dead_mask)}
        l0 = _StepFn.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return {"l0": l0}

    def extra_state_for_saving(self) -> dict[str, Tensor]:
        return {**super().extra_state_for_saving(), "threshold": self.threshold.detach()}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        super().load_extra_state(tensors)
        if "threshold" not in tensors:
            raise KeyError("jumprelu weights need a 'threshold' tensor")
        self.set_threshold(tensors["threshold"])

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale_in: float, scale_out: float | None = None) -> None:
        super().fold_activation_norm_scaling_factor(scale_in, scale_out)  # feats unchanged -> threshold kept


def create_sae(cfg: SAEConfig, seed: int | None = None) -> SparseAutoencoder:
    """Instantiate the registered class for ``cfg.architecture`` (seeded init when ``seed`` given)."""
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    return SAE_REGISTRY[cfg.architecture](cfg, generator=gen)
