"""Pipeline glue for the attribution stage: metric-ready fact pairs, and per-relation exact patching scores
aligned by token role (the heatmaps of the report)."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch

from circuit_discovery.facts import ROLES, build_pairs, informative_pair, split_facts
from circuit_discovery.pipeline.config import RunConfig

log = logging.getLogger(__name__)


DEFAULT_HELD_OUT_FACTS = 8
"""Held-out pairs per relation when the configuration has no ``held_out_facts``."""


def metric_pairs(model, facts, seed: int, metric: str = "logit_diff") -> tuple[list, int]:
    """Fact pairs ready for ``metric``: for ``logit_diff`` answer tokens shared with the counterfactual move into
    both prompts (:func:`~circuit_discovery.facts.informative_pair`), and pairs without a usable counterfactual
    are dropped. Partners come only from ``facts`` (pass one split's facts). Returns (pairs, number dropped)."""
    pairs = build_pairs(facts, model.tokenizer, seed=seed, partners="within")
    if metric != "logit_diff":
        return pairs, 0
    ready = [q for q in (informative_pair(p, model.tokenizer) for p in pairs) if q is not None]
    return ready, len(pairs) - len(ready)


def noise_pairs(model, facts, seed: int, metric: str = "logit_diff") -> list:
    """Metric-ready ROME-noise pairs of every fact (no partner; the counterfactual answer is the given one or
    another answer among ``facts``)."""
    facts = list(facts)
    if not facts:
        return []
    pairs = build_pairs(facts, model.tokenizer, seed=seed, partners="none")
    if metric == "logit_diff":
        pairs = [q for q in (informative_pair(p, model.tokenizer) for p in pairs) if q is not None]
    return pairs


def swap_pairs(model, facts, seed: int, metric: str = "logit_diff") -> tuple[list, int]:
    """Metric-ready subject-swap pairs of ``facts`` (partners from ``facts`` only; noise pairs, whose corrupted
    prompt is the clean one, are left out so one comparison has one corruption type). Returns (pairs, number of
    facts without a usable subject-swap pair)."""
    facts = list(facts)
    if not facts:
        return [], 0
    pairs, _ = metric_pairs(model, facts, seed, metric)
    pairs = [p for p in pairs if p.corruption == "subject_swap"]
    return pairs, len(facts) - len(pairs)


def held_out_facts(cfg: RunConfig) -> int:
    """Held-out pairs per relation of ``cfg`` (``cfg.held_out_facts``, default :data:`DEFAULT_HELD_OUT_FACTS`)."""
    return int(getattr(cfg, "held_out_facts", DEFAULT_HELD_OUT_FACTS))


def split_relation_facts(model, facts, cfg: RunConfig) -> tuple[list, list]:
    """One relation's known facts split into (discovery, held-out) before pairing
    (:func:`~circuit_discovery.facts.split_facts`, stratified by token-role group). The held-out share is
    ``held_out_facts / (max_facts + held_out_facts)`` of the facts that can form a pair, so both caps fill
    together."""
    n_disc, n_held = int(cfg.max_facts), held_out_facts(cfg)
    frac = n_held / (n_disc + n_held) if n_disc + n_held > 0 else 0.0
    return split_facts(list(facts), held_out_fraction=frac, seed=cfg.seed, tokenizer=model.tokenizer)


def relation_pairs(model, facts, cfg: RunConfig, *, noise_fallback: bool = False) -> dict[str, list]:
    """Metric-ready subject-swap pairs of one relation, split before pairing:
    ``{"discovery": [...], "held_out": [...]}``.

    The known facts are split first (:func:`split_relation_facts`); each split is paired on its own, so a
    counterfactual subject never crosses the split (no clean or corrupted prompt of the held-out pairs occurs in
    a discovery pair and vice versa). Only subject-swap pairs are kept (one corruption type). Discovery keeps its
    first ``cfg.max_facts`` pairs, held-out its first ``cfg.held_out_facts`` (dataset order).

    ``noise_fallback``: where no discovery subject-swap pair exists (e.g. a two-fact seed dataset whose subjects
    differ in token length), every pair of the relation is a ROME-noise pair instead (split first as well, one
    corruption type for the whole relation); otherwise such a relation gets no pairs."""
    return relation_pairs_and_swaps(model, facts, cfg, noise_fallback=noise_fallback)[0]


def relation_pairs_and_swaps(model, facts, cfg: RunConfig, *,
                             noise_fallback: bool = False) -> tuple[dict[str, list], list, int]:
    """``(pairs, swaps, n_dropped)``, built once: ``pairs`` as :func:`relation_pairs`; ``swaps`` every
    subject-swap pair of the discovery facts (uncapped: the prompts of the patching heatmap,
    :func:`patching_scores`) and ``n_dropped`` the discovery facts without one."""
    facts = list(facts)
    if not facts:
        return {"discovery": [], "held_out": []}, [], 0
    disc, held = split_relation_facts(model, facts, cfg)
    swaps, dropped = swap_pairs(model, disc, cfg.seed, cfg.metric)
    out = {"discovery": swaps[: int(cfg.max_facts)],
           "held_out": swap_pairs(model, held, cfg.seed, cfg.metric)[0][: held_out_facts(cfg)]}
    if out["discovery"] or not noise_fallback:
        return out, swaps, dropped
    n_disc, n_held = int(cfg.max_facts), held_out_facts(cfg)
    disc, held = split_facts(facts, held_out_fraction=n_held / (n_disc + n_held), seed=cfg.seed,
                             key=lambda f: "all")
    log.warning("relation %s: no subject-swap pair (no two facts share their token roles); all its pairs use ROME "
                "noise on the subject instead", facts[0].relation)
    return ({"discovery": noise_pairs(model, disc, cfg.seed, cfg.metric)[:n_disc],
             "held_out": noise_pairs(model, held, cfg.seed, cfg.metric)[:n_held]}, swaps, dropped)


def pairs_by_relation(model, facts_by_rel, cfg: RunConfig, *,
                      noise_fallback: bool = False) -> tuple[dict[str, dict], dict[str, tuple[list, int]]]:
    """The pairs of every relation, built once, with the run's skip rules (the API and the pipeline both use
    this): ``(pairs, swaps)``, ``pairs[rel]`` as :func:`relation_pairs` for each relation with at least one
    discovery pair (the others are skipped with a warning; a relation with fewer than 2 held-out pairs is kept,
    with a warning: it cannot be validated), ``swaps[rel] = (discovery swap pairs, n_dropped)`` for every relation
    of ``facts_by_rel`` (see :func:`relation_pairs_and_swaps`).

    ``noise_fallback`` (the API's, documented in the README): a relation without any subject-swap pair uses
    ROME-noise pairs instead of being skipped."""
    pairs, swaps = {}, {}
    for rel, facts in facts_by_rel.items():
        p, sw, dropped = relation_pairs_and_swaps(model, facts, cfg, noise_fallback=noise_fallback)
        swaps[rel] = (sw, dropped)
        if len(p["discovery"]) < 1:
            log.warning("relation %s: no usable subject-swap pair among its discovery facts (a counterfactual "
                        "subject of the same token length with a different answer); skipped", rel)
            continue
        if len(p["held_out"]) < 2:
            log.warning("relation %s: %d held-out subject-swap pair(s); its held-out faithfulness has no "
                        "interval and it cannot be validated", rel, len(p["held_out"]))
        pairs[rel] = p
    return pairs, swaps


def usable_pair_counts(model, facts, cfg: RunConfig) -> dict[str, int]:
    """Uncapped numbers of usable subject-swap pairs per split (what :func:`relation_pairs` could keep)."""
    facts = list(facts)
    if not facts:
        return {"discovery_facts": 0, "held_out_facts": 0, "discovery_pairs": 0, "held_out_pairs": 0}
    disc, held = split_relation_facts(model, facts, cfg)
    return {"discovery_facts": len(disc), "held_out_facts": len(held),
            "discovery_pairs": len(swap_pairs(model, disc, cfg.seed, cfg.metric)[0]),
            "held_out_pairs": len(swap_pairs(model, held, cfg.seed, cfg.metric)[0])}


def relation_patching(model, facts, cfg: RunConfig, max_prompts: int | None = None) -> dict | None:
    """Denoising activation patching of ``resid_pre`` over (layer, position) for each fact of one relation
    (:func:`patching_scores` of the relation's discovery subject-swap pairs)."""
    _, swaps, dropped = relation_pairs_and_swaps(model, facts, cfg)
    return patching_scores(model, swaps, dropped, cfg, max_prompts,
                           relation=facts[0].relation if facts else "?")


def patching_scores(model, swaps, dropped: int, cfg: RunConfig, max_prompts: int | None = None,
                    relation: str = "?") -> dict | None:
    """Denoising activation patching of ``resid_pre`` over (layer, position) of the first ``max_prompts`` of
    ``swaps``: a relation's subject-swap pairs of its discovery facts (split before pairing, as
    :func:`relation_pairs`; ``dropped``: discovery facts without one). Scores are normalised per prompt as
    (m(patched) - m(corrupted)) / (m(clean) - m(corrupted)), so 1 means "restores the whole logit difference",
    then averaged per (layer, role) over prompts. ``None`` without pairs.
    """
    from circuit_discovery.attribution.patching import activation_patching

    pairs = list(swaps)
    pairs = pairs[:max_prompts] if max_prompts else pairs
    if not pairs:
        log.warning("relation %s: no discovery fact has a usable subject-swap pair (a partner of the same token "
                    "length with a different answer); skipped (add facts)", relation)
        return None
    n_layers = model.cfg.n_layers
    role_sum: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n_layers))
    role_cnt: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n_layers))
    clean_m, corr_m, example, used = [], [], None, 0
    for pair in pairs:
        res = activation_patching(model, [pair], components=("resid_pre",), direction="denoising",
                                  metric=cfg.metric, batch_size=cfg.batch_size, normalize=True)
        s = res.per_prompt_array("resid_pre")[0]  # [n_layers, n_pos]
        assert res.clean_metric is not None and res.corrupted_metric is not None  # activation patching sets both
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
