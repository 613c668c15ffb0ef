"""Training several SAEs / transcoders from one stream of activations.

>>> cfgs = [SAETrainConfig("blocks.6.hook_resid_post"),
...         SAETrainConfig("blocks.6.mlp.hook_in", hook_name_out="blocks.6.hook_mlp_out")]
>>> results = train_saes(acts, cfgs)           # acts: {hook: Tensor[n, d]} or an iterator of such batches
>>> results["blocks.6.hook_resid_post"].sae

Recipe (SAELens / Anthropic April 2024 defaults, adapted to small budgets):

* inputs (and transcoder targets) are scaled by a constant so that ``E||x|| = sqrt(d)``
  (``normalize_activations="expected_average_only_in"``); the constant is folded into the weights at
  the end, so the returned/saved SAE acts on raw activations;
* ``b_dec`` initialised at the geometric median of the first batch (targets for transcoders);
* loss = ``sum_d (recon - target)^2`` averaged over tokens + the architecture's penalty:
  ``l1_coefficient * sum_i f_i ||W_dec[i]||`` (standard, coefficient warmed up linearly),
  ``aux_k_coefficient * auxk`` (topk, dead latents), ``l0_coefficient * l0`` (jumprelu);
* jumprelu, ``jumprelu_recipe="batchtopk"`` (the default; SAELens's ``batchtopk`` training architecture, which it
  saves as ``jumprelu``): while training, the ``k * batch`` largest ReLU pre-activations of the batch are kept
  (BatchTopK, AuxK for dead latents, unit-norm decoder rows as topk); the threshold (one value for every latent)
  follows the smallest kept activation of each batch (moving average, rate 0.05), and inference is the JumpReLU
  ``z * (z > threshold)``, whose L0 on held-out tokens is close to ``k``;
* jumprelu, ``jumprelu_recipe="l0_ste"`` (Gemma Scope / SAELens JumpReLU recipe: the L0 penalty reaches the
  threshold through the straight-through estimator, rectangle kernel of width ``jumprelu_bandwidth``): with
  ``target_l0`` set, each latent's threshold starts at the quantile of its pre-activations on the first batch at
  which it fires on ``target_l0 / d_sae`` of the tokens (so training starts at the target L0 instead of near
  ``d_sae / 2``), the threshold gets ``threshold_lr_multiplier`` times the learning rate, and the L0 coefficient
  is adapted every step, ``l0_coefficient *= exp(l0_adapt_rate * (L0 / target_l0 - 1))``;
* ``skip=True`` (transcoders): an affine skip connection ``W_skip`` (zero-initialised, as SAELens) trained with
  the rest; the reconstruction is ``decode(f) + x @ W_skip.T``;
* Adam, linear lr warm-up, constant, linear decay to zero over the last ``lr_decay_fraction``;
  gradient norm clipped at 1;
* dead latents (no activation over ``dead_feature_window`` tokens) are resampled for ``standard``
  (towards badly reconstructed tokens) and trained by AuxK for ``topk``.

Deterministic on CPU for a fixed seed; ``checkpoint_every`` writes safetensors + JSON checkpoints that
:func:`train_saes` resumes from, bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from circuit_discovery.errors import InputError
from circuit_discovery.io import atomic_dir, atomic_write_json, read_json
from circuit_discovery.sae.architectures import SAE_REGISTRY, SAEConfig, SparseAutoencoder, create_sae

__all__ = ["SAETrainConfig", "TrainResult", "train_saes", "train_saes_on_model", "ActivationSource"]

ActivationSource = Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]]

log = logging.getLogger(__name__)


@dataclass
class SAETrainConfig:
    """How to train one SAE (``hook_name_out=None``) or transcoder (``hook_name_out`` set).

    Defaults (TopK, k=64, d_sae = 4 x d_in, lr 1e-3, 100k training tokens in batches of 1024) are the
    ones measured on Gemma 3 270M in ``docs/sae.md``: on held-out tokens of the built-in corpus they
    meet explained_variance >= 0.8, ce_loss_score >= 0.85, dead_fraction <= 0.1, L0 <= 64 at the middle
    layer. ``architecture="standard"`` (ReLU + L1, the seed's recipe) works but needs its
    ``l1_coefficient`` tuned per model and several times the tokens for the same L0; ``"jumprelu"`` is trained by
    BatchTopK (``k`` on average) and saved as a JumpReLU (``jumprelu_recipe="batchtopk"``); Gemma Scope's L0
    penalty recipe (``"l0_ste"``) does not converge at budgets of ~100 steps (``docs/sae.md``).
    """

    hook_name: str
    hook_name_out: str | None = None
    architecture: str = "topk"
    expansion_factor: int = 4
    d_sae: int | None = None
    k: int = 64  # topk
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    l1_coefficient: float = 5.0  # standard
    l1_warm_up_fraction: float = 0.05
    l0_coefficient: float = 0.05  # jumprelu
    aux_k_coefficient: float = 1.0 / 32  # topk
    lr_warm_up_fraction: float = 0.02
    lr_decay_fraction: float = 0.2
    train_batch_size_tokens: int = 1024
    training_tokens: int = 100_000
    seed: int = 42
    checkpoint_every: int | None = None  # steps
    b_dec_init_method: str = "geometric_median"
    normalize_activations: str = "expected_average_only_in"
    dead_feature_window: int = 20_000  # tokens without firing after which a latent counts as dead
    resample_dead: bool = True  # standard only
    resample_until_fraction: float = 0.6
    max_grad_norm: float = 1.0
    log_every: int = 10
    model_name: str | None = None
    context_size: int | None = None
    # fields below are left out of to_dict() (hence of cache keys) while at their defaults
    skip: bool = False  # transcoders: affine skip connection (SAELens skip_transcoder / jumprelu_skip_transcoder)
    target_l0: float | None = None  # jumprelu: threshold init + adaptive l0_coefficient towards this L0
    l0_adapt_rate: float = 0.05
    jumprelu_bandwidth: float = 0.001
    threshold_lr_multiplier: float = 1.0
    jumprelu_recipe: str = "batchtopk"  # jumprelu: "batchtopk" (k on average) or "l0_ste" (L0 penalty)

    def __post_init__(self) -> None:
        if self.architecture not in SAE_REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; registered: {sorted(SAE_REGISTRY)}")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ValueError("normalize_activations must be 'none' or 'expected_average_only_in'")
        for name in ("lr", "train_batch_size_tokens", "training_tokens", "dead_feature_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.training_tokens < self.train_batch_size_tokens:
            raise ValueError("training_tokens must be at least train_batch_size_tokens")
        if self.skip and self.hook_name_out is None:
            raise ValueError("skip=True needs a transcoder (set hook_name_out)")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be positive, got {self.target_l0}")
        if self.jumprelu_recipe not in JUMPRELU_RECIPES:
            raise ValueError(f"jumprelu_recipe must be one of {JUMPRELU_RECIPES}, got {self.jumprelu_recipe!r}")
        if self.jumprelu_bandwidth <= 0 or self.threshold_lr_multiplier <= 0:
            raise ValueError("jumprelu_bandwidth and threshold_lr_multiplier must be positive")

    @property
    def key(self) -> str:
        """Name of this SAE in results: the hook, or ``"in->out"`` for a transcoder."""
        return self.hook_name if self.hook_name_out is None else f"{self.hook_name}->{self.hook_name_out}"

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out is not None

    @property
    def n_steps(self) -> int:
        return self.training_tokens // self.train_batch_size_tokens

    def to_dict(self) -> dict[str, Any]:
        """All fields, except the :data:`_OPTIONAL_FIELDS` still at their defaults (so adding such a field keeps the
        cache keys of dictionaries trained before it existed); ``SAETrainConfig(**d)`` restores the config."""
        d = asdict(self)
        for name, default in _OPTIONAL_FIELDS.items():
            if d.get(name) == default:
                d.pop(name, None)
        return d


#: SAETrainConfig fields left out of ``to_dict`` at these (default) values
_OPTIONAL_FIELDS: dict[str, Any] = {"skip": False, "target_l0": None, "l0_adapt_rate": 0.05,
                                    "jumprelu_bandwidth": 0.001, "threshold_lr_multiplier": 1.0,
                                    "jumprelu_recipe": "batchtopk"}
#: ``SAETrainConfig.jumprelu_recipe`` values
JUMPRELU_RECIPES = ("batchtopk", "l0_ste")
#: moving-average rate of the BatchTopK threshold (SAELens keeps a running estimate the same way)
BATCHTOPK_THRESHOLD_RATE = 0.05


@dataclass
class TrainResult:
    sae: SparseAutoencoder  # folded (acts on raw activations), eval mode
    cfg: SAETrainConfig
    history: list[dict[str, float]]  # every log_every steps: step, loss, mse, l0, explained_variance, ...
    scale_in: float
    scale_out: float
    n_tokens: int
    final: dict[str, float] = field(default_factory=dict)  # mean of the last 10% of logged steps


# ------------------------------------------------------------------------------------ data
def _required_hooks(cfgs: list[SAETrainConfig]) -> list[str]:
    hooks: list[str] = []
    for c in cfgs:
        for h in (c.hook_name, c.hook_name_out):
            if h is not None and h not in hooks:
                hooks.append(h)
    return hooks


def _batches(source: ActivationSource, hooks: list[str], batch: int, seed: int, start_step: int) -> Iterator[dict]:
    """Yield {hook: Tensor[batch, d]}; rows aligned across hooks. Deterministic given ``seed``."""
    if isinstance(source, Mapping):
        missing = [h for h in hooks if h not in source]
        if missing:
            raise KeyError(f"activation source lacks hooks {missing}; has {list(source)}")
        n_rows = {int(source[h].shape[0]) for h in hooks}
        if len(n_rows) != 1:
            shapes = {h: source[h].shape for h in hooks}
            raise ValueError(f"activation tensors have different numbers of rows: {shapes}")
        (n,) = n_rows
        if n < batch:
            raise ValueError(f"only {n} activation rows but train_batch_size_tokens={batch}")
        per_epoch = n // batch
        step = start_step
        perm_epoch = -1
        perm: Tensor | None = None
        while True:
            epoch, j = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
                perm_epoch = epoch
            assert perm is not None  # drawn on the first step (epoch != -1)
            idx = perm[j * batch : (j + 1) * batch]
            yield {h: source[h][idx].float() for h in hooks}
            step += 1
    # streaming: re-batch to ``batch`` rows; on resume skip the rows already consumed
    skip = start_step * batch
    buf: dict[str, list[Tensor]] = {h: [] for h in hooks}
    have = 0
    for item in source:
        missing = [h for h in hooks if h not in item]
        if missing:
            raise KeyError(f"activation batch lacks hooks {missing}")
        rows = int(item[hooks[0]].shape[0])
        if skip >= rows:
            skip -= rows
            continue
        for h in hooks:
            t = item[h].reshape(-1, item[h].shape[-1])[skip:]
            buf[h].append(t.float())
        have += rows - skip
        skip = 0
        while have >= batch:
            cat = {h: torch.cat(buf[h]) for h in hooks}
            yield {h: cat[h][:batch] for h in hooks}
            buf = {h: [cat[h][batch:]] for h in hooks}
            have -= batch


# ------------------------------------------------------------------------------------ trainer
def _ev(target: Tensor, recon: Tensor) -> float:
    tv = (target - target.mean(0)).pow(2).sum()
    return float(1.0 - (target - recon).pow(2).sum() / tv.clamp_min(1e-12))


class _Trainer:
    def __init__(self, cfg: SAETrainConfig, d_in: int, d_out: int, device: torch.device):
        self.cfg = cfg
        sae_cfg = SAEConfig(
            d_in=d_in,
            d_sae=cfg.d_sae,
            expansion_factor=cfg.expansion_factor,
            architecture=cfg.architecture,
            d_out=d_out,
            transcoder=cfg.is_transcoder,
            k=cfg.k if cfg.architecture == "topk" else None,
            skip=cfg.skip,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            metadata={
                "model_name": cfg.model_name,
                "hook_name": cfg.hook_name,
                "context_size": cfg.context_size,
                **({"hook_name_out": cfg.hook_name_out} if cfg.is_transcoder else {}),
            },
        )
        self.sae = create_sae(sae_cfg, seed=cfg.seed).to(device).train()
        thr = [p for n, p in self.sae.named_parameters() if n == "log_threshold"]
        rest = [p for n, p in self.sae.named_parameters() if n != "log_threshold"]
        groups: list[dict[str, Any]] = [{"params": rest, "lr_mult": 1.0}]
        if thr:
            groups.append({"params": thr, "lr_mult": cfg.threshold_lr_multiplier})
        self.opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.l0_coef = float(cfg.l0_coefficient)  # adapted towards target_l0 (jumprelu)
        self.scale_in = 1.0
        self.scale_out = 1.0
        self.initialised = False
        assert self.sae.cfg.d_sae is not None  # filled in by SAEConfig.__post_init__
        self.tokens_since_fired = torch.zeros(self.sae.cfg.d_sae, dtype=torch.long, device=device)
        self.history: list[dict[str, float]] = []
        self.n_steps = cfg.n_steps
        self.batchtopk = cfg.architecture == "jumprelu" and cfg.jumprelu_recipe == "batchtopk"
        if self.batchtopk:
            self.sae.batchtopk_k = int(cfg.k)  # type: ignore[assignment]
        self.unit_decoder = cfg.architecture == "topk" or self.batchtopk
        if self.unit_decoder:
            self.sae.set_decoder_norm_to_unit_norm()

    # -- schedule
    def lr_at(self, step: int) -> float:
        c, n = self.cfg, self.n_steps
        warm = max(1, int(c.lr_warm_up_fraction * n))
        decay = int(c.lr_decay_fraction * n)
        if step < warm:
            return c.lr * (step + 1) / warm
        if decay > 0 and step >= n - decay:
            return c.lr * (n - step) / decay
        return c.lr

    def coefficients(self, step: int) -> dict[str, float]:
        c = self.cfg
        warm = max(1, int(c.l1_warm_up_fraction * self.n_steps))
        return {
            "l1": c.l1_coefficient * min(1.0, (step + 1) / warm),
            "auxk": c.aux_k_coefficient,
            "l0": self.l0_coef if c.target_l0 is not None else c.l0_coefficient * min(1.0, (step + 1) / warm),
        }

    @torch.no_grad()
    def initialise(self, x: Tensor, y: Tensor) -> None:
        c = self.cfg
        if c.normalize_activations == "expected_average_only_in":
            self.scale_in = float(math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean().clamp_min(1e-12))
            self.scale_out = (
                float(math.sqrt(y.shape[-1]) / y.norm(dim=-1).mean().clamp_min(1e-12)) if c.is_transcoder
                else self.scale_in
            )
        self.sae.initialize_b_dec(y * self.scale_out, c.b_dec_init_method)
        if c.architecture == "jumprelu" and c.target_l0 is not None and not self.batchtopk:
            # each latent fires on target_l0 / d_sae of the first batch's tokens
            pre = self.sae.hidden_pre(x * self.scale_in).float()
            q = min(max(1.0 - float(c.target_l0) / pre.shape[-1], 0.0), 1.0)
            thr = torch.quantile(pre, q, dim=0).clamp_min(c.jumprelu_bandwidth)
            self.sae.set_threshold(thr)  # type: ignore[operator]
        self.initialised = True

    def step(self, step: int, batch: Mapping[str, Tensor]) -> dict[str, float]:
        c, sae = self.cfg, self.sae
        x = batch[c.hook_name]
        y = batch[c.hook_name_out] if c.hook_name_out is not None else x  # (== c.is_transcoder)
        if not self.initialised:
            self.initialise(x, y)
        x = x * self.scale_in
        y = y * self.scale_out
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step) * g.get("lr_mult", 1.0)
        dead_mask = self.tokens_since_fired >= c.dead_feature_window
        out = sae(x, target=y, dead_mask=dead_mask)
        mse = (out.recon - y).pow(2).sum(-1).mean()
        coeffs = self.coefficients(step)
        loss = mse
        for name, val in out.aux_losses.items():
            loss = loss + coeffs[name] * val
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.unit_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), c.max_grad_norm)
        self.opt.step()
        if self.unit_decoder:
            sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            if self.batchtopk:
                kept = out.feats[out.feats > 0]
                if kept.numel():
                    m = float(kept.min())
                    old = float(sae.threshold[0]) if step > 0 else m  # type: ignore[index]
                    new = old + BATCHTOPK_THRESHOLD_RATE * (m - old)
                    sae.set_threshold(torch.full_like(sae.threshold, new))  # type: ignore[operator, arg-type]
            elif c.architecture == "jumprelu" and c.target_l0 is not None:
                l0_now = float((out.feats != 0).sum(-1).float().mean())
                self.l0_coef *= math.exp(c.l0_adapt_rate * (l0_now / float(c.target_l0) - 1.0))
            fired = (out.feats > 0).any(0)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
            stats = {
                "step": float(step),
                "loss": float(loss),
                "mse": float(mse),
                "l0": float((out.feats > 0).sum(-1).float().mean()),
                "explained_variance": _ev(y, out.recon.detach()),
                "dead_fraction": float(dead_mask.float().mean()),
                "lr": self.opt.param_groups[0]["lr"],
                "l0_coefficient": coeffs["l0"],
            }
            for name, val in out.aux_losses.items():
                stats[name] = float(val)
            if (
                c.architecture == "standard"
                and c.resample_dead
                and step < c.resample_until_fraction * self.n_steps
                and (step + 1) % max(1, c.dead_feature_window // x.shape[0]) == 0
                and bool(dead_mask.any())
            ):
                self._resample(step, dead_mask, y - out.recon.detach())
        if step % c.log_every == 0 or step == self.n_steps - 1:
            self.history.append(stats)
        return stats

    @torch.no_grad()
    def _resample(self, step: int, dead: Tensor, residual: Tensor) -> None:
        """Point dead latents at badly reconstructed tokens (residual directions); reset their Adam state."""
        sae = self.sae
        idx = dead.nonzero().squeeze(-1)
        err = residual.pow(2).sum(-1)
        if float(err.sum()) <= 0:
            return
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        rows = torch.multinomial(err.cpu().double(), len(idx), replacement=len(idx) > len(err), generator=gen)
        dirs = residual[rows.to(residual.device)]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        dec_norm = float(sae.W_dec[alive].norm(dim=-1).mean()) if alive.any() else self.sae.cfg.decoder_init_norm
        enc_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if alive.any() else self.sae.cfg.decoder_init_norm
        sae.W_dec[idx] = dirs * dec_norm
        if sae.cfg.d_in == sae.cfg.d_out:
            sae.W_enc[:, idx] = (dirs * enc_norm * 0.2).T
        sae.b_enc[idx] = 0.0
        for p, sel in ((sae.W_dec, (idx, slice(None))), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
            st = self.opt.state.get(p)
            if st:
                st["exp_avg"][sel] = 0.0
                st["exp_avg_sq"][sel] = 0.0
        self.tokens_since_fired[idx] = 0

    def final_sae(self) -> SparseAutoencoder:
        """A folded copy acting on raw activations, in eval mode."""
        folded = create_sae(self.sae.cfg)
        folded.load_state_dict(self.sae.state_dict())
        folded.fold_activation_norm_scaling_factor(self.scale_in, self.scale_out)
        return folded.to(self.sae.W_enc.device).eval()

    # -- checkpoint state
    def state_tensors(self) -> dict[str, Tensor]:
        t = {f"param.{k}": v.detach().cpu().clone() for k, v in self.sae.state_dict().items()}
        t["tokens_since_fired"] = self.tokens_since_fired.cpu().clone()
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                t[f"opt.{names[id(p)]}.{k}"] = v.detach().cpu().clone().reshape(v.shape)
        return t

    def state_json(self) -> dict[str, Any]:
        return {
            "scale_in": self.scale_in,
            "scale_out": self.scale_out,
            "initialised": self.initialised,
            "history": self.history,
            "l0_coef": self.l0_coef,
        }

    def load_state(self, tensors: dict[str, Tensor], js: dict[str, Any]) -> None:
        dev = self.sae.W_enc.device
        self.sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
        self.tokens_since_fired = tensors["tokens_since_fired"].to(dev)
        params = dict(self.sae.named_parameters())
        self.opt.state.clear()
        for k, v in tensors.items():
            if k.startswith("opt."):
                pname, sname = k[4:].rsplit(".", 1)
                self.opt.state[params[pname]][sname] = v.to(dev) if sname != "step" else v
        self.scale_in, self.scale_out = float(js["scale_in"]), float(js["scale_out"])
        self.initialised = bool(js["initialised"])
        self.history = list(js["history"])
        self.l0_coef = float(js.get("l0_coef", self.cfg.l0_coefficient))


# ------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(ckpt_dir: Path, step: int, trainers: list[_Trainer], cfgs: list[SAETrainConfig]) -> None:
    final = ckpt_dir / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        for i, tr in enumerate(trainers):
            save_file(tr.state_tensors(), str(tmp / f"sae_{i}.safetensors"))
            atomic_write_json(tmp / f"sae_{i}.json", tr.state_json())
    prev = ckpt_dir / "latest.json"
    old = read_json(prev)["folder"] if prev.is_file() else None
    atomic_write_json(prev, {"step": step, "folder": final.name, "cfgs": [c.to_dict() for c in cfgs]})
    if old and old != final.name:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _load_checkpoint(ckpt_dir: Path, trainers: list[_Trainer], cfgs: list[SAETrainConfig]) -> int:
    latest = ckpt_dir / "latest.json"
    if not latest.is_file():
        return 0
    info = read_json(latest)
    if info["cfgs"] != json.loads(json.dumps([c.to_dict() for c in cfgs])):
        raise ValueError(f"checkpoint in {ckpt_dir} was written for different configs; use another checkpoint_dir")
    folder = ckpt_dir / info["folder"]
    for i, tr in enumerate(trainers):
        tr.load_state(load_file(str(folder / f"sae_{i}.safetensors")), read_json(folder / f"sae_{i}.json"))
    return int(info["step"])


# ------------------------------------------------------------------------------------ entry point
def _dims(source: ActivationSource, cfgs: list[SAETrainConfig]) -> tuple[dict[str, int], ActivationSource]:
    hooks = _required_hooks(cfgs)
    if isinstance(source, Mapping):
        return {h: int(source[h].shape[-1]) for h in hooks if h in source}, source
    it = iter(source)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("activation source is empty") from None

    def chained() -> Iterator[Mapping[str, Tensor]]:
        yield first
        yield from it

    return {h: int(first[h].shape[-1]) for h in hooks if h in first}, chained()


def train_saes(
    activation_source: ActivationSource,
    cfgs: SAETrainConfig | list[SAETrainConfig],
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device = "cpu",
    stop_after_steps: int | None = None,
) -> dict[str, TrainResult]:
    """Train one SAE/transcoder per config from one pass over ``activation_source``.

    ``activation_source``: ``{hook: Tensor[n, d]}`` (in memory; reshuffled every epoch and cycled until
    ``training_tokens``) or an iterable of ``{hook: Tensor[batch, d]}`` (streamed, re-batched; must be
    deterministic for resume). Rows of different hooks must be aligned (same token).
    All configs share the batch size and step count of ``cfgs[0]`` (checked).
    ``stop_after_steps`` stops early (after writing a checkpoint) -- for tests of resume.
    Returns ``{cfg.key: TrainResult}``.
    """
    if isinstance(cfgs, SAETrainConfig):
        cfgs = [cfgs]
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("no SAE configs given")
    keys = [c.key for c in cfgs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate SAE keys {keys}")
    b, n_steps = cfgs[0].train_batch_size_tokens, cfgs[0].n_steps
    for c in cfgs[1:]:
        if c.train_batch_size_tokens != b or c.n_steps != n_steps:
            raise ValueError("all configs trained together need the same train_batch_size_tokens and training_tokens")
    device = torch.device(device)
    dims, source = _dims(activation_source, cfgs)
    hooks = _required_hooks(cfgs)
    missing = [h for h in hooks if h not in dims]
    if missing:
        raise KeyError(f"activation source lacks hooks {missing}")
    trainers = [_Trainer(c, dims[c.hook_name], dims[c.hook_name_out or c.hook_name], device) for c in cfgs]
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = _load_checkpoint(ckpt, trainers, cfgs) if (ckpt is not None and resume) else 0
    ckpt_every = cfgs[0].checkpoint_every
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=start, desc="train SAEs", unit="step", dynamic_ncols=True)
    data = _batches(source, hooks, b, cfgs[0].seed, start)
    t0, done = time.perf_counter(), 0
    step = start
    try:
        for step in range(start, n_steps):
            try:
                batch = next(data)
            except StopIteration:
                raise ValueError(
                    f"activation stream ended after {step} steps; {n_steps} needed for "
                    f"training_tokens={cfgs[0].training_tokens}"
                ) from None
            batch = {h: v.to(device) for h, v in batch.items()}
            stats = [tr.step(step, batch) for tr in trainers]
            done += 1
            if bar is not None:
                bar.update(1)
                if step % 5 == 0:
                    s = stats[0]
                    extra = f" (+{len(stats) - 1} more)" if len(stats) > 1 else ""
                    bar.set_postfix_str(
                        f"loss={s['loss']:.3g} L0={s['l0']:.1f} ev={s['explained_variance']:.3f}{extra}"
                    )
            if ckpt is not None and ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < n_steps:
                _save_checkpoint(ckpt, step + 1, trainers, cfgs)
            if stop_after_steps is not None and step + 1 - start >= stop_after_steps:
                if ckpt is not None:
                    _save_checkpoint(ckpt, step + 1, trainers, cfgs)
                break
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    results = {}
    for tr in trainers:
        hist = tr.history
        tail = hist[-max(1, len(hist) // 10) :] if hist else []
        final = {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {}
        final["train_tokens_per_s"] = done * b / elapsed if elapsed > 0 else float("nan")
        results[tr.cfg.key] = TrainResult(
            sae=tr.final_sae(),
            cfg=tr.cfg,
            history=list(hist),
            scale_in=tr.scale_in,
            scale_out=tr.scale_out,
            n_tokens=(step + 1) * b,
            final=final,
        )
    return results


# ------------------------------------------------------------------------------------ with a model + cache
def train_saes_on_model(
    model,
    texts: list[str],
    cfgs: SAETrainConfig | list[SAETrainConfig],
    corpus_id: str,
    cache_dir: str | os.PathLike | None = None,
    harvest_tokens: int | None = None,
    context_size: int = 128,
    model_batch_size: int = 8,
    progress: bool = True,
    device: str | torch.device = "cpu",
    activations: str = "memory",
    store_dir: str | os.PathLike | None = None,
) -> dict[str, TrainResult | SparseAutoencoder]:
    """Train (or load from the cache) one SAE per config on ``model``'s activations over ``texts``.

    Activations of every hook not yet cached are harvested in one pass (``harvest_tokens`` rows, default
    ``training_tokens``; cycled for several epochs when smaller) and all missing SAEs are trained together.
    ``activations="memory"`` keeps them in RAM; ``"disk"`` writes them to an
    :class:`~circuit_discovery.sae.activation_store.ActivationStore` and trains from it by memory map (the same
    batches, so the same dictionaries at the same seed; resident memory is about one batch instead of
    rows x hooks x width x 4 bytes), training the dictionaries in groups of at most :data:`TRAIN_GROUP_BYTES` of
    weights and optimiser state (the same results: each is trained on the same batches). The store lives under
    ``store_dir`` (default ``<cache_dir>/activations``, the SAE cache's folder when ``cache_dir`` is None) in a folder
    named by the model, hooks, corpus and row count; it is deleted once every dictionary is saved, and a finished
    store left by a run that stopped during training is reused.
    Results are saved to the cache keyed by ``sae_cache_key(model_name, key, cfg, corpus_id)``; a cache hit returns
    the loaded ``SparseAutoencoder`` instead of a ``TrainResult``. Timing: ``harvest_tokens_per_s`` and
    ``train_tokens_per_s`` go into each result's ``final``.

    A config reading ``blocks.{l}.mlp.hook_in`` whose dictionary is cached only under the key it had when that
    tensor was called ``blocks.{l}.ln2.hook_normalized`` here (before the hook names took TransformerLens's
    meaning) is converted, not retrained: the cached folder is loaded with the hook renamed (same weights) and saved
    under the current key (:func:`_convert_legacy_cached`).
    """
    from circuit_discovery.sae.harvest import harvest_activations
    from circuit_discovery.sae.io import load_cached_sae, sae_cache_key, save_cached_sae

    if isinstance(cfgs, SAETrainConfig):
        cfgs = [cfgs]
    name = model.cfg.model_name
    out: dict[str, TrainResult | SparseAutoencoder] = {}
    todo: list[SAETrainConfig] = []
    for c in cfgs:
        c = replace(c, model_name=c.model_name or name, context_size=c.context_size or context_size)
        key = sae_cache_key(name, c.key, c, corpus_id)
        hit = load_cached_sae(cache_dir, key, device=str(device))
        if hit is None:
            hit = _convert_legacy_cached(cache_dir, c, key, corpus_id, str(device))
        if hit is not None:
            out[c.key] = hit
        else:
            todo.append(c)
    if not todo:
        return out
    n = harvest_tokens or todo[0].training_tokens
    hooks = _required_hooks(todo)
    t0 = time.perf_counter()
    if activations not in ACTIVATION_PLACES:
        raise InputError(f"activations={activations!r}; use one of {ACTIVATION_PLACES}")
    folder = None
    if activations == "disk":
        folder = _store_folder(store_dir, cache_dir, name, hooks, corpus_id, n, context_size, model_batch_size)
        acts: Mapping[str, Any] = _store_source(model, texts, hooks, folder, n, context_size, model_batch_size,
                                                progress)
    else:
        acts = harvest_activations(
            model, texts, hooks, max_tokens=n, context_size=context_size,
            model_batch_size=model_batch_size, progress=progress,
        )
    try:
        n_got = int(next(iter(acts.values())).shape[0])
        harvest_rate = n_got / max(time.perf_counter() - t0, 1e-9)
        batch = todo[0].train_batch_size_tokens
        if n_got < batch:
            raise ValueError(f"corpus gave only {n_got} tokens, fewer than one batch ({batch}); give more text")
        results = {}
        for group in _groups(todo, acts) if activations == "disk" else [todo]:
            results.update(train_saes(acts, group, progress=progress, device=device))
        for c in todo:
            r = results[c.key]
            r.final["harvest_tokens_per_s"] = harvest_rate
            r.final["harvested_tokens"] = n_got
            save_cached_sae(
                cache_dir, sae_cache_key(name, c.key, c, corpus_id), r.sae,
                extra={"cfg": c.to_dict(), "corpus_id": corpus_id, "final": r.final, "history": r.history},
            )
            out[c.key] = r
    finally:
        del acts
        # the store goes once the dictionaries are saved (else a rerun reuses it)
        if folder is not None and len(out) == len(cfgs):
            shutil.rmtree(folder, ignore_errors=True)
    return out


#: ``activations`` of :func:`train_saes_on_model` (and ``RunConfig.sae_activations``)
ACTIVATION_PLACES = ("memory", "disk")

#: with activations on disk, dictionaries are trained in groups whose weights, gradients and Adam moments together
#: stay under this many bytes (each group reads the store again; the batches, hence the results, are the same)
TRAIN_GROUP_BYTES = 256 * 2**20


def _groups(cfgs: list[SAETrainConfig], source: Mapping[str, Any]) -> list[list[SAETrainConfig]]:
    """``cfgs`` in order, cut into groups of at most :data:`TRAIN_GROUP_BYTES` of training state (at least one
    config each)."""
    groups: list[list[SAETrainConfig]] = [[]]
    used = 0
    for c in cfgs:
        d_in = int(source[c.hook_name].shape[-1])
        d_out = int(source[c.hook_name_out or c.hook_name].shape[-1])
        d_sae = c.d_sae or c.expansion_factor * d_in
        n_params = d_sae * (d_in + d_out + 2) + d_out + (d_in * d_out + d_out if c.skip else 0)
        size = 4 * 4 * n_params  # float32 weights, gradients and two Adam moments
        if groups[-1] and used + size > TRAIN_GROUP_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(c)
        used += size
    return groups


def _store_folder(store_dir, cache_dir, model_name: str, hooks: list[str], corpus_id: str, n: int,
                  context_size: int, model_batch_size: int) -> Path:
    from circuit_discovery.sae.io import cached_sae_path, sae_cache_key

    key = sae_cache_key(model_name, "activations", {"hooks": hooks, "max_tokens": int(n),
                                                    "context_size": int(context_size),
                                                    "model_batch_size": int(model_batch_size)}, corpus_id)
    if store_dir is not None:
        return Path(store_dir) / key
    return cached_sae_path(cache_dir, "activations") / key


def _store_source(model, texts, hooks: list[str], folder: Path, n: int, context_size: int, model_batch_size: int,
                  progress: bool) -> Mapping[str, Any]:
    """``{hook: RowView}`` of a finished store at ``folder`` (one left by a run that stopped), else of a store
    harvested there now."""
    from circuit_discovery.sae.activation_store import MANIFEST, ActivationStore, ActivationStoreError
    from circuit_discovery.sae.harvest import harvest_to_store

    if (folder / MANIFEST).is_file():
        try:
            return ActivationStore.open(folder).source(hooks)
        except ActivationStoreError as e:
            log.warning("activation store %s cannot be used (%s); harvesting again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    store = harvest_to_store(model, texts, hooks, folder, max_tokens=n, context_size=context_size,
                             model_batch_size=model_batch_size, progress=progress)
    return store.source(hooks)


def legacy_cache_key(cfg: SAETrainConfig, corpus_id: str) -> str | None:
    """The cache key ``cfg`` had when ``blocks.{l}.mlp.hook_in`` was called ``blocks.{l}.ln2.hook_normalized`` here
    (same tensor, the MLP's post-gain input), or ``None`` when ``cfg`` reads no ``mlp.hook_in``."""
    from circuit_discovery.sae.io import sae_cache_key

    def old(h: str | None) -> str | None:
        return h[: -len(".mlp.hook_in")] + ".ln2.hook_normalized" if h and h.endswith(".mlp.hook_in") else h

    if old(cfg.hook_name) == cfg.hook_name and old(cfg.hook_name_out) == cfg.hook_name_out:
        return None
    legacy = replace(cfg, hook_name=old(cfg.hook_name) or cfg.hook_name, hook_name_out=old(cfg.hook_name_out))
    assert cfg.model_name is not None  # filled in by train_saes_on_model
    return sae_cache_key(cfg.model_name, legacy.key, legacy, corpus_id)


def _convert_legacy_cached(cache_dir, cfg: SAETrainConfig, key: str, corpus_id: str,
                           device: str) -> SparseAutoencoder | None:
    """Load a dictionary cached under :func:`legacy_cache_key` (``load_sae`` renames its hook to ``mlp.hook_in``),
    save it under ``key`` with the new hook semantics, and return it; ``None`` when there is none."""
    from circuit_discovery.sae.io import cached_sae_path, load_cached_sae, save_cached_sae

    old_key = legacy_cache_key(cfg, corpus_id)
    if old_key is None:
        return None
    sae = load_cached_sae(cache_dir, old_key, device=device)
    if sae is None:
        return None
    if sae.cfg.metadata.get("hook_name") != cfg.hook_name:
        return None  # not a legacy folder after all (e.g. written with today's pre-gain meaning): retrain
    info_path = cached_sae_path(cache_dir, old_key) / "train_info.json"
    extra = read_json(info_path) if info_path.is_file() else {}
    extra = {**extra, "cfg": cfg.to_dict(), "converted_from_cache_key": old_key}
    save_cached_sae(cache_dir, key, sae, extra=extra)
    return sae

