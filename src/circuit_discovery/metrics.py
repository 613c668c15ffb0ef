"""Metrics of a fact's recall, computing only the logits they need.

The unembedding of Gemma 3 270M has 262,144 rows: a full-vocabulary unembedding of every position costs more
than the rest of the model. So:

* ``logit_diff`` (answer minus counterfactual answer, first tokens) unembeds only two rows at the last position;
* ``logprob`` (the answer's log-probability, summed over its tokens, teacher-forced) needs the log-normaliser,
  so it unembeds the full vocabulary, but only at the answer's positions;
* ``prob`` is ``exp(logprob)``.

A metric is evaluated from the final-normed hidden states ``hidden`` [batch, pos, d_model], so every attribution
method (patching, gradients, IG) calls it the same way: ``metric(model, hidden, batch) -> [batch]``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuit_discovery.errors import InputError

METRICS = ("logit_diff", "logprob", "prob")


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts with their answers, ready for a metric.

    ``tokens`` [batch, pos] (right-padded; for multi-token answers the answer's tokens but the last are appended
    so the answer is teacher-forced), ``mask`` [batch, pos], ``last`` [batch] (index of the last prompt token),
    ``answer_ids`` list of answer token lists, ``cf_ids`` list of counterfactual token lists (may be empty).
    """
    tokens: Tensor
    mask: Tensor
    last: Tensor
    answer_ids: list[list[int]]
    cf_ids: list[list[int]]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def answer_first(self) -> Tensor:
        return torch.tensor([a[0] for a in self.answer_ids], device=self.tokens.device)

    @property
    def cf_first(self) -> Tensor:
        if any(len(c) == 0 for c in self.cf_ids):
            raise InputError("logit_diff needs a counterfactual answer for every prompt; use metric='logprob'")
        return torch.tensor([c[0] for c in self.cf_ids], device=self.tokens.device)


def make_batch(model, prompt_token_lists: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
               cf_ids: Sequence[Sequence[int]] | None = None, teacher_force: bool = False) -> PromptBatch:
    """Build a right-padded batch from token-id lists (BOS already included).

    ``teacher_force``: append each answer's tokens but the last, so ``logprob`` can read every answer token.
    """
    if not prompt_token_lists:
        raise InputError("empty batch: give at least one prompt")
    rows, last = [], []
    for toks, ans in zip(prompt_token_lists, answer_ids):
        if len(ans) == 0:
            raise InputError("an answer has no tokens; give each fact a non-empty answer")
        row = list(toks) + (list(ans[:-1]) if teacher_force else [])
        rows.append(row)
        last.append(len(toks) - 1)
    n = max(len(r) for r in rows)
    if n > model.cfg.n_ctx:
        raise InputError(f"prompt of {n} tokens is longer than the model's context of {model.cfg.n_ctx}; shorten it")
    pad = model.cfg.pad_token_id or 0
    tokens = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    dev = model.device
    return PromptBatch(tokens.to(dev), mask.to(dev), torch.tensor(last, device=dev),
                       [list(a) for a in answer_ids], [list(c) for c in (cf_ids or [[] for _ in rows])])


def batch_from_pairs(model, pairs, corrupted: bool = False, teacher_force: bool = False) -> PromptBatch:
    """A :class:`PromptBatch` of the clean (or corrupted) prompts of fact pairs, scored on the clean answers."""
    toks = [p.corrupted_tokens if corrupted else p.clean_tokens for p in pairs]
    return make_batch(model, toks, [p.answer_tokens for p in pairs],
                      [p.counterfactual_tokens or () for p in pairs], teacher_force=teacher_force)


def _rows(h: Tensor, idx: Tensor) -> Tensor:
    return h[torch.arange(h.shape[0], device=h.device), idx]


def logit_diff(model, hidden: Tensor, batch: PromptBatch) -> Tensor:
    """Answer logit minus counterfactual logit at the last prompt token (first answer tokens) [batch]."""
    ids = torch.stack([batch.answer_first, batch.cf_first], dim=1)  # [batch, 2]
    lg = model.unembed(_rows(hidden, batch.last), ids)
    return lg[:, 0] - lg[:, 1]


def logprob(model, hidden: Tensor, batch: PromptBatch) -> Tensor:
    """log P(answer | prompt), summed over the answer's tokens (teacher-forced when the batch was built so)."""
    out = []
    for i, ans in enumerate(batch.answer_ids):
        k = len(ans)
        pos = batch.last[i] + torch.arange(k, device=hidden.device)
        if pos[-1] >= hidden.shape[1] and k > 1:
            raise InputError("multi-token answers need a teacher-forced batch (make_batch(teacher_force=True))")
        lp = torch.log_softmax(model.unembed(hidden[i, pos]).float(), dim=-1)  # [k, vocab]
        out.append(lp[torch.arange(k, device=hidden.device), torch.tensor(ans, device=hidden.device)].sum())
    return torch.stack(out)


def prob(model, hidden: Tensor, batch: PromptBatch) -> Tensor:
    return logprob(model, hidden, batch).exp()


MetricFn = Callable[[object, Tensor, PromptBatch], Tensor]
_TABLE: dict[str, MetricFn] = {"logit_diff": logit_diff, "logprob": logprob, "prob": prob}


def get_metric(name: str | MetricFn) -> MetricFn:
    if callable(name):
        return name
    try:
        return _TABLE[name]
    except KeyError:
        raise InputError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


def evaluate(model, batch: PromptBatch, metric: str | MetricFn = "logit_diff") -> Tensor:
    """Run the model on ``batch`` and return the metric per prompt [batch] (no gradients)."""
    with torch.no_grad():
        return get_metric(metric)(model, model.final_hidden(batch.tokens, batch.mask), batch)


def answer_rank(logits: Tensor, answer_first: Tensor) -> Tensor:
    """Rank (1 = top) of each row's answer token in ``logits`` [batch, vocab]; ties count against the answer."""
    target = logits.gather(1, answer_first[:, None])
    return (logits >= target).sum(dim=1)
