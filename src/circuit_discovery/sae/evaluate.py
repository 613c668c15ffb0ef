"""SAE quality metrics, named as in SAELens.

Reconstruction metrics (on held-out tokens, BOS and padding excluded):

* ``l0``: mean number of non-zero latents per token;
* ``explained_variance``: ``1 - FVU = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (pooled over tokens);
* ``mse``: mean over tokens and dimensions of ``(x - x_hat)^2``;
* ``cossim``: mean over tokens of ``cos(x, x_hat)``;
* ``dead_fraction``: share of latents that never fired over ``dead_fraction_n_tokens`` tokens.

``l0`` and ``dead_fraction`` can be measured on more held-out tokens than the cross-entropy metrics
(``sparsity_tokens``, as SAELens evaluates sparsity on its own number of batches): those extra tokens only need
a forward pass that stops after the hook, not three passes through the 262k-row unembedding.

Downstream metrics (next-token cross-entropy over every prediction of a real token -- not of BOS or of a
packed document separator):

* ``ce_loss_score = (CE_zero_ablated - CE_spliced) / (CE_zero_ablated - CE_clean)``;
* ``kl_div_score = (KL_zero_ablated - KL_spliced) / KL_zero_ablated`` with ``KL(clean || intervened)``.

Splicing replaces the hook's activation by the SAE reconstruction at every real (non-BOS, non-pad)
position; zero-ablation sets the same positions to 0. BOS keeps its clean activation (as SAELens's
``exclude_special_tokens``): SAEs are not trained on BOS, whose residual norm is an outlier.
For transcoders, ``blocks.{l}.hook_mlp_out`` is replaced by the transcoder's prediction from
``blocks.{l}.mlp.hook_in`` captured in the same pass (with the skip term ``x @ skip`` of a skip transcoder).
:func:`evaluate_clt` does the same for a cross-layer transcoder, one target layer at a time.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from circuit_discovery.sae.architectures import SparseAutoencoder
from circuit_discovery.sae.harvest import collect_hook_activations, iter_token_batches, token_mask

__all__ = [
    "l0",
    "explained_variance",
    "mse",
    "cossim",
    "dead_fraction",
    "ce_loss_score",
    "kl_div_score",
    "reconstruction_metrics",
    "evaluate_sae",
    "plot_layer_metrics",
]


def l0(feats: Tensor) -> float:
    """Mean number of non-zero latents per row of ``feats`` [n, d_sae]."""
    return float((feats != 0).sum(-1).float().mean())


def explained_variance(x: Tensor, recon: Tensor) -> float:
    """``1 - sum||x - recon||^2 / sum||x - mean(x)||^2`` for ``x``, ``recon`` [n, d]."""
    x, recon = x.double(), recon.double()
    total = (x - x.mean(0)).pow(2).sum()
    if float(total) == 0.0:
        raise ValueError("explained_variance is undefined for constant inputs")
    return float(1.0 - (x - recon).pow(2).sum() / total)


def mse(x: Tensor, recon: Tensor) -> float:
    """Mean over all elements of ``(x - recon)^2``."""
    return float((x.double() - recon.double()).pow(2).mean())


def cossim(x: Tensor, recon: Tensor) -> float:
    """Mean over rows of the cosine similarity between ``x`` and ``recon`` [n, d]."""
    return float(F.cosine_similarity(x.double(), recon.double(), dim=-1).mean())


def dead_fraction(fire_counts: Tensor) -> float:
    """Share of latents whose count of activations ``fire_counts`` [d_sae] is zero."""
    return float((fire_counts == 0).float().mean())


def ce_loss_score(ce_clean: float, ce_spliced: float, ce_zero_ablated: float) -> float:
    """``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``: 1 = as good as the model, 0 = as bad as ablation."""
    denom = ce_zero_ablated - ce_clean
    if denom == 0:
        return float("nan")
    return float((ce_zero_ablated - ce_spliced) / denom)


def kl_div_score(kl_spliced: float, kl_zero_ablated: float) -> float:
    """``(KL_zero - KL_spliced) / KL_zero`` with KL measured from the clean next-token distribution."""
    if kl_zero_ablated == 0:
        return float("nan")
    return float((kl_zero_ablated - kl_spliced) / kl_zero_ablated)


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: Tensor, target: Tensor | None = None, chunk: int = 8192) -> dict:
    """Reconstruction metrics of ``sae`` on activations ``x`` [n, d_in] (``target`` [n, d_out] for transcoders)."""
    target = x if target is None else target
    sae = sae.eval()
    assert sae.cfg.d_sae is not None  # filled in by SAEConfig.__post_init__
    feats_nz, fires = [], torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    recons = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].to(sae.W_enc.device)
        f = sae.encode(xs)
        rec = sae.decode(f)
        skip = sae.skip_out(xs)  # skip transcoders: + x @ skip
        recons.append((rec if skip is None else rec + skip).float().cpu())
        feats_nz.append((f != 0).sum(-1).cpu())
        fires += (f != 0).sum(0).cpu()
    recon = torch.cat(recons)
    return {
        "l0": float(torch.cat(feats_nz).float().mean()),
        "explained_variance": explained_variance(target, recon),
        "mse": mse(target, recon),
        "cossim": cossim(target, recon),
        "dead_fraction": dead_fraction(fires),
        "dead_fraction_n_tokens": int(x.shape[0]),
    }


#: positions whose logits exist at once when :func:`next_token_losses` scores them (each ``d_vocab`` floats: 1 MB for
#: Gemma 3's 262,144 tokens)
LOSS_CHUNK = 64


def next_token_losses(model, hidden: Mapping[str, Tensor], tokens: Tensor, valid: Tensor,
                      reference: str | None = None, chunk: int = LOSS_CHUNK) -> tuple[dict, dict, int]:
    """Summed next-token losses of several runs of the same ``tokens`` [b, pos], from their final-normed hidden
    states ``hidden[name]`` [b, pos, d_model] (:meth:`HookedModel.final_hidden`): ``(nll, kl, n)`` with ``nll[name]``
    the summed negative log-likelihood of the next token over the positions ``valid`` [b, pos - 1] (a real target
    token follows), ``kl[name]`` the summed KL(reference || name) for every run but ``reference``, and ``n`` the
    number of positions. The logits are computed ``chunk`` positions at a time, so memory holds ``chunk x d_vocab``
    floats instead of ``b x pos x d_vocab`` (the full-logits tensors of a batch of 2 x 128 tokens are 268 MB each
    for Gemma 3)."""
    dev = next(iter(hidden.values())).device
    v = valid.to(dev)
    tgt = tokens.to(dev)[:, 1:][v]
    rows = {k: h[:, :-1][v] for k, h in hidden.items()}
    nll = dict.fromkeys(hidden, 0.0)
    kl = {k: 0.0 for k in hidden if k != reference}
    for i in range(0, int(tgt.shape[0]), chunk):
        t = tgt[i:i + chunk, None]
        ref = None
        if reference is not None:
            ref = model.unembed(rows[reference][i:i + chunk]).float().log_softmax(-1)
            nll[reference] += float(-ref.gather(-1, t).sum())
        for k, r in rows.items():
            if k == reference:
                continue
            lp = model.unembed(r[i:i + chunk]).float().log_softmax(-1)
            nll[k] += float(-lp.gather(-1, t).sum())
            if ref is not None:
                kl[k] += float((ref.exp() * (ref - lp)).sum())
    return nll, kl, int(tgt.shape[0])


def _first_tokens(mask: Tensor, n: int) -> Tensor:
    """``mask`` [batch, pos] restricted to its first ``n`` True entries in row-major order."""
    return mask & (mask.flatten().cumsum(0).reshape(mask.shape) <= n)


class SpliceTotals:
    """What the held-out evaluation of a dictionary adds up over batches (:func:`splice_batch`): summed next-token
    losses and KLs, latent firing counts, per-token L0, targets and reconstructions; :meth:`metrics` gives the
    SAELens-named metrics."""

    def __init__(self, d_sae: int):
        self.ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
        self.kl = {"spliced": 0.0, "zero": 0.0}
        self.n_pred = 0
        self.n_seen = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.l0s: list[Tensor] = []
        self.ys: list[Tensor] = []
        self.recs: list[Tensor] = []

    def add_latents(self, f: Tensor) -> None:
        self.fires += (f != 0).sum(0).cpu()
        self.l0s.append((f != 0).sum(-1).cpu())

    def add(self, batch: dict) -> None:
        for key in self.ce:
            self.ce[key] += batch["nll"][key]
        for key in self.kl:
            self.kl[key] += batch["kl"][key]
        self.n_pred += batch["n_pred"]
        self.n_seen += batch["n_tokens"]
        self.add_latents(batch["f"])
        self.recs.append(batch["rec"].float().cpu())
        self.ys.append(batch["y"].float().cpu())

    def metrics(self, n_sparsity: int | None = None) -> dict:
        y, recon = torch.cat(self.ys), torch.cat(self.recs)
        ce_clean, ce_spl, ce_zero = (self.ce[k] / self.n_pred for k in ("clean", "spliced", "zero"))
        kl_spl, kl_zero = self.kl["spliced"] / self.n_pred, self.kl["zero"] / self.n_pred
        return {
            "l0": float(torch.cat(self.l0s).float().mean()),
            "explained_variance": explained_variance(y, recon),
            "mse": mse(y, recon),
            "cossim": cossim(y, recon),
            "ce_loss_score": ce_loss_score(ce_clean, ce_spl, ce_zero),
            "kl_div_score": kl_div_score(kl_spl, kl_zero),
            "ce_clean": ce_clean,
            "ce_spliced": ce_spl,
            "ce_zero_ablated": ce_zero,
            "kl_spliced": kl_spl,
            "kl_zero_ablated": kl_zero,
            "dead_fraction": dead_fraction(self.fires),
            "dead_fraction_n_tokens": self.n_seen if n_sparsity is None else n_sparsity,
            "n_tokens": self.n_seen,
        }


def splice_batch(model, tokens: Tensor, mask: Tensor, keep: Tensor, in_hooks: Sequence[str], out_hook: str,
                 reconstruct) -> dict:
    """The three runs of one batch that score a dictionary at ``out_hook``: clean (capturing ``in_hooks`` and the
    target ``out_hook``), spliced (``out_hook`` at the ``keep`` positions replaced by the reconstruction) and zero
    (``out_hook`` zeroed there). ``reconstruct(inputs, x)`` gets ``{hook: Tensor[kept, d]}`` of ``in_hooks`` and
    ``out_hook``'s own kept rows and returns ``(latents, reconstruction)``. Returns ``{"nll", "kl", "n_pred"}``
    (:func:`next_token_losses` against the clean run, over the kept positions' next tokens), ``"n_tokens"``, and the
    kept rows' ``"f"``, ``"rec"`` and target ``"y"``."""
    state: dict[str, Any] = {"x": {}}

    def capture(x, name):
        state["x"][name] = x

    def splice(x, name, mode):
        if mode == "capture":
            state["y"] = x.detach().clone()
            return None
        m = keep.to(x.device)
        if mode == "zero":
            return torch.where(m[..., None], torch.zeros_like(x), x)
        f, rec = reconstruct({h: v[m] for h, v in state["x"].items()}, x[m])
        state["f"], state["rec"] = f, rec.to(x.dtype).to(x.device)
        out = x.clone()
        out[m] = state["rec"]
        return out

    def run(mode: str) -> Tensor:
        hooks: list = [(h, capture) for h in in_hooks]
        hooks.append((out_hook, lambda x, name: splice(x, name, mode)))
        with model.hooks(hooks):
            return model.final_hidden(tokens, attention_mask=mask)

    hidden = {"clean": run("capture"), "spliced": run("sae"), "zero": run("zero")}
    # predictions of real (kept) tokens only: BOS, a packed document separator and pads are not targets
    nll, kl, n = next_token_losses(model, hidden, tokens, keep[:, 1:], reference="clean")
    return {"nll": nll, "kl": kl, "n_pred": n, "n_tokens": int(keep.sum()), "f": state["f"], "rec": state["rec"],
            "y": state["y"][keep.to(state["y"].device)]}


@torch.no_grad()
def evaluate_sae(
    model,
    sae: SparseAutoencoder,
    hook_name: str,
    texts: Sequence[str],
    n_tokens: int = 4096,
    context_size: int = 128,
    batch_size: int = 2,
    hook_name_out: str | None = None,
    sparsity_tokens: int | None = None,
) -> dict:
    """All metrics of ``sae`` at ``hook_name`` on held-out ``texts`` (at most ``n_tokens`` real tokens).

    ``sparsity_tokens`` (> ``n_tokens``): ``l0`` and ``dead_fraction`` also count the latents of further held-out
    tokens, up to that many in all (as many as ``texts`` hold); ``dead_fraction_n_tokens`` says how many.

    For transcoders pass ``hook_name="blocks.{l}.mlp.hook_in"`` and
    ``hook_name_out="blocks.{l}.hook_mlp_out"`` (read from ``sae.cfg.metadata`` when omitted).
    Returns the SAELens-named metrics plus ``ce_clean``, ``ce_spliced``, ``ce_zero_ablated``,
    ``kl_spliced``, ``kl_zero_ablated``, ``n_tokens`` and ``dead_fraction_n_tokens``.
    """
    if sae.cfg.transcoder and hook_name_out is None:
        hook_name_out = sae.cfg.metadata.get("hook_name_out")
        if not hook_name_out:
            raise ValueError("transcoder evaluation needs hook_name_out")
    out_hook = hook_name_out or hook_name
    model.check_hook_name(hook_name)
    model.check_hook_name(out_hook)
    sae = sae.eval()
    dev = sae.W_enc.device

    assert sae.cfg.d_sae is not None  # filled in by SAEConfig.__post_init__
    totals = SpliceTotals(sae.cfg.d_sae)

    def reconstruct(inputs, x):
        xin = (inputs[hook_name] if sae.cfg.transcoder else x).to(dev)
        f = sae.encode(xin)
        skip = sae.skip_out(xin)  # skip transcoders: + x @ skip
        rec = sae.decode(f)
        return f, rec if skip is None else rec + skip

    batches = iter_token_batches(model, texts, context_size, batch_size)
    rest: list[tuple[Tensor, Tensor, Tensor]] = []  # the tokens of the last batch beyond n_tokens
    for tokens, mask in batches:
        real = token_mask(model, tokens, mask)
        # cap tokens: drop rows beyond the budget
        keep = _first_tokens(real, n_tokens - totals.n_seen)
        if bool((real & ~keep).any()):
            rest.append((tokens, mask, real & ~keep))
        rows = keep.any(1)
        if not bool(rows.all()):  # rows past the token budget: do not run them at all
            tokens, mask, keep = tokens[rows], mask[rows], keep[rows]
        totals.add(splice_batch(model, tokens, mask, keep, [hook_name] if sae.cfg.transcoder else [], out_hook,
                                reconstruct))
        if totals.n_seen >= n_tokens:
            break

    if totals.n_seen == 0:
        raise ValueError("no evaluation tokens: texts are empty")
    n_sparsity = totals.n_seen
    more = ((t, m, token_mask(model, t, m)) for t, m in batches)
    sparsity_target = sparsity_tokens or 0
    for tokens, mask, keep in chain(rest, more) if sparsity_target > totals.n_seen else ():
        keep = _first_tokens(keep, sparsity_target - n_sparsity)
        x = collect_hook_activations(model, tokens, mask, [hook_name])[hook_name][keep]
        totals.add_latents(sae.encode(x.to(dev)))  # (evaluate_sae runs without gradients)
        n_sparsity += int(keep.sum())
        if n_sparsity >= sparsity_target:
            break
    return totals.metrics(n_sparsity)


def plot_layer_metrics(layers: dict[str, dict], path: str, title: str | None = None,
                       metrics: Sequence[str] = ("explained_variance", "ce_loss_score", "dead_fraction", "l0")) -> None:
    """Plot ``metrics`` of each hook in ``layers`` ({hook name: metrics dict}) against the layer -> PNG ``path``,
    with the quality bar dashed: :func:`circuit_discovery.report.figures.sae_metrics_per_layer`."""
    from circuit_discovery.report.figures import sae_metrics_per_layer  # lazy: report sits above sae

    sae_metrics_per_layer(layers, path, title=title, names=metrics)
