"""Pipeline glue for the attribution stage: metric-ready fact pairs, and per-relation exact patching scores
aligned by token role (the heatmaps of the report)."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch

from ..facts import ROLES, build_pairs, informative_pair
from .config import RunConfig

log = logging.getLogger(__name__)


def metric_pairs(model, facts, seed: int, metric: str = "logit_diff") -> tuple[list, int]:
    """Fact pairs ready for ``metric``: for ``logit_diff`` answer tokens shared with the counterfactual move into
    both prompts (:func:`~circuit_discovery.facts.informative_pair`), and pairs without a usable counterfactual
    are dropped. Returns (pairs, number dropped)."""
    pairs = build_pairs(facts, model.tokenizer, seed=seed)
    if metric != "logit_diff":
        return pairs, 0
    ready = [q for q in (informative_pair(p, model.tokenizer) for p in pairs) if q is not None]
    return ready, len(pairs) - len(ready)


def relation_pairs(model, facts, cfg: RunConfig) -> list:
    """The relation's first ``cfg.max_facts`` metric-ready pairs, subject-swap pairs first (component graphs need
    a corrupted prompt: a noise pair's corrupted tokens equal its clean ones). Counterfactual subjects are drawn
    from all of ``facts``."""
    pairs, _ = metric_pairs(model, facts, cfg.seed, cfg.metric)
    pairs = [p for p in pairs if p.corruption == "subject_swap"] + [p for p in pairs if p.corruption != "subject_swap"]
    return pairs[: cfg.max_facts]


def relation_patching(model, facts, cfg: RunConfig, max_prompts: int | None = None) -> dict | None:
    """Denoising activation patching of ``resid_pre`` over (layer, position) for each fact of one relation.

    Scores are normalised per prompt as (m(patched) - m(corrupted)) / (m(clean) - m(corrupted)), so 1 means
    "restores the whole logit difference", then averaged per (layer, role) over prompts.
    """
    from ..attribution.patching import activation_patching

    pairs, dropped = metric_pairs(model, facts, cfg.seed, cfg.metric)
    pairs = pairs[:max_prompts] if max_prompts else pairs
    if not pairs:
        log.warning("relation %s: no fact has a counterfactual answer that differs from its answer; skipped "
                    "(use metric='logprob' or add counterfactuals)", facts[0].relation)
        return None
    n_layers = model.cfg.n_layers
    role_sum: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n_layers))
    role_cnt: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n_layers))
    clean_m, corr_m, example, used = [], [], None, 0
    for pair in pairs:
        res = activation_patching(model, [pair], components=("resid_pre",), direction="denoising",
                                  metric=cfg.metric, batch_size=cfg.batch_size, normalize=True)
        s = res.per_prompt_array("resid_pre")[0]  # [n_layers, n_pos]
        clean_m.append(float(res.clean_metric[0]))
        corr_m.append(float(res.corrupted_metric[0]))
        for pos, role in enumerate(pair.roles):
            role_sum[role] += s[:, pos]
            role_cnt[role] += 1
        if example is None:
            example = (s, model.to_str_tokens(torch.tensor(pair.clean_tokens)), pair.clean_prompt)
        used += 1
    roles = [r for r in ROLES if r in role_sum]
    mat = np.stack([role_sum[r] / np.maximum(role_cnt[r], 1) for r in roles], axis=1)  # [n_layers, n_roles]
    return {
        "roles": roles, "role_scores": mat.tolist(), "n_prompts": used,
        "n_dropped": dropped, "clean_metric": float(np.mean(clean_m)), "corrupted_metric": float(np.mean(corr_m)),
        "corruption": sorted({p.corruption for p in pairs}),
        "facts": [{"prompt": p.clean_prompt, "answer": p.answer, "corrupted_prompt": p.corrupted_prompt,
                   "counterfactual_answer": p.counterfactual_answer, "corruption": p.corruption} for p in pairs],
        "example_scores": example[0].tolist() if example else None,
        "example_tokens": example[1] if example else None,
        "example_prompt": example[2] if example else None,
    }
