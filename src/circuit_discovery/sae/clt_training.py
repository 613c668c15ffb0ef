"""Training, saving and evaluating a cross-layer transcoder (CLT) for feature graphs.

A :class:`~circuit_discovery.sae.transcoder_set.CrossLayerTranscoder` encodes each layer's MLP input
(``blocks.{l}.mlp.hook_in``) into ``d_sae`` features that write to the MLP output (``blocks.{t}.hook_mlp_out``) of
every layer ``t >= l``. Recipe (the per-layer JumpReLU recipe of :mod:`circuit_discovery.sae.training`, applied to
every source layer at once):

* inputs and targets of each layer scaled so that ``E||x|| = sqrt(d)`` while training (folded into the weights
  before returning: the CLT acts on raw activations);
* BatchTopK per source layer while training (``k * batch`` activations kept per layer), JumpReLU at inference with
  each layer's threshold following the smallest kept activation (moving average, rate
  :data:`~circuit_discovery.sae.training.BATCHTOPK_THRESHOLD_RATE`); no AuxK;
* each feature's decoder vectors (all its target layers together) kept at unit norm;
* loss: the sum over target layers of ``sum_d (recon - target)^2`` averaged over tokens; Adam, linear warm-up,
  decay over the last 20%, gradient clipping at 1; ``b_dec`` at each target's mean.

The decoder is dense (``sum_l d_sae * (n_layers - l) * d_out`` weights), so the cost per token grows with
``d_sae * n_layers^2 / 2``: the default ``d_sae`` (:data:`CLT_D_SAE` per layer) keeps a CLT for Gemma 3 270M
trainable on 2 CPU cores.

Files (:func:`save_clt`, :func:`load_clt`): a folder with ``cfg.json`` (ours: ``architecture: "clt"``,
``n_layers``, ``d_in``, ``d_sae``, ``d_out``, ``activation``, ``k``, ``hook_in``, ``hook_out``, ``hook_semantics``,
``model_name``, training settings) and circuit-tracer's per-layer CLT layout: ``W_enc_{l}.safetensors`` with
``W_enc_{l} [d_sae, d_in]`` (transposed, as circuit-tracer), ``b_enc_{l} [d_sae]``, ``b_dec_{l} [d_out]``,
``threshold_{l} [d_sae]``, and ``W_dec_{l}.safetensors`` with ``W_dec_{l} [d_sae, n_layers - l, d_out]``.
Safetensors and JSON only.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from circuit_discovery.errors import InputError
from circuit_discovery.io import atomic_dir, atomic_write_json, read_json
from circuit_discovery.sae.transcoder_set import DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT, CrossLayerTranscoder

__all__ = ["CLT_D_SAE", "CLTTrainConfig", "CLTTrainResult", "train_clt", "save_clt", "load_clt", "evaluate_clt",
           "train_clt_on_model", "clt_reconstruction_metrics"]

#: default CLT latents per layer
CLT_D_SAE = 256


@dataclass
class CLTTrainConfig:
    """How to train one cross-layer transcoder over ``n_layers`` layers (hooks are ``{layer}`` templates)."""

    n_layers: int
    d_sae: int = CLT_D_SAE
    k: int = 64  # active latents per source layer and token, on average (BatchTopK)
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warm_up_fraction: float = 0.02
    lr_decay_fraction: float = 0.2
    train_batch_size_tokens: int = 512
    training_tokens: int = 100_000
    seed: int = 42
    max_grad_norm: float = 1.0
    log_every: int = 10
    hook_in: str = DEFAULT_HOOK_IN
    hook_out: str = DEFAULT_HOOK_OUT
    model_name: str | None = None
    context_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_sae", "k", "train_batch_size_tokens", "training_tokens"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"CLTTrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.training_tokens < self.train_batch_size_tokens:
            raise InputError("CLTTrainConfig.training_tokens must be at least train_batch_size_tokens")
        if self.k > self.d_sae:
            raise InputError(f"CLTTrainConfig.k={self.k} exceeds d_sae={self.d_sae}")

    @property
    def n_steps(self) -> int:
        return self.training_tokens // self.train_batch_size_tokens

    def hooks(self) -> list[str]:
        return [h.format(layer=l) for l in range(self.n_layers) for h in (self.hook_in, self.hook_out)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CLTTrainResult:
    clt: CrossLayerTranscoder  # folded (acts on raw activations), eval mode
    cfg: CLTTrainConfig
    history: list[dict[str, float]]
    final: dict[str, float] = field(default_factory=dict)


def _decode_all(W_dec: Sequence[Tensor], b_dec: Tensor, feats: Sequence[Tensor]) -> Tensor:
    """``[n_layers, batch, d_out]``: every target's reconstruction from ``feats[l] [batch, d_sae]``."""
    n = len(feats)
    outs = [b_dec[t].expand(feats[0].shape[0], b_dec.shape[-1]) for t in range(n)]
    for s in range(n):
        w = W_dec[s]  # [d_sae, n - s, d_out]
        contrib = (feats[s] @ w.reshape(w.shape[0], -1)).reshape(feats[s].shape[0], n - s, -1)
        for t in range(s, n):
            outs[t] = outs[t] + contrib[:, t - s]
    return torch.stack(outs)


def train_clt(acts: Mapping[str, Tensor], cfg: CLTTrainConfig, progress: bool = True,
              device: str | torch.device = "cpu") -> CLTTrainResult:
    """Train a CLT from in-memory activations ``{hook: Tensor[n, d]}`` (rows aligned across hooks; every layer's
    ``hook_in`` and ``hook_out``). Deterministic on CPU for a fixed seed."""
    from circuit_discovery.sae.architectures import batch_topk
    from circuit_discovery.sae.training import BATCHTOPK_THRESHOLD_RATE, _batches

    hooks = cfg.hooks()
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise InputError(f"CLT training needs activations of {missing[:3]}...; harvest every layer's hooks")
    n, dev = cfg.n_layers, torch.device(device)
    ins = [cfg.hook_in.format(layer=l) for l in range(n)]
    outs = [cfg.hook_out.format(layer=l) for l in range(n)]
    d_in, d_out = int(acts[ins[0]].shape[-1]), int(acts[outs[0]].shape[-1])
    gen = torch.Generator().manual_seed(cfg.seed)
    clt = CrossLayerTranscoder(n, d_in, cfg.d_sae, d_out, activation="jumprelu", hook_in=cfg.hook_in,
                               hook_out=cfg.hook_out).to(dev)
    with torch.no_grad():
        for l in range(n):
            w = torch.randn(cfg.d_sae, n - l, d_out, generator=gen)
            w = w / w.flatten(1).norm(dim=-1)[:, None, None]
            clt.W_dec[l].copy_(w)
            clt.W_enc[l].copy_(w[:, 0].T * 0.1 * math.sqrt(d_out / d_in))
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    scale_in = torch.ones(n)
    scale_out = torch.ones(n)
    thr = torch.zeros(n)
    history: list[dict[str, float]] = []
    n_steps = cfg.n_steps
    warm, decay = max(1, int(cfg.lr_warm_up_fraction * n_steps)), int(cfg.lr_decay_fraction * n_steps)
    fired = torch.zeros(n, cfg.d_sae, dtype=torch.bool)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, desc="train CLT", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    data = _batches(acts, hooks, cfg.train_batch_size_tokens, cfg.seed, 0)
    clt.train()
    try:
        for step in range(n_steps):
            batch = next(data)
            x = torch.stack([batch[h] for h in ins]).to(dev)  # [n, B, d_in]
            y = torch.stack([batch[h] for h in outs]).to(dev)
            if step == 0:
                scale_in = math.sqrt(d_in) / x.norm(dim=-1).mean(-1).clamp_min(1e-12)
                scale_out = math.sqrt(d_out) / y.norm(dim=-1).mean(-1).clamp_min(1e-12)
                with torch.no_grad():
                    clt.b_dec.copy_((y * scale_out[:, None, None]).mean(1))
            x = x * scale_in[:, None, None]
            y = y * scale_out[:, None, None]
            lr = cfg.lr * ((step + 1) / warm if step < warm else
                           (n_steps - step) / decay if decay > 0 and step >= n_steps - decay else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            pre = torch.baddbmm(clt.b_enc[:, None, :], x, clt.W_enc)  # [n, B, d_sae]
            feats = [batch_topk(pre[l], cfg.k) for l in range(n)]
            recon = _decode_all(list(clt.W_dec), clt.b_dec, feats)
            mse = (recon - y).pow(2).sum(-1).mean(-1)  # [n]
            loss = mse.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # unit-norm decoder per feature: drop the gradient along each decoder vector
                for w in clt.W_dec:
                    if w.grad is not None:
                        u = w / w.flatten(1).norm(dim=-1).clamp_min(1e-8)[:, None, None]
                        w.grad.sub_((w.grad * u).flatten(1).sum(-1)[:, None, None] * u)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                for w in clt.W_dec:
                    w.div_(w.flatten(1).norm(dim=-1).clamp_min(1e-8)[:, None, None])
                for l in range(n):
                    kept = feats[l][feats[l] > 0]
                    if kept.numel():
                        m = float(kept.min())
                        thr[l] = m if step == 0 else float(thr[l]) + BATCHTOPK_THRESHOLD_RATE * (m - float(thr[l]))
                    fired[l] |= (feats[l] > 0).any(0).cpu()
                if step % cfg.log_every == 0 or step == n_steps - 1:
                    tv = (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
                    ev = 1.0 - (recon - y).pow(2).sum((1, 2)) / tv
                    history.append({"step": float(step), "loss": float(loss), "lr": lr,
                                    "explained_variance": float(ev.mean()),
                                    "l0": float(sum(float((f > 0).sum(-1).float().mean()) for f in feats) / n)})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():  # fold the scaling: act on raw activations; feature values are unchanged
        clt.threshold.copy_(thr[:, None].expand_as(clt.threshold).to(clt.threshold.dtype))
        clt.W_enc.mul_(scale_in[:, None, None].to(dev))
        for l, w in enumerate(clt.W_dec):
            w.div_(scale_out[l:, None].to(dev)[None])
        clt.b_dec.div_(scale_out[:, None].to(dev))
    clt.eval()
    for p in clt.parameters():
        p.requires_grad_(False)
    tail = history[-max(1, len(history) // 10):]
    final = {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {}
    final["train_tokens_per_s"] = n_steps * cfg.train_batch_size_tokens / max(elapsed, 1e-9)
    final["dead_fraction_train"] = float((~fired).float().mean())
    return CLTTrainResult(clt=clt, cfg=cfg, history=history, final=final)


# ----------------------------------------------------------------------------------------------- files
def save_clt(clt: CrossLayerTranscoder, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``clt`` to the folder ``path`` (``cfg.json`` + circuit-tracer's per-layer safetensors), atomically."""
    from circuit_discovery.sae.io import HOOK_SEMANTICS

    path = Path(path)
    with atomic_dir(path) as tmp:
        for l in range(clt.n_layers):
            enc = {f"W_enc_{l}": clt.W_enc[l].T, f"b_enc_{l}": clt.b_enc[l], f"b_dec_{l}": clt.b_dec[l],
                   f"threshold_{l}": clt.threshold[l]}
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in enc.items()},
                      str(tmp / f"W_enc_{l}.safetensors"), metadata={"format": "pt"})
            save_file({f"W_dec_{l}": clt.W_dec[l].detach().cpu().contiguous().clone()},
                      str(tmp / f"W_dec_{l}.safetensors"), metadata={"format": "pt"})
        cfg = {"architecture": "clt", "layout": "circuit-tracer CLT (W_enc_{l} / W_dec_{l} safetensors)",
               "n_layers": clt.n_layers, "d_in": clt.d_in, "d_sae": clt.d_sae, "d_out": clt.d_out,
               "activation": clt.activation_name, "k": clt.k, "hook_in": clt.hook_in, "hook_out": clt.hook_out,
               "dtype": str(clt.W_enc.dtype).removeprefix("torch."), "hook_semantics": HOOK_SEMANTICS,
               **dict(extra or {})}
        atomic_write_json(tmp / "cfg.json", cfg)
    return path


def load_clt(path: str | os.PathLike, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Load a CLT folder written by :func:`save_clt` (shapes checked against ``cfg.json``)."""
    from circuit_discovery.sae.pretrained import DictionaryFormatError, DictionaryNotFoundError

    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise DictionaryNotFoundError(f"{path} has no cfg.json; point at a folder written by save_clt")
    c = read_json(path / "cfg.json")
    if c.get("architecture") != "clt":
        raise DictionaryFormatError(f"{path}/cfg.json: architecture={c.get('architecture')!r}, expected 'clt'")
    n, d_in, d_sae, d_out = (int(c[k]) for k in ("n_layers", "d_in", "d_sae", "d_out"))
    clt = CrossLayerTranscoder(n, d_in, d_sae, d_out, activation=c.get("activation", "jumprelu"), k=c.get("k"),
                               hook_in=c.get("hook_in", DEFAULT_HOOK_IN), hook_out=c.get("hook_out", DEFAULT_HOOK_OUT))
    expected = {"W_enc": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_out,), "threshold": (d_sae,)}
    with torch.no_grad():
        for l in range(n):
            fe, fd = path / f"W_enc_{l}.safetensors", path / f"W_dec_{l}.safetensors"
            if not fe.is_file() or not fd.is_file():
                raise DictionaryNotFoundError(f"{path} lacks {fe.name} or {fd.name}; the CLT folder is incomplete")
            enc, dec = load_file(str(fe)), load_file(str(fd))
            for name, shape in expected.items():
                t = enc.get(f"{name}_{l}")
                if t is None or tuple(t.shape) != shape:
                    raise DictionaryFormatError(f"{fe}: {name}_{l} missing or not of shape {shape}")
            w = dec.get(f"W_dec_{l}")
            if w is None or tuple(w.shape) != (d_sae, n - l, d_out):
                raise DictionaryFormatError(f"{fd}: W_dec_{l} missing or not of shape {(d_sae, n - l, d_out)}")
            clt.W_enc[l].copy_(enc[f"W_enc_{l}"].T)
            clt.b_enc[l].copy_(enc[f"b_enc_{l}"])
            clt.b_dec[l].copy_(enc[f"b_dec_{l}"])
            clt.threshold[l].copy_(enc[f"threshold_{l}"])
            clt.W_dec[l].copy_(w)
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt.to(device).eval()


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def clt_reconstruction_metrics(clt: CrossLayerTranscoder, acts: Mapping[str, Tensor], target: int) -> dict:
    """EV, mse, cossim of ``clt``'s reconstruction of layer ``target``'s output, L0 and dead share of the features
    encoded at ``target``, on activations ``{hook: [n, d]}`` (every ``hook_in`` up to ``target`` and its output)."""
    from circuit_discovery.sae.evaluate import cossim, dead_fraction, explained_variance, mse

    feats = {s: clt.encode(s, acts[clt.hook_in.format(layer=s)]) for s in range(target + 1)}
    y = acts[clt.hook_out.format(layer=target)]
    rec = clt.decode(feats, target)
    f = feats[target]
    return {"l0": float((f != 0).sum(-1).float().mean()), "explained_variance": explained_variance(y, rec),
            "mse": mse(y, rec), "cossim": cossim(y, rec), "dead_fraction": dead_fraction((f != 0).sum(0)),
            "dead_fraction_n_tokens": int(y.shape[0])}


@torch.no_grad()
def evaluate_clt(model, clt: CrossLayerTranscoder, target: int, texts: Sequence[str], n_tokens: int = 4096,
                 context_size: int = 128, batch_size: int = 2, sparsity_tokens: int | None = None) -> dict:
    """:func:`~circuit_discovery.sae.evaluate.evaluate_sae`'s metrics for the CLT at layer ``target``: the MLP output
    there replaced by the CLT's reconstruction from the clean inputs of layers ``0..target`` (the other MLPs left
    as they are), CE and KL scores against zero-ablating that output; ``l0``/``dead_fraction`` count the features
    encoded at ``target`` (``sparsity_tokens`` is accepted for symmetry; sparsity uses the CE tokens)."""
    from circuit_discovery.sae.evaluate import SpliceTotals, _first_tokens, splice_batch
    from circuit_discovery.sae.harvest import iter_token_batches, token_mask

    ins = [clt.hook_in.format(layer=s) for s in range(target + 1)]
    out_hook = clt.hook_out.format(layer=target)
    for h in (*ins, out_hook):
        model.check_hook_name(h)
    totals = SpliceTotals(clt.d_sae)
    dev = clt.W_enc.device

    def reconstruct(inputs, _x):
        feats = {s: clt.encode(s, inputs[ins[s]].to(dev)) for s in range(target + 1)}
        return feats[target], clt.decode(feats, target)

    for tokens, mask in iter_token_batches(model, texts, context_size, batch_size):
        keep = _first_tokens(token_mask(model, tokens, mask), n_tokens - totals.n_seen)
        rows = keep.any(1)
        if not bool(rows.any()):
            break
        tokens, mask, keep = tokens[rows], mask[rows], keep[rows]
        totals.add(splice_batch(model, tokens, mask, keep, ins, out_hook, reconstruct))
        if totals.n_seen >= n_tokens:
            break
    if totals.n_seen == 0:
        raise InputError("no evaluation tokens: texts are empty")
    return totals.metrics()


# ----------------------------------------------------------------------------------------------- with a model
def train_clt_on_model(model, train_texts: Sequence[str], heldout: Sequence[str], corpus, *,
                       layers: Sequence[int] | None = None, training_tokens: int = 100_000, k: int = 64,
                       seed: int = 42, d_sae: int | None = None, cache_dir: str | os.PathLike | None = None,
                       evaluate: bool = False, eval_tokens: int = 256, progress: bool = True,
                       t0: float | None = None, context_size: int = 128, activations: str = "memory"):
    """Train (or load from the cache) a CLT over every layer of ``model``: a
    :class:`~circuit_discovery.sae.dictionaries.DictionarySet` with ``kind="clt"``, ``transcoders == {}`` and
    ``transcoder_set.cross_layer`` set. Cached as a :func:`save_clt` folder under
    ``sae_cache_key(model, "clt", cfg, corpus_id)``; metrics per target layer with ``evaluate``. ``activations``:
    ``"memory"`` or ``"disk"``, as in :func:`~circuit_discovery.sae.training.train_saes_on_model`."""
    from circuit_discovery.sae.dictionary_set import DictionarySet
    from circuit_discovery.sae.harvest import harvest_activations
    from circuit_discovery.sae.io import cached_sae_path, sae_cache_key
    from circuit_discovery.sae.transcoder_set import TranscoderSet

    t0 = time.perf_counter() if t0 is None else t0
    n = model.cfg.n_layers
    if layers is not None and sorted(int(l) for l in layers) != list(range(n)):
        raise InputError(f"a cross-layer transcoder covers every layer (0..{n - 1}); leave sae_layers unset")
    cfg = CLTTrainConfig(n_layers=n, d_sae=d_sae or CLT_D_SAE, k=k, training_tokens=training_tokens, seed=seed,
                         model_name=model.cfg.model_name, context_size=context_size)
    key = sae_cache_key(model.cfg.model_name, "clt", cfg, corpus.corpus_id)
    folder = cached_sae_path(cache_dir, key)
    trained: list[int] = []
    info: dict[str, Any] = {}
    if (folder / "cfg.json").is_file():
        clt = load_clt(folder)
    else:
        store = None
        if activations == "disk":
            from circuit_discovery.sae.training import _store_folder, _store_source

            store = _store_folder(None, cache_dir, model.cfg.model_name, cfg.hooks(), corpus.corpus_id,
                                  training_tokens, context_size, 8)
            acts = _store_source(model, list(train_texts), cfg.hooks(), store, training_tokens, context_size, 8,
                                 progress)
        elif activations == "memory":
            acts = harvest_activations(model, list(train_texts), cfg.hooks(), max_tokens=training_tokens,
                                       context_size=context_size, progress=progress)
        else:
            raise InputError(f"activations={activations!r}; use 'memory' or 'disk'")
        r = train_clt(acts, cfg, progress=progress)
        del acts
        clt = r.clt
        info = {"final": r.final}
        save_clt(clt, folder, extra={"model_name": model.cfg.model_name, "train": cfg.to_dict(),
                                     "corpus_id": corpus.corpus_id, "final": r.final})
        trained = list(range(n))
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    metrics: dict[int, dict[str, float]] = {}
    if evaluate:
        eval_path = cached_sae_path(cache_dir, "evals") / f"{key}_clt_{int(eval_tokens)}.json"
        if not trained and eval_path.is_file():
            metrics = {int(l): m for l, m in read_json(eval_path).items()}
        else:
            for l in range(n):
                m = evaluate_clt(model, clt, l, heldout, n_tokens=eval_tokens, context_size=context_size)
                metrics[l] = {k2: float(v) for k2, v in m.items() if isinstance(v, (int, float))}
            atomic_write_json(eval_path, {str(l): m for l, m in metrics.items()})
    ts = TranscoderSet(cross_layer=clt, hook_in=clt.hook_in, hook_out=clt.hook_out, source=f"trained clt ({key})",
                       metadata={"kind": "clt", "corpus_id": corpus.corpus_id, **info})
    return DictionarySet(transcoders={}, corpus_id=corpus.corpus_id, trained=trained, metrics=metrics,
                         seconds=time.perf_counter() - t0, kind="clt", transcoder_set=ts,
                         settings={"kind": "clt", "d_sae": cfg.d_sae, "k": k, "training_tokens": training_tokens,
                                   "seed": seed, "corpus_tokens": corpus.n_tokens, "eval_tokens": eval_tokens,
                                   "train_batch_size_tokens": cfg.train_batch_size_tokens})
