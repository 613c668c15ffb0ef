"""Tests for circuit_discovery.validation.hypotheses (registry, built-ins, BH, CSV)."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from circuit_discovery.validation.hypotheses import (
    HYPOTHESIS_COLUMNS,
    Hypothesis,
    HypothesisError,
    HypothesisRegistryError,
    MissingContextError,
    first_half_share,
    get_hypothesis,
    jaccard_null,
    list_hypotheses,
    register_hypothesis,
    run_hypotheses,
    unregister_hypothesis,
    write_hypotheses_csv,
)
from circuit_discovery.validation.stats import TestOutcome, sign_flip_test

BUILTINS = ("early_site_mlp", "late_attention_extraction", "sparsity", "shared_mechanism", "features_matter")
N_RUNS = 200
B = 199
UNIVERSE = [f"mlp_out/L{l}/r{r}" for l in range(18) for r in range(6)]  # 108 nodes


def _null_context(rng: np.random.Generator, n: int = 30) -> dict:
    """Inputs under which every built-in's null hypothesis holds by construction."""
    return {
        "mlp_indirect_effect": rng.exponential(size=(n, 18)),  # layers exchangeable
        "attn_block_drop_upper": rng.normal(size=n),
        "attn_block_drop_lower": rng.normal(size=n),
        "faithfulness_at_5pct": rng.normal(0.8, 0.1, n),  # mean exactly at the threshold
        "circuits": {"a": list(rng.choice(UNIVERSE, 10, replace=False)),
                     "b": list(rng.choice(UNIVERSE, 15, replace=False))},
        "node_universe": UNIVERSE,
        "n_random_circuits": 199,
        "feature_ablation_drop": rng.normal(size=n),
        "steering_flips": rng.random(n) < 0.2,
        "steering_baseline_rate": 0.2,
        "n_resamples": B,
    }


def _planted_context(rng: np.random.Generator, n: int = 30) -> dict:
    ie = rng.exponential(size=(n, 18))
    ie[:, :9] *= 3.0  # early layers carry more effect
    return {
        "mlp_indirect_effect": ie,
        "attn_block_drop_upper": rng.normal(1.0, 1, n),
        "attn_block_drop_lower": rng.normal(0.0, 1, n),
        "faithfulness_at_5pct": rng.normal(0.92, 0.05, n),
        "circuits": {"a": UNIVERSE[:12], "b": UNIVERSE[2:14], "c": UNIVERSE[5:15]},
        "node_universe": UNIVERSE,
        "n_random_circuits": 499,
        "feature_ablation_drop": rng.normal(0.8, 1, n),
        "steering_flips": np.r_[np.ones(18), np.zeros(n - 18)].astype(bool),
        "steering_baseline_rate": 0.1,
        "n_resamples": B,
    }


@pytest.fixture
def cleanup_ids():
    ids: list[str] = []
    yield ids
    for i in ids:
        try:
            unregister_hypothesis(i)
        except HypothesisRegistryError:
            pass


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def test_builtins_registered():
    reg = list_hypotheses()
    for i in BUILTINS:
        assert i in reg and reg[i]


def test_decorator_registers_user_hypothesis_and_run_includes_it(cleanup_ids):
    cleanup_ids.append("user_bos_sink")

    @register_hypothesis("user_bos_sink", description="BOS ablation hurts", required_keys=("bos_drop",))
    def bos_sink(context, rng):
        return sign_flip_test(context["bos_drop"], n_resamples=B, seed=rng)

    assert "user_bos_sink" in list_hypotheses()
    ctx = _planted_context(np.random.default_rng(0))
    ctx["bos_drop"] = np.random.default_rng(1).normal(1.0, 1.0, 30)
    df = run_hypotheses(ctx)
    assert "user_bos_sink" in set(df.hypothesis_id)
    assert set(BUILTINS) <= set(df.hypothesis_id)
    row = df[df.hypothesis_id == "user_bos_sink"].iloc[0]
    assert row.verdict == "supported" and row.relation == "all"
    # a context without the key skips it when ids=None, but an explicit request raises
    assert "user_bos_sink" not in set(run_hypotheses(_planted_context(np.random.default_rng(0))).hypothesis_id)
    with pytest.raises(MissingContextError, match="bos_drop"):
        run_hypotheses({"n_resamples": B}, ids=["user_bos_sink"])


def test_subclass_registers_and_single_arg_function(cleanup_ids):
    cleanup_ids += ["user_subclass", "user_one_arg"]

    class Mine(Hypothesis):
        id = "user_subclass"
        description = "subclass example"
        required_keys = ("x",)

        def test(self, context, rng):
            return [("rel_a", TestOutcome("mean", 1.0, 0.001, 0.5, 1.5, n=5))]

    @register_hypothesis("user_one_arg")
    def one_arg(context):
        """Docstring becomes the description."""
        return TestOutcome("mean", -1.0, 0.9, -2.0, -0.5, n=5)

    assert isinstance(get_hypothesis("user_subclass"), Mine)
    assert list_hypotheses()["user_one_arg"] == "Docstring becomes the description."
    df = run_hypotheses({"x": 1, "relation": "capital"}, ids=["user_subclass", "user_one_arg"])
    assert df.relation.tolist() == ["rel_a", "capital"]
    assert df.verdict.tolist() == ["supported", "not supported"]


def test_registry_errors(cleanup_ids):
    with pytest.raises(HypothesisRegistryError):
        @register_hypothesis("sparsity")
        def dup(context):
            return []
    with pytest.raises(HypothesisRegistryError):
        get_hypothesis("no_such_hypothesis")
    with pytest.raises(HypothesisRegistryError):
        run_hypotheses({}, ids=["no_such_hypothesis"])
    cleanup_ids.append("user_broken")

    @register_hypothesis("user_broken")
    def broken(context):
        raise ValueError("boom")

    with pytest.raises(HypothesisError, match="user_broken.*boom"):
        run_hypotheses({}, ids=["user_broken"])
    df = run_hypotheses({}, ids=["user_broken"], on_error="record")
    assert df.statistic.tolist() == ["error"] and df.verdict.tolist() == ["inconclusive"]
    assert math.isnan(df.p_value[0])


# ------------------------------------------------------------------------------------------------
# run_hypotheses / BH / CSV
# ------------------------------------------------------------------------------------------------


def test_run_applies_bh_across_all_results_and_planted_effects_supported():
    df = run_hypotheses(_planted_context(np.random.default_rng(2)), ids=BUILTINS, alpha=0.05, seed=0)
    assert list(df.columns) == list(HYPOTHESIS_COLUMNS)
    _, ref, _, _ = multipletests(df.p_value.to_numpy(), method="fdr_bh")
    np.testing.assert_allclose(df.p_adjusted.to_numpy(), ref)
    # 1 + 1 + 1 + 3 pairs + (necessity + sufficiency)
    assert len(df) == 8
    assert (df.verdict == "supported").all(), df.to_string()
    stats_fm = set(df[df.hypothesis_id == "features_matter"].statistic)
    assert any("necessity" in s for s in stats_fm) and any("sufficiency" in s for s in stats_fm)
    assert set(df[df.hypothesis_id == "shared_mechanism"].relation) == {"a|b", "a|c", "b|c"}


def test_run_is_reproducible_and_independent_of_other_hypotheses():
    ctx = _planted_context(np.random.default_rng(3))
    a = run_hypotheses(ctx, ids=["sparsity"], seed=5)
    b = run_hypotheses(ctx, ids=BUILTINS, seed=5)
    assert a.p_value[0] == b[b.hypothesis_id == "sparsity"].p_value.iloc[0]
    assert a.ci_low[0] == b[b.hypothesis_id == "sparsity"].ci_low.iloc[0]


def test_per_relation_mappings_give_one_row_per_relation():
    rng = np.random.default_rng(4)
    ctx = {"faithfulness_at_5pct": {"capital": rng.normal(0.95, 0.05, 20), "language": rng.normal(0.5, 0.1, 20)},
           "n_resamples": B}
    df = run_hypotheses(ctx, ids=["sparsity"])
    assert df.relation.tolist() == ["capital", "language"]
    assert df.verdict.tolist() == ["supported", "not supported"]
    with pytest.raises(HypothesisError):
        run_hypotheses({"attn_block_drop_upper": {"a": [1.0, 2.0]}, "attn_block_drop_lower": [1.0, 2.0]},
                       ids=["late_attention_extraction"])


def test_csv_has_exactly_the_columns(tmp_path):
    df = run_hypotheses(_planted_context(np.random.default_rng(5)), ids=BUILTINS)
    path = tmp_path / "out" / "hypotheses.csv"
    write_hypotheses_csv(df, path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(HYPOTHESIS_COLUMNS)
    assert len(rows) == len(df) + 1
    assert [r[0] for r in rows[1:]] == df.hypothesis_id.tolist()
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(ValueError):
        write_hypotheses_csv(df.drop(columns=["verdict"]), path)


# ------------------------------------------------------------------------------------------------
# built-in statistics
# ------------------------------------------------------------------------------------------------


def test_first_half_share_closed_forms():
    np.testing.assert_allclose(first_half_share([[1, 1, 0, 0], [0, 0, 2, 2], [1, -1, 1, -1]]), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(first_half_share([[1.0, 1.0, 1.0]]), [0.5])  # middle layer counts half
    assert np.isnan(first_half_share([[0.0, 0.0]]))[0]


def test_jaccard_null_mean_matches_hypergeometric():
    rng = np.random.default_rng(0)
    null = jaccard_null(100, 10, 20, 4000, rng)
    inter = np.rint(null * 30 / (1 + null)).astype(int)  # J = i / (30 - i)  =>  i = 30 J / (1 + J)
    assert inter.mean() == pytest.approx(scipy.stats.hypergeom(100, 10, 20).mean(), abs=0.05)
    assert inter.var() == pytest.approx(scipy.stats.hypergeom(100, 10, 20).var(), rel=0.1)


def test_sufficiency_with_baseline_outcomes_uses_fisher():
    flips = np.r_[np.ones(15), np.zeros(15)]
    base = np.r_[np.ones(3), np.zeros(27)]
    df = run_hypotheses({"steering_flips": flips, "steering_baseline_rate": base}, ids=["features_matter"])
    assert len(df) == 1 and "fisher" in df.statistic[0]
    ref = scipy.stats.fisher_exact([[15, 15], [3, 27]], alternative="greater").pvalue
    assert df.p_value[0] == pytest.approx(ref)
    assert df.effect[0] == pytest.approx(0.5)


@pytest.mark.parametrize("hyp", BUILTINS)
def test_builtin_calibration_under_null(hyp):
    """Share of p < 0.05 over N_RUNS synthetic runs whose null holds by construction is <= 0.08."""
    rng = np.random.default_rng(2024)
    h = get_hypothesis(hyp)
    pvals: dict[str, list[float]] = {}
    for i in range(N_RUNS):
        for r in h.run(_null_context(rng), np.random.default_rng(i)):
            pvals.setdefault(r.statistic, []).append(r.p_value)
    assert pvals
    for statistic, ps in pvals.items():
        assert len(ps) == N_RUNS
        assert np.mean(np.asarray(ps) < 0.05) <= 0.08, statistic
