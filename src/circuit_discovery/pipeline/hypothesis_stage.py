"""Pipeline glue for the hypothesis tests: the context of
:func:`~circuit_discovery.validation.hypotheses.run_hypotheses` from the causal-tracing, validation and feature
stages, the tests that can run on it, and why the others cannot.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from circuit_discovery.pipeline.config import RunConfig

#: bootstrap / permutation resamples of the hypothesis tests
N_RESAMPLES = 2000

#: the per-prompt feature-circuit data of ``features_matter``, as two paired comparisons
FEATURE_KEYS = ("feature_ablation_drop", "random_feature_ablation_drop", "steering_flips", "steering_random_flip_rate")


def _gap(entry: dict) -> float:
    """``m(N) - m(empty)`` of a validation entry (NaN where it was not measured)."""
    full, empty = entry.get("m_full"), entry.get("m_empty")
    return float(full) - float(empty) if full is not None and empty is not None else math.nan


def hypothesis_context(circuits: dict, validation: dict, causal: dict, features: dict | None,
                       cfg: RunConfig) -> tuple[dict, list[str], dict[str, str]]:
    """``(context, hypothesis ids to run, {id: why it is not run})`` from the stage results (``features``:
    ``None`` when feature circuits were not built)."""
    val = validation["relations"]
    ctx: dict = {"n_resamples": N_RESAMPLES, "relation": "all"}
    ids = []
    mlp = [row for c in causal["relations"].values() for row in c.get("mlp_ie_subject_last", [])]
    attn = [row for c in causal["relations"].values() for row in c.get("attn_ie_subject_last", [])]
    not_run = {}
    if len(mlp) >= 2 and len(attn) == len(mlp):  # pooled over relations: ROME's claim is about recall
        ctx["mlp_ie"], ctx["attn_ie"] = np.asarray(mlp), np.asarray(attn)
        ids.append("early_site_mlp")
    else:
        not_run["early_site_mlp"] = "fewer than 2 facts traced with MLP and attention restored"
    if val:
        two = {r: v for r, v in val.items() if len(v["attn_block_drop_upper"]) >= 2}
        if two:
            ctx["attn_block_drop_upper"] = {r: np.asarray(v["attn_block_drop_upper"]) for r, v in two.items()}
            ctx["attn_block_drop_lower"] = {r: np.asarray(v["attn_block_drop_lower"]) for r, v in two.items()}
            ids.append("late_attention_extraction")
        f5 = {r: np.asarray(v["faithfulness_at_5pct_per_prompt"]) for r, v in val.items()
              if len(v["faithfulness_at_5pct_per_prompt"]) >= 2}
        if f5:
            ctx["faithfulness_at_5pct"] = f5
            ids.append("sparsity")
    halves = {}
    for r, c in circuits["relations"].items():
        if c.get("halves") and r in val:  # inert nodes (no attribution) cannot be in a half; drop if any
            uni = set(val[r]["universe"])
            halves[r] = tuple([i for i in h if i in uni] for h in c["halves"])
    if len(halves) >= 2:
        ctx["circuit_halves"] = halves
        ctx["relation_universe"] = {r: val[r]["universe"] for r in halves}
        # relations whose discovery metric gap is degenerate are left out of the comparison
        ctx["relation_metric_gap"] = {r: _gap(val[r]["in_sample"]) for r in halves}
        ctx["min_metric_gap"] = cfg.min_metric_gap
        ids.append("shared_mechanism")
    else:
        not_run["shared_mechanism"] = "fewer than 2 relations with split-half circuits (>= 4 discovery facts)"
    fval = {r: c["validation"] for r, c in (features or {}).get("relations", {}).items() if c.get("validation")}
    for pair in (FEATURE_KEYS[:2], FEATURE_KEYS[2:]):  # only relations that have both halves of a paired comparison
        both = [r for r, v in fval.items() if all(len(v.get(k) or []) >= 1 for k in pair)]
        for k in pair:
            if both:
                ctx[k] = {r: np.asarray(fval[r][k], dtype=float) for r in both}
    if any(k in ctx for k in FEATURE_KEYS):
        ctx["steering_random_draws"] = cfg.steer_random
        ids.append("features_matter")
    elif features is None:
        not_run["features_matter"] = "feature circuits were not built (features = false)"
    else:
        not_run["features_matter"] = "no relation had held-out prompts with circuit features"
    return ctx, ids, not_run


def run_hypothesis_tests(circuits: dict, validation: dict, causal: dict, features: dict | None, cfg: RunConfig,
                         out_dir: str | Path) -> dict:
    """Run the hypotheses the stage results allow, write ``out_dir/hypotheses.csv``; returns the stage's JSON
    (``{"rows": [...], "not_run": {id: why}}``)."""
    from circuit_discovery.validation.hypotheses import run_hypotheses, write_hypotheses_csv

    ctx, ids, not_run = hypothesis_context(circuits, validation, causal, features, cfg)
    df = run_hypotheses(ctx, ids=ids, seed=cfg.seed, on_error="record")
    write_hypotheses_csv(df, Path(out_dir) / "hypotheses.csv")
    return {"rows": json.loads(df.to_json(orient="records")), "not_run": not_run}
