"""Feature labels: top-activating contexts, promoted/suppressed tokens, and a short automatic label.

Logit effects of feature ``f``: ``model.unembed(model.final_norm(W_dec[f]))``. Applying the final norm
to the decoder direction alone folds the final norm's per-dimension weight into the direction; the
norm's 1/RMS factor is a positive scalar per feature, so the *ranking* of promoted/suppressed tokens
equals that of ``(W_dec[f] * norm_weight) @ W_U`` (softcapping, where present, is monotone). The
values are therefore comparable within a feature, not across features.
This is the direct path only: it ignores later layers and the change in the norm's scale.
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuit_discovery.sae.architectures import SparseAutoencoder
from circuit_discovery.sae.harvest import collect_hook_activations, iter_token_batches, token_mask

__all__ = ["FeatureLabel", "top_activating_contexts", "top_activating_contexts_multi", "direction_logit_effects",
           "feature_logit_effects", "auto_label", "label_features"]


@dataclass
class FeatureLabel:
    feature: int
    label: str
    top_contexts: list[dict] = field(default_factory=list)  # {"activation", "token", "text"} (text marks «token»)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    density: float = 0.0  # share of tokens on which the feature fired

    def to_dict(self) -> dict:
        return {
            "feature": self.feature,
            "label": self.label,
            "density": self.density,
            "top_contexts": self.top_contexts,
            "promoted": [[t, v] for t, v in self.promoted],
            "suppressed": [[t, v] for t, v in self.suppressed],
        }


def _decode(model, ids: Sequence[int]) -> str:
    return model.tokenizer.decode([int(i) for i in ids])


@torch.no_grad()
def top_activating_contexts(
    model,
    sae: SparseAutoencoder,
    hook_name: str,
    texts: Sequence[str],
    features: Sequence[int] | None = None,
    k: int = 10,
    window: int = 8,
    context_size: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> tuple[dict[int, list[dict]], Tensor, int]:
    """Top-``k`` activations of each feature over ``texts``.

    Returns ``(contexts, fire_counts [d_sae], n_tokens)``; ``contexts[f]`` is a list (strongest first) of
    ``{"activation", "token", "text"}`` with up to ``window`` tokens before the activating token,
    which is marked ``«token»``. BOS and padding are never counted.
    """
    ctxs, fires, n_tok = top_activating_contexts_multi(
        model, {hook_name: sae}, texts, None if features is None else {hook_name: features}, k=k, window=window,
        context_size=context_size, batch_size=batch_size, max_tokens=max_tokens)
    return ctxs[hook_name], fires[hook_name], n_tok


@torch.no_grad()
def top_activating_contexts_multi(
    model,
    saes: Mapping[str, SparseAutoencoder],
    texts: Sequence[str],
    features: Mapping[str, Sequence[int]] | None = None,
    k: int = 10,
    window: int = 8,
    context_size: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> tuple[dict[str, dict[int, list[dict]]], dict[str, Tensor], int]:
    """:func:`top_activating_contexts` for several dictionaries at once (``{hook: sae}``; ``features``:
    ``{hook: [feature, ...]}``, default all), reading every hook from one forward pass per batch."""
    sel: dict[str, Tensor] = {}
    heaps: dict[str, dict[int, list]] = {}
    widths: dict[str, int] = {}
    for hook, sae in saes.items():
        d_sae = sae.cfg.d_sae
        assert d_sae is not None  # filled in by SAEConfig.__post_init__
        widths[hook] = d_sae
        feats = list(range(d_sae)) if features is None or hook not in features else \
            [int(f) for f in features[hook]]
        for f in feats:
            if not 0 <= f < d_sae:
                raise IndexError(f"feature {f} out of range 0..{d_sae - 1}")
        sel[hook] = torch.tensor(feats, dtype=torch.long)
        heaps[hook] = {f: [] for f in feats}
    fires = {hook: torch.zeros(widths[hook], dtype=torch.long) for hook in saes}
    n_tok, counter = 0, 0
    for tokens, mask in iter_token_batches(model, texts, context_size, batch_size):
        cache = collect_hook_activations(model, tokens, mask, list(saes))
        keep = token_mask(model, tokens, mask)
        for hook, sae in saes.items():
            acts = cache[hook]
            f_all = sae.eval().encode(acts.reshape(*acts.shape[:2], -1).to(sae.W_enc.device)).cpu()  # [b, pos, d]
            f_all = f_all * keep[..., None].cpu()
            fires[hook] += (f_all != 0).sum((0, 1))
            feats = sel[hook].tolist()
            if not feats:
                continue
            fsel = f_all[..., sel[hook]]  # [b, pos, n_sel]
            top = min(k, fsel.shape[0] * fsel.shape[1])
            vals, flat = fsel.reshape(-1, len(feats)).topk(top, dim=0)
            for j, f in enumerate(feats):
                for v, idx in zip(vals[:, j].tolist(), flat[:, j].tolist()):
                    if v <= 0:
                        break
                    counter += 1
                    row, pos = int(idx) // fsel.shape[1], int(idx) % fsel.shape[1]
                    h = heaps[hook][f]
                    if len(h) < k:
                        heapq.heappush(h, (v, -counter, tokens[row].cpu(), pos))
                    elif v > h[0][0]:
                        heapq.heapreplace(h, (v, -counter, tokens[row].cpu(), pos))
        n_tok += int(keep.sum())
        if max_tokens is not None and n_tok >= max_tokens:
            break
    bos = model.cfg.bos_token_id
    out: dict[str, dict[int, list[dict]]] = {}
    for hook, hs in heaps.items():
        out[hook] = {}
        for f, h in hs.items():
            ctxs = []
            for v, _, row, pos in sorted(h, key=lambda t: (-t[0], -t[1])):
                lo = max(0, pos - window)
                before = [t for t in row[lo:pos].tolist() if t != bos]
                tok = _decode(model, [row[pos]])
                ctxs.append({"activation": float(v), "token": tok, "text": f"{_decode(model, before)}«{tok}»"})
            out[hook][f] = ctxs
    return out, fires, n_tok


@torch.no_grad()
def direction_logit_effects(model, dirs: Tensor, top_n: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direct logit effect of directions ``dirs`` [n, d_model] through the final norm and the unembedding, demeaned
    over the vocabulary: ``(promoted values, promoted ids, suppressed values, suppressed ids)``, each [n, top_n]
    (suppressed values are the negated effects). One unembedding call for all ``n`` (it is bound by reading the
    vocabulary matrix, so callers should stack directions, also across layers)."""
    dirs = dirs.detach().to(model.device, dtype=next(model.hf_model.parameters()).dtype)
    logits = model.unembed(model.final_norm(dirs)).float()  # [n, vocab]
    logits = logits - logits.mean(-1, keepdim=True)
    pv, pi = logits.topk(top_n, dim=-1)
    sv, si = (-logits).topk(top_n, dim=-1)
    return pv, pi, sv, si


@torch.no_grad()
def feature_logit_effects(
    model, sae: SparseAutoencoder, features: Sequence[int], top_n: int = 10, chunk: int = 32
) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """``{feature: (promoted, suppressed)}``: the ``top_n`` tokens with the largest / smallest direct logit
    effect of the feature's decoder direction (see module docstring for the norm convention)."""
    out = {}
    feats = [int(f) for f in features]
    for s in range(0, len(feats), chunk):
        ids = feats[s : s + chunk]
        pv, pi, sv, si = direction_logit_effects(model, sae.W_dec[ids], top_n)
        for j, f in enumerate(ids):
            prom = [(_decode(model, [t]), float(v)) for t, v in zip(pi[j].tolist(), pv[j].tolist())]
            supp = [(_decode(model, [t]), -float(v)) for t, v in zip(si[j].tolist(), sv[j].tolist())]
            out[f] = (prom, supp)
    return out


def auto_label(top_contexts: list[dict], promoted: list[tuple[str, float]], n: int = 3) -> str:
    """Short label ``'on "Paris"/" France" → " French"/" Paris"'`` from the most frequent activating tokens
    (weighted by activation) and the top promoted tokens."""
    if not top_contexts:
        return "dead (never fired)"
    weight: dict[str, float] = {}
    for c in top_contexts:
        weight[c["token"]] = weight.get(c["token"], 0.0) + c["activation"]
    on = sorted(weight, key=lambda t: -weight[t])[:n]
    lab = "on " + "/".join(repr(t.replace("\n", "\\n"))[1:-1].join('""') for t in on)
    if promoted:
        lab += " → " + "/".join(repr(t.replace("\n", "\\n"))[1:-1].join('""') for t, _ in promoted[:n])
    return lab


def label_features(
    model,
    sae: SparseAutoencoder,
    hook_name: str,
    texts: Sequence[str],
    features: Sequence[int] | None = None,
    k: int = 10,
    top_n: int = 10,
    window: int = 8,
    max_tokens: int | None = None,
) -> dict[int, FeatureLabel]:
    """Contexts, logit effects and an automatic label for ``features`` (all when None)."""
    assert sae.cfg.d_sae is not None  # filled in by SAEConfig.__post_init__
    feats = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    ctxs, fires, n_tok = top_activating_contexts(
        model, sae, hook_name, texts, feats, k=k, window=window, max_tokens=max_tokens
    )
    effects = feature_logit_effects(model, sae, feats, top_n=top_n)
    out = {}
    for f in feats:
        prom, supp = effects[f]
        out[f] = FeatureLabel(
            feature=f,
            label=auto_label(ctxs[f], prom),
            top_contexts=ctxs[f],
            promoted=prom,
            suppressed=supp,
            density=float(fires[f]) / max(1, n_tok),
        )
    return out
