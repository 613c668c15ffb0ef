"""Causal tracing as in ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

For each fact: the clean run gives ``p_clean``, the probability of the answer's first token at the last
position. The corrupted run adds Gaussian noise with standard deviation ``noise_scale`` x sigma_subj to the
subject tokens' embeddings, where sigma_subj is the std of the embeddings of the subject tokens of the traced
facts (as ``hook_embed`` sees them; ROME's ``collect_embedding_std`` with ``noise_level = 3 x std``,
:func:`~.inputs.subject_embedding_std`) — not of the whole vocabulary. ``noise_std`` gives the absolute noise
std instead (e.g. sigma computed once over every relation's subjects when tracing relation by relation).
``n_samples`` (default 10, as ROME) seeded noise draws give ``p_corrupted`` (their mean). Then, in each noised
run, one node is restored to its clean value:

* ``states``: the hidden state after layer ``l`` (``blocks.{l}.hook_resid_post``) at one position;
* ``mlp`` / ``attn``: the MLP / attention outputs of a window of ``window`` layers centred on ``l`` at one
  position (ROME uses 10 layers of GPT-2 XL's 48; :func:`default_window` scales that to the model's depth).

``indirect effect = p_restored - p_corrupted`` (averaged over the noise samples), ``total effect =
p_clean - p_corrupted``. Positions are grouped into ROME's token classes (first / middle / last subject token,
first subsequent token, further tokens, last token); tokens before the subject (BOS, "The") are in no class.
All restored runs go through the batched patching engine (:func:`~.patching.patch_runs`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from circuit_discovery.attribution.inputs import PairInputs, _check_noise_std, cached_run, subject_embedding_std
from circuit_discovery.attribution.patching import Patch, patch_runs, window_layers
from circuit_discovery.attribution.scores import Scores
from circuit_discovery.errors import InputError
from circuit_discovery.metrics import PromptBatch, make_batch
from circuit_discovery.nodes import Node

TOKEN_CLASSES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
KINDS = {"states": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


def answer_prob(model, hidden: Tensor, batch: PromptBatch) -> Tensor:
    """P(first answer token) at the last prompt token [batch]: one batched full-vocabulary unembedding
    (``metrics.prob`` unembeds row by row, which reads the 262k-row unembedding once per row)."""
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last]  # [batch, d_model]
    logp = torch.log_softmax(model.unembed(last).float(), dim=-1)  # [batch, d_vocab]
    return logp.gather(1, batch.answer_first[:, None])[:, 0].exp()


def default_window(n_layers: int) -> int:
    """ROME's window of 10 layers (of 48) scaled to ``n_layers``: ``clip(round(10 n / 48), 1, 10)``."""
    return int(max(1, min(10, round(10 * n_layers / 48))))


def token_classes(n_tokens: int, subject_span: tuple[int, int]) -> dict[str, list[int]]:
    """Positions of each token class. A one-token subject is both the first and the last subject token."""
    s, e = subject_span
    if not 0 <= s < e <= n_tokens - 1:
        raise InputError(f"subject span {subject_span} must lie before the last of {n_tokens} tokens")
    last = n_tokens - 1
    return {"first_subject": [s], "middle_subject": list(range(s + 1, e - 1)), "last_subject": [e - 1],
            "first_subsequent": [e] if e < last else [], "further": list(range(e + 1, last)), "last": [last]}


@dataclass
class CausalTrace:
    """Result of :func:`causal_tracing`.

    ``scores``: indirect effects per fact over nodes ``resid_post`` (states), ``mlp_out`` and ``attn_out`` at
    (layer, position) (the node's layer is the window's centre for MLP/attention); ``p_clean``/``p_corrupted``
    [n_facts]; ``spans``: subject spans; ``window``, ``n_samples``, ``noise_std`` (absolute).
    """
    scores: Scores
    p_clean: Tensor
    p_corrupted: Tensor
    spans: list[tuple[int, int]]
    window: int
    n_samples: int
    noise_std: float
    prompts: list[str] = field(default_factory=list)

    @property
    def total_effect(self) -> Tensor:
        """p_clean - p_corrupted per fact [n_facts]."""
        return self.p_clean - self.p_corrupted

    def by_class(self, kind: str) -> np.ndarray:
        """Average indirect effect [n_classes, n_layers] of ``kind`` (``states``/``mlp``/``attn``): the mean over
        a fact's positions of each class, then over the facts that have the class."""
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        arr = self.scores.per_prompt_array(KINDS[kind])  # [n_facts, n_layers, n_pos]
        out = np.full((len(TOKEN_CLASSES), arr.shape[1]), np.nan)
        for c, cls in enumerate(TOKEN_CLASSES):
            rows = []
            for f, span in enumerate(self.spans):
                pos = token_classes(len(self.scores.tokens[f]), span)[cls]
                if pos:
                    rows.append(np.nanmean(arr[f][:, pos], axis=1))
            if rows:
                out[c] = np.mean(rows, axis=0)
        return out

    def at_subject_last(self, kind: str) -> np.ndarray:
        """Indirect effect at each fact's last subject token [n_facts, n_layers] of ``kind`` (``states``/``mlp``/
        ``attn``): ``scores.per_prompt_array(KINDS[kind])[f, :, subject_span[f][1] - 1]``."""
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if KINDS[kind] not in self.scores.components():
            raise InputError(f"kind {kind!r} was not traced; pass it in kinds=")
        arr = self.scores.per_prompt_array(KINDS[kind])  # [n_facts, n_layers, n_pos]
        return np.stack([arr[f][:, e - 1] for f, (_, e) in enumerate(self.spans)])

    def summary(self) -> dict:
        """Average total effect, and per kind the class x layer table and its peak."""
        out = {"n_facts": int(self.p_clean.shape[0]), "window": self.window, "n_samples": self.n_samples,
               "noise_std": self.noise_std, "p_clean": float(self.p_clean.mean()),
               "p_corrupted": float(self.p_corrupted.mean()), "total_effect": float(self.total_effect.mean()),
               "classes": list(TOKEN_CLASSES)}
        for kind in KINDS:
            if KINDS[kind] not in self.scores.components():
                continue
            t = self.by_class(kind)
            c, l = np.unravel_index(np.nanargmax(t), t.shape)
            out[kind] = {"table": t.tolist(), "peak": {"class": TOKEN_CLASSES[c], "layer": int(l),
                                                       "indirect_effect": float(t[c, l])}}
        return out

    def figure(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """ROME-style PNG of the :meth:`by_class` tables (states, MLP, attention; a kind not traced is left
        blank), drawn by :func:`circuit_discovery.report.figures.causal_tracing_figure` as in the report."""
        from circuit_discovery.report.figures import causal_tracing_figure  # lazy: report sits above attribution

        tables = {k: self.by_class(k) for k in KINDS if KINDS[k] in self.scores.components()}
        blank = np.full(next(iter(tables.values())).shape, np.nan)
        states, mlp, attn = (tables.get(k, blank) for k in KINDS)
        return causal_tracing_figure(states, mlp, attn, list(TOKEN_CLASSES), path,
                                     title=title or f"Causal tracing (ROME), mean over {self.p_clean.shape[0]} facts")


def subject_noise(pairs, n_samples: int, d_model: int, sigma: float, seed: int = 0,
                  n_pos: int | None = None) -> Tensor:
    """The corruption of :func:`causal_tracing`: ``[n_facts * n_samples, n_pos, d_model]`` float64, row
    ``f * n_samples + k`` = sample ``k`` of fact ``f``; N(0, sigma^2) on the fact's subject positions, exactly 0
    elsewhere. Deterministic for ``seed``."""
    n_pos = max(len(p.clean_tokens) for p in pairs) if n_pos is None else n_pos
    gen = torch.Generator().manual_seed(seed)
    noise = torch.zeros(len(pairs) * n_samples, n_pos, d_model, dtype=torch.float64)
    for i, p in enumerate(pairs):
        s, e = p.subject_span
        token_classes(len(p.clean_tokens), (s, e))  # validates the span
        for k in range(n_samples):
            noise[i * n_samples + k, s:e] = torch.randn(e - s, d_model, generator=gen, dtype=torch.float64)
    return sigma * noise


def causal_tracing(model, pairs, *, kinds: Sequence[str] = ("states", "mlp", "attn"), n_samples: int = 10,
                   noise_scale: float = 3.0, window: int | None = None, seed: int = 0, batch_size: int = 64,
                   layers: Sequence[int] | None = None, roles: Sequence[str] | None = None,
                   noise_std: float | None = None) -> CausalTrace:
    """Trace every (layer, position) of each fact pair's clean prompt (see the module docstring).

    ``pairs``: FactPairs (only the clean prompt, subject span and answer are used). Cost: ``n_facts x n_samples
    x n_pos x n_layers x len(kinds)`` restored rows, each starting at its lowest restored layer. ``roles`` (e.g.
    ``["subject_last"]``) restricts the restored positions to those token roles of each pair (the others are
    NaN), which divides the cost by about the prompt length. ``noise_std``: absolute std of the subject noise
    (default ``noise_scale`` x :func:`~.inputs.subject_embedding_std` of ``pairs``). Noise draws depend only on
    ``seed`` and the pairs (same seed, same pairs: same result).
    """
    pairs = list(pairs)
    if not pairs:
        raise InputError("no fact pairs to trace")
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InputError(f"unknown kinds {bad}; choose from {', '.join(KINDS)}")
    n_layers = model.cfg.n_layers
    window = default_window(n_layers) if window is None else window
    layers = list(range(n_layers)) if layers is None else list(layers)
    if noise_std is None:
        emb_std = subject_embedding_std(model, pairs)
        sigma = noise_scale * emb_std
    else:
        sigma = _check_noise_std(noise_std)
        emb_std = sigma / noise_scale if noise_scale else float("nan")
    # every (fact, sample) is one "prompt": the clean tokens, with its own noise on the subject
    toks = [list(p.clean_tokens) for p in pairs for _ in range(n_samples)]
    answers = [[p.answer_tokens[0]] for p in pairs for _ in range(n_samples)]
    batch = make_batch(model, toks, answers)
    n_rows, n_pos = batch.tokens.shape
    noise = subject_noise(pairs, n_samples, model.cfg.d_model, sigma, seed, n_pos=n_pos)
    noise = noise.to(model.dtype).to(model.device)
    inputs = PairInputs(batch, batch, noise, [[]] * n_rows, [[]] * n_rows)

    nodes: list[Node] = []
    variants: list[tuple[int, list[Patch]]] = []
    where: list[tuple[int, int]] = []
    for kind in kinds:
        comp = KINDS[kind]
        for l in layers:
            # the hooks restored for a node at (kind, l); one Patch per hook at the node's position
            if kind == "states":
                restored = [f"blocks.{l + 1}.hook_resid_pre" if l + 1 < n_layers else f"blocks.{l}.hook_resid_post"]
            else:
                restored = [f"blocks.{x}.hook_{comp}" for x in window_layers(l, window, n_layers, "center")]
            for pos in range(n_pos):
                j = len(nodes)
                nodes.append(Node(comp, l, pos))
                for f, pr in enumerate(pairs):
                    if pos >= len(pr.clean_tokens) or (roles is not None and pr.roles[pos] not in roles):
                        continue
                    for k in range(n_samples):
                        variants.append((f * n_samples + k, [Patch(h, pos) for h in restored]))
                        where.append((f, j))
    # one clean and one noised run give both the unrestored probabilities and the caches of the restored runs
    hooks = sorted({p.hook for _, ps in variants for p in ps})
    p_corr_rows, base_cache = cached_run(model, inputs, "corrupted",
                                         [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)], answer_prob)
    p_clean_rows, src_cache = cached_run(model, inputs, "clean", hooks, answer_prob)
    p_clean = p_clean_rows.double().cpu().view(len(pairs), n_samples)[:, 0]
    p_corr = p_corr_rows.double().cpu().view(len(pairs), n_samples).mean(1)
    m = patch_runs(model, inputs, variants, direction="denoising", metric=answer_prob, batch_size=batch_size,
                   caches=(base_cache, src_cache)) if variants else torch.empty(0, dtype=torch.float64)
    acc = torch.zeros(len(pairs), len(nodes), dtype=torch.float64)
    cnt = torch.zeros_like(acc)
    for (f, j), v in zip(where, m.tolist()):
        acc[f, j] += v
        cnt[f, j] += 1
    values = torch.where(cnt > 0, acc / cnt.clamp(min=1) - p_corr[:, None], torch.full_like(acc, float("nan")))
    tokens = [[model.tokenizer.decode([t]) for t in p.clean_tokens] for p in pairs]
    scores = Scores(nodes=nodes, values=values, tokens=tokens, roles=[list(p.roles) for p in pairs],
                    clean_metric=p_clean, corrupted_metric=p_corr, method="causal_tracing", metric="prob",
                    meta={"window": window, "n_samples": n_samples, "noise_scale": noise_scale, "noise_std": sigma,
                          "embedding_std": emb_std, "noise_std_source": "subject_tokens" if noise_std is None
                          else "given",
                          "seed": seed, "states_hook": "resid_post", "window_align": "center"})
    return CausalTrace(scores, p_clean, p_corr, [tuple(p.subject_span) for p in pairs], window, n_samples,
                       sigma, [p.clean_prompt for p in pairs])
