"""Tests for circuit_discovery.validation.stats and .curves (fast, model-free)."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from circuit_discovery.validation import curves, stats
from circuit_discovery.validation.curves import (
    MIB_FRACTIONS,
    CurveInputError,
    DegenerateMetricError,
    area_from_one,
    area_under_curve,
    circuit_sizes,
    completeness,
    faithfulness,
    faithfulness_curve,
    minimality,
    random_circuit_baseline,
)
from circuit_discovery.validation.stats import (
    StatsInputError,
    TestResult,
    benjamini_hochberg,
    binomial_test,
    bootstrap_ci,
    bootstrap_mean_test,
    decide_verdict,
    empirical_p_value,
    paired_permutation_test,
    permutation_test_mean_difference,
    sign_flip_test,
    z_score,
)

N_RUNS = 200  # synthetic runs per calibration check
B = 199  # resamples inside each synthetic run (keeps the suite fast)


def _rejection_rate(pvals: list[float]) -> float:
    return float(np.mean(np.asarray(pvals) < 0.05))


# ------------------------------------------------------------------------------------------------
# permutation / sign-flip tests
# ------------------------------------------------------------------------------------------------


def test_sign_flip_matches_exhaustive_enumeration():
    x = np.array([1.0, 2.0, 3.0, -0.5, 0.7])
    res = sign_flip_test(x, alternative="greater", n_resamples=9999, seed=0)
    # brute force: all 2^5 sign patterns, count means >= observed
    obs = x.mean()
    count = sum(np.mean(x * np.array(s)) >= obs - 1e-12 for s in itertools.product([1, -1], repeat=5))
    assert res.p_value == pytest.approx(count / 32)
    assert res.effect == pytest.approx(obs)


def test_paired_permutation_equals_sign_flip_of_differences_exactly():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=8), rng.normal(size=8)
    paired = paired_permutation_test(x, y, alternative="two-sided", n_resamples=10**5, seed=0)
    d = x - y
    obs = abs(d.mean())
    null = [abs(np.mean(d * np.array(s))) for s in itertools.product([1, -1], repeat=8)]
    assert paired.p_value == pytest.approx(np.mean(np.array(null) >= obs - 1e-12))


def test_two_sample_permutation_close_to_welch_t_for_normal_data():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.6, 1, 60), rng.normal(0, 1, 60)
    perm = permutation_test_mean_difference(x, y, alternative="two-sided", n_resamples=9999, seed=2)
    t = scipy.stats.ttest_ind(x, y, equal_var=False)
    assert perm.p_value == pytest.approx(t.pvalue, abs=0.01)
    assert perm.ci_low < perm.effect < perm.ci_high


@pytest.mark.parametrize("kind", ["sign_flip", "paired", "two_sample", "bootstrap_mean"])
def test_calibration_under_null(kind):
    rng = np.random.default_rng(12345)
    pvals = []
    for i in range(N_RUNS):
        if kind == "sign_flip":
            p = sign_flip_test(rng.standard_t(4, 25), alternative="greater", n_resamples=B, seed=i).p_value
        elif kind == "paired":
            base = rng.normal(size=25)  # shared per-prompt difficulty
            x, y = base + rng.normal(size=25), base + rng.normal(size=25)
            p = paired_permutation_test(x, y, alternative="greater", n_resamples=B, seed=i).p_value
        elif kind == "two_sample":
            p = permutation_test_mean_difference(rng.exponential(size=20), rng.exponential(size=30),
                                                 alternative="two-sided", n_resamples=B, seed=i).p_value
        else:
            p = bootstrap_mean_test(rng.normal(0.8, 0.1, 40), null_value=0.8, alternative="greater",
                                    n_resamples=B, seed=i).p_value
        pvals.append(p)
    assert _rejection_rate(pvals) <= 0.08


@pytest.mark.parametrize("kind", ["sign_flip", "paired", "two_sample", "bootstrap_mean"])
def test_planted_effect_is_detected(kind):
    rng = np.random.default_rng(7)
    if kind == "sign_flip":
        res = sign_flip_test(rng.normal(0.8, 1, 30), n_resamples=999, seed=0)
    elif kind == "paired":
        base = rng.normal(size=30)
        res = paired_permutation_test(base + 1.0 + rng.normal(0, 0.5, 30), base, n_resamples=999, seed=0)
    elif kind == "two_sample":
        res = permutation_test_mean_difference(rng.normal(1.2, 1, 40), rng.normal(0, 1, 40), n_resamples=999, seed=0)
    else:
        res = bootstrap_mean_test(rng.normal(0.9, 0.1, 30), null_value=0.8, n_resamples=999, seed=0)
    assert res.p_value < 0.01
    assert res.ci_low < res.effect < res.ci_high


def test_seeded_results_are_reproducible():
    x = np.random.default_rng(0).normal(0.2, 1, 50)
    a = sign_flip_test(x, n_resamples=B, seed=11)
    b = sign_flip_test(x, n_resamples=B, seed=11)
    assert (a.p_value, a.ci_low, a.ci_high) == (b.p_value, b.ci_low, b.ci_high)


def test_bad_input_raises_typed_errors():
    with pytest.raises(StatsInputError):
        sign_flip_test([1.0, np.nan, 2.0])
    with pytest.raises(StatsInputError):
        sign_flip_test(np.ones((3, 2)))
    with pytest.raises(StatsInputError):
        paired_permutation_test([1, 2, 3], [1, 2])
    with pytest.raises(StatsInputError):
        sign_flip_test([1.0, 2.0], alternative="bigger")  # type: ignore[arg-type]
    with pytest.raises(StatsInputError):
        binomial_test(5, 3, p0=0.5)
    with pytest.raises(StatsInputError):
        stats.as_generator("seed")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_and_matches_t_interval_roughly():
    x = np.random.default_rng(5).normal(2.0, 1.0, 200)
    lo, hi = bootstrap_ci(x, n_resamples=4999, seed=0)
    t_lo, t_hi = scipy.stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy.stats.sem(x))
    assert lo == pytest.approx(t_lo, abs=0.03) and hi == pytest.approx(t_hi, abs=0.03)


def test_bootstrap_ci_degenerate_samples():
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    lo, hi = bootstrap_ci([1.0])
    assert math.isnan(lo) and math.isnan(hi)
    res = bootstrap_mean_test([0.9] * 10, null_value=0.8, n_resamples=B)
    assert res.p_value == pytest.approx(1 / 2)  # the null is a point mass at 0.8 < 0.9: (1 + 0) / (1 + 1)


# ------------------------------------------------------------------------------------------------
# empirical p, z, BH, binomial
# ------------------------------------------------------------------------------------------------


def test_empirical_p_value_plus_one_correction():
    null = np.arange(99, dtype=float)  # 0..98
    assert empirical_p_value(200.0, null) == pytest.approx(1 / 100)
    assert empirical_p_value(-1.0, null) == pytest.approx(1.0)
    assert empirical_p_value(49.0, null) == pytest.approx((1 + 50) / 100)  # ties count
    assert empirical_p_value(-5.0, null, alternative="less") == pytest.approx(1 / 100)
    assert empirical_p_value(200.0, null, alternative="two-sided") == pytest.approx(2 / 100)


def test_empirical_p_value_calibration():
    rng = np.random.default_rng(0)
    pvals = [empirical_p_value(rng.normal(), rng.normal(size=199)) for _ in range(400)]
    assert _rejection_rate(pvals) <= 0.08


def test_z_score():
    null = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert z_score(5.0, null) == pytest.approx((5.0 - 3.0) / np.std(null, ddof=1))
    assert z_score(2.0, [1.0, 1.0]) == math.inf


def test_benjamini_hochberg_matches_statsmodels_and_formula():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2, 0.5, 0.045, 0.0001])
    reject, padj = benjamini_hochberg(p, alpha=0.05)
    ref_reject, ref_padj, _, _ = multipletests(p, alpha=0.05, method="fdr_bh")
    np.testing.assert_allclose(padj, ref_padj)
    np.testing.assert_array_equal(reject, ref_reject)
    # independent oracle: p_adj(i) = min_{j >= i} m * p_(j) / j over the sorted p-values
    m = len(p)
    order = np.argsort(p)
    ps = p[order]
    brute = np.array([min(min(m * ps[j] / (j + 1) for j in range(i, m)), 1.0) for i in range(m)])
    expected = np.empty(m)
    expected[order] = brute
    np.testing.assert_allclose(padj, expected)


def test_benjamini_hochberg_leaves_nan_out_of_family():
    reject, padj = benjamini_hochberg([0.01, np.nan, 0.04])
    _, ref, _, _ = multipletests([0.01, 0.04], method="fdr_bh")
    assert math.isnan(padj[1]) and not reject[1]
    np.testing.assert_allclose(padj[[0, 2]], ref)


def test_binomial_test_matches_scipy_and_calibration():
    res = binomial_test(12, 20, p0=0.3)
    assert res.p_value == pytest.approx(scipy.stats.binomtest(12, 20, 0.3, alternative="greater").pvalue)
    assert res.ci_low < 0.6 < res.ci_high < 1.0
    rng = np.random.default_rng(1)
    pvals = [binomial_test(int(rng.binomial(40, 0.2)), 40, p0=0.2).p_value for _ in range(N_RUNS)]
    assert _rejection_rate(pvals) <= 0.08


def test_decide_verdict_rules():
    def r(effect, lo, hi, padj, alt="greater", null=0.0):
        t = TestResult("h", "all", "s", effect, lo, hi, padj, p_adjusted=padj, n=10, alternative=alt, null_value=null)
        return decide_verdict(t, alpha=0.05)

    assert r(1.0, 0.5, 1.5, 0.001) == "supported"
    assert r(-1.0, -1.5, -0.5, 0.8) == "not supported"  # CI entirely on the null side
    assert r(0.1, -0.3, 0.5, 0.4) == "inconclusive"
    assert r(-1.0, -1.5, -0.5, 0.001, alt="two-sided") == "supported"
    assert r(0.85, 0.82, 0.9, 0.01, null=0.8) == "supported"
    assert r(0.7, 0.6, 0.79, 0.99, null=0.8) == "not supported"
    assert r(0.5, math.nan, math.nan, math.nan) == "inconclusive"


# ------------------------------------------------------------------------------------------------
# curves
# ------------------------------------------------------------------------------------------------


NODES = [f"n{i}" for i in range(1000)]


def _linear_metric(kept):
    return len(kept) / 1000.0


def test_linear_metric_gives_closed_form_cpr_and_cmd():
    curve = faithfulness_curve(NODES, _linear_metric)
    # f(k) = k at every MIB fraction (k * 1000 is an integer), trapezoid is exact for a line:
    np.testing.assert_allclose(curve.faithfulness, MIB_FRACTIONS, atol=1e-12)
    assert curve.cpr == pytest.approx((1.0 - 0.001**2) / 2)  # ∫_{0.001}^{1} k dk
    assert curve.cmd == pytest.approx((1.0 - 0.001) - (1.0 - 0.001**2) / 2)  # ∫ (1 - k) dk
    np.testing.assert_array_equal(curve.sizes, [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])


def test_faithfulness_is_affine_invariant_and_full_empty_by_construction():
    w = np.random.default_rng(0).exponential(size=50)
    nodes = [f"v{i}" for i in np.argsort(-w)]

    def metric(kept):
        return 3.0 * sum(w[int(n[1:])] for n in kept) + 7.0

    curve = faithfulness_curve(nodes, metric, fractions=(0.0, 0.1, 0.5, 1.0))
    assert curve.faithfulness[0] == 0.0 and curve.faithfulness[-1] == 1.0
    total = w.sum()
    np.testing.assert_allclose(curve.faithfulness[1], np.sort(w)[::-1][:5].sum() / total)
    assert curve.m_full == pytest.approx(3 * total + 7) and curve.m_empty == pytest.approx(7.0)


def test_cpr_cmd_follow_mib_conventions():
    # no clipping of f > 1; |1 - f| taken per point before the trapezoid (MIB evaluate_area_under_curve)
    x = [0.0, 1.0]
    assert area_under_curve(x, [1.2, 1.2]) == pytest.approx(1.2)
    assert area_from_one(x, [1.2, 1.2]) == pytest.approx(0.2)
    assert area_from_one(x, [0.5, 1.5]) == pytest.approx(0.5)  # exact ∫|1-f| of the line would be 0.25
    assert area_under_curve(x, [-0.5, 0.5]) == pytest.approx(0.0)
    with pytest.raises(CurveInputError):
        area_under_curve([0.5, 0.2], [1, 1])
    with pytest.raises(CurveInputError):
        area_under_curve([0.5], [1])


def test_circuit_sizes_round_up_with_exact_oracle():
    for n in (1, 7, 30, 333, 1000, 4097):
        sizes = circuit_sizes(n)
        expected = [max(1, math.ceil(Fraction(str(k)) * n)) for k in MIB_FRACTIONS]
        assert sizes.tolist() == [min(e, n) for e in expected]
    assert circuit_sizes(10, (0.0, 1.0)).tolist() == [0, 10]


def test_batched_metric_gives_identical_curve_in_one_call():
    calls = []

    def batched(lists):
        calls.append(len(lists))
        return [_linear_metric(k) for k in lists]

    a = faithfulness_curve(NODES, _linear_metric)
    b = faithfulness_curve(NODES, batched, batched=True)
    np.testing.assert_allclose(a.faithfulness, b.faithfulness)
    assert len(calls) == 1 and calls[0] == 11  # 10 fractions + the empty set (full set is the 100% point)
    with pytest.raises(CurveInputError):
        faithfulness_curve(NODES, lambda lists: [0.0], batched=True)


def test_curve_errors():
    with pytest.raises(DegenerateMetricError):
        faithfulness_curve(NODES[:10], lambda kept: 1.0)
    with pytest.raises(CurveInputError):
        faithfulness_curve(["a", "b", "a"], _linear_metric)
    assert np.isnan(faithfulness(np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([0.0, 1.0]),
                                 on_degenerate="nan"))[1]


def test_precomputed_references_are_used():
    seen = []

    def metric(kept):
        seen.append(len(kept))
        return len(kept) / 1000.0

    faithfulness_curve(NODES, metric, m_full=1.0, m_empty=0.0)
    assert 0 not in seen and 1000 not in seen


# ------------------------------------------------------------------------------------------------
# completeness, minimality, random baseline
# ------------------------------------------------------------------------------------------------


W = {f"v{i}": float(i + 1) for i in range(12)}
UNIVERSE = list(W)


def _additive(kept):
    return sum(W[n] for n in kept)


def test_completeness_additive_metric_closed_form():
    circuit = UNIVERSE[:8]
    res = completeness(circuit, UNIVERSE, _additive, n_samples=30, greedy_steps=3, seed=0)
    # m(C\K) - m(N\K) = -w(N\C) for every K
    outside = sum(W[n] for n in UNIVERSE[8:])
    np.testing.assert_allclose(res.sampled_scores, outside)
    np.testing.assert_allclose(res.greedy_scores, outside)
    np.testing.assert_allclose(res.sampled_scores_normalized, outside / sum(W.values()))
    full = completeness(UNIVERSE, UNIVERSE, _additive, n_samples=10, greedy_steps=2)
    np.testing.assert_allclose(full.sampled_scores, 0.0)


def test_completeness_greedy_first_step_matches_brute_force():
    def interacting(kept):
        return sum(W[n] for n in kept) ** 2

    circuit = UNIVERSE[:6]
    res = completeness(circuit, UNIVERSE, interacting, n_samples=0, greedy_steps=2)
    brute = {v: abs(interacting([n for n in circuit if n != v]) - interacting([n for n in UNIVERSE if n != v]))
             for v in circuit}
    assert res.greedy_subset[0] == max(brute, key=brute.get)
    assert res.greedy_scores[0] == pytest.approx(max(brute.values()))
    # batched gives the same
    res_b = completeness(circuit, UNIVERSE, lambda ls: [interacting(k) for k in ls], n_samples=0,
                         greedy_steps=2, batched=True)
    assert res_b.greedy_subset == res.greedy_subset
    with pytest.raises(CurveInputError):
        completeness(["zzz"], UNIVERSE, _additive)


def test_minimality_additive_metric():
    circuit = ["v2", "v5", "v9"]
    res = minimality(circuit, _additive, threshold=0.2)
    np.testing.assert_allclose(res.effects, [W[n] for n in circuit])
    np.testing.assert_allclose(res.relative, np.array([W[n] for n in circuit]) / sum(W[n] for n in circuit))
    assert res.redundant == ["v2"]  # 3 / 19 < 0.2


def test_random_circuit_baseline_top_circuit_and_calibration():
    rng = np.random.default_rng(0)
    w = rng.exponential(size=60)
    nodes = list(range(60))

    def metric(kept):
        return float(w[list(kept)].sum()) if kept else 0.0

    top = list(np.argsort(-w)[:6])
    res = random_circuit_baseline(top, nodes, metric, n_samples=100, seed=1)
    assert res.observed == pytest.approx(w[top].sum() / w.sum())
    assert res.p_value == pytest.approx(1 / 101)  # the top-6 set beats every random 6-set
    assert res.z > 2
    out = res.to_outcome()
    # n counts independent units: one circuit is tested; the 100 draws are resamples of the null
    assert out.effect == res.observed and out.n == 1 and out.details["n_samples"] == 100 == res.n_samples
    assert res.kind == "uniform" and res.null_zero_share == 0.0
    # null: the "circuit" is itself a random same-size subset
    pvals = []
    for i in range(N_RUNS):
        c = list(rng.choice(60, size=6, replace=False))
        pvals.append(random_circuit_baseline(c, nodes, metric, n_samples=100, seed=i, m_full=float(w.sum()),
                                             m_empty=0.0).p_value)
    assert _rejection_rate(pvals) <= 0.08


def test_curves_module_exports():
    assert set(curves.__all__) >= {"faithfulness_curve", "completeness", "minimality", "random_circuit_baseline"}
