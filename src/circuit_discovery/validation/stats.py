"""Statistical tests used to validate circuits and hypotheses.

Everything here is a thin, typed layer over :mod:`scipy.stats` and :mod:`statsmodels` — no test is
re-derived by hand. All randomised procedures take ``seed`` (an ``int``, a :class:`numpy.random.Generator`
or ``None``) and are reproducible for a fixed integer seed.

Conventions
-----------
* ``alternative`` is ``"greater"``, ``"less"`` or ``"two-sided"`` and always refers to the *effect*
  relative to the *null value* (e.g. ``"greater"``: the hypothesis predicts ``effect > null_value``).
* Monte-Carlo p-values carry the ``+1`` correction ``(1 + #{null >= observed}) / (1 + n_samples)``
  (Phipson & Smyth 2010), so they are never 0. ``scipy.stats.permutation_test`` applies the same
  correction for randomised (non-exhaustive) null distributions and none when it enumerates every
  permutation exactly.
* Multiple-comparison control is Benjamini–Hochberg (``statsmodels`` ``method="fdr_bh"``).

Shapes: one-dimensional arrays ``[n]`` throughout (one value per prompt / per sample).
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.stats
from statsmodels.stats.multitest import multipletests

from circuit_discovery.errors import CircuitDiscoveryError

__all__ = [
    "Alternative",
    "SeedLike",
    "StatsInputError",
    "TestResult",
    "TestOutcome",
    "VERDICTS",
    "as_generator",
    "permutation_test_mean_difference",
    "paired_permutation_test",
    "sign_flip_test",
    "bootstrap_ci",
    "bootstrap_mean_test",
    "empirical_p_value",
    "z_score",
    "benjamini_hochberg",
    "binomial_test",
    "jaccard",
    "decide_verdict",
]

Alternative = Literal["greater", "less", "two-sided"]
SeedLike = int | np.random.Generator | None
VERDICTS = ("supported", "not supported", "inconclusive")
_ALTERNATIVES = ("greater", "less", "two-sided")


class StatsInputError(CircuitDiscoveryError, ValueError):
    """Raised for input a statistical routine cannot work with (empty, non-finite, wrong shape...)."""


# --------------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------------


@dataclass
class TestOutcome:
    """Raw outcome of one statistical test before it is attached to a hypothesis.

    ``effect`` is the point estimate (e.g. a mean difference), ``ci_low``/``ci_high`` a confidence
    interval for it (NaN when none is defined), ``null_value`` the value of the effect under H0.
    """

    __test__ = False  # keep pytest from collecting this class

    statistic: str
    effect: float
    p_value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    n: int = 0
    null_value: float = 0.0
    alternative: Alternative = "greater"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class TestResult:
    """One row of ``hypotheses.csv``: a test of one hypothesis on one relation.

    Attributes:
        hypothesis_id: registry id of the hypothesis (e.g. ``"early_site_mlp"``).
        relation: relation name the data came from (``"all"`` when pooled; ``"a|b"`` for pairs).
        statistic: name of the statistic / test (e.g. ``"first_half_share_sign_flip"``).
        effect: point estimate of the effect.
        ci_low, ci_high: confidence interval for ``effect`` (NaN when undefined).
        p_value: unadjusted p-value of the one- or two-sided test given by ``alternative``.
        p_adjusted: Benjamini–Hochberg adjusted p-value (filled by :func:`benjamini_hochberg` /
            ``run_hypotheses``; NaN until then).
        n: number of independent units (prompts, pairs, random draws, ...).
        verdict: ``"supported"``, ``"not supported"`` or ``"inconclusive"``.
        null_value: value of ``effect`` under the null hypothesis.
        alternative: direction the hypothesis predicts, relative to ``null_value``.
        details: anything else worth keeping (null quantiles, counts, ...); JSON-friendly values.
    """

    __test__ = False  # keep pytest from collecting this class

    hypothesis_id: str
    relation: str
    statistic: str
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    p_adjusted: float = math.nan
    n: int = 0
    verdict: str = "inconclusive"
    null_value: float = 0.0
    alternative: Alternative = "greater"
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_outcome(cls, hypothesis_id: str, relation: str, outcome: TestOutcome) -> TestResult:
        return cls(
            hypothesis_id=hypothesis_id,
            relation=relation,
            statistic=outcome.statistic,
            effect=float(outcome.effect),
            ci_low=float(outcome.ci_low),
            ci_high=float(outcome.ci_high),
            p_value=float(outcome.p_value),
            n=int(outcome.n),
            null_value=float(outcome.null_value),
            alternative=outcome.alternative,
            details=dict(outcome.details),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def as_generator(seed: SeedLike) -> np.random.Generator:
    """Turn an int / Generator / None into a :class:`numpy.random.Generator`."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise StatsInputError(f"seed must be an int, a numpy Generator or None, got {type(seed).__name__}")


def _rng_kwargs(func: Callable[..., Any], rng: np.random.Generator) -> dict[str, Any]:
    # scipy >= 1.15 takes ``rng``; older versions only ``random_state``.
    params = inspect.signature(func).parameters
    return {"rng": rng} if "rng" in params else {"random_state": rng}


def _check_alternative(alternative: str) -> None:
    if alternative not in _ALTERNATIVES:
        raise StatsInputError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}")


def _as_1d(x: Any, name: str, min_len: int = 1) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise StatsInputError(f"{name} must be one-dimensional [n], got shape {arr.shape}")
    if arr.size < min_len:
        raise StatsInputError(f"{name} needs at least {min_len} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise StatsInputError(f"{name} contains NaN or infinite values")
    return arr


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _mean_diff_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


# --------------------------------------------------------------------------------------------------
# permutation tests
# --------------------------------------------------------------------------------------------------


def permutation_test_mean_difference(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    paired: bool = False,
    alternative: Alternative = "two-sided",
    n_resamples: int = 9999,
    confidence_level: float = 0.95,
    seed: SeedLike = 0,
) -> TestOutcome:
    """Permutation test of ``mean(x) - mean(y)`` (H0: exchangeable labels, i.e. difference 0).

    Args:
        x, y: samples ``[n_x]`` and ``[n_y]``; for ``paired=True`` both ``[n]`` with row ``i`` from
            the same prompt.
        paired: ``False`` permutes group labels (``scipy`` ``permutation_type="independent"``);
            ``True`` swaps the two values within each pair, which is a sign-flip test of ``x - y``
            (``permutation_type="samples"``).
        alternative: direction predicted for ``mean(x) - mean(y)``.
        n_resamples: Monte-Carlo resamples; scipy enumerates all permutations when that is fewer.
        confidence_level: level of the bootstrap CI reported for the effect.

    Returns:
        :class:`TestOutcome` with ``effect = mean(x) - mean(y)``, null value 0 and a bootstrap CI.
    """
    _check_alternative(alternative)
    xa, ya = _as_1d(x, "x", 2), _as_1d(y, "y", 2)
    rng = as_generator(seed)
    if paired:
        if xa.shape != ya.shape:
            raise StatsInputError(f"paired samples need equal lengths, got {xa.size} and {ya.size}")
        res = scipy.stats.permutation_test(
            (xa, ya), _mean_diff_stat, permutation_type="samples", vectorized=True,
            n_resamples=n_resamples, alternative=alternative, **_rng_kwargs(scipy.stats.permutation_test, rng),
        )
        lo, hi = bootstrap_ci(xa - ya, confidence_level=confidence_level, n_resamples=n_resamples, seed=rng)
        name = "paired_mean_difference_permutation"
    else:
        res = scipy.stats.permutation_test(
            (xa, ya), _mean_diff_stat, permutation_type="independent", vectorized=True,
            n_resamples=n_resamples, alternative=alternative, **_rng_kwargs(scipy.stats.permutation_test, rng),
        )
        lo, hi = _bootstrap_two_sample_ci(xa, ya, confidence_level, rng, n_resamples)
        name = "mean_difference_permutation"
    return TestOutcome(
        statistic=name, effect=float(np.mean(xa) - np.mean(ya)), p_value=float(res.pvalue),
        ci_low=lo, ci_high=hi, n=int(xa.size if paired else xa.size + ya.size), null_value=0.0,
        alternative=alternative, details={"n_null": int(np.size(res.null_distribution))},
    )


def paired_permutation_test(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    alternative: Alternative = "greater",
    n_resamples: int = 9999,
    confidence_level: float = 0.95,
    seed: SeedLike = 0,
) -> TestOutcome:
    """Paired permutation (within-pair swap) test of ``mean(x - y)``; see
    :func:`permutation_test_mean_difference` with ``paired=True``."""
    return permutation_test_mean_difference(
        x, y, paired=True, alternative=alternative, n_resamples=n_resamples,
        confidence_level=confidence_level, seed=seed,
    )


def sign_flip_test(
    x: Sequence[float] | np.ndarray,
    *,
    null_value: float = 0.0,
    alternative: Alternative = "greater",
    n_resamples: int = 9999,
    confidence_level: float = 0.95,
    seed: SeedLike = 0,
) -> TestOutcome:
    """One-sample sign-flip permutation test of ``mean(x)`` against ``null_value``.

    H0: ``x - null_value`` is symmetric about 0. scipy's ``permutation_test`` with one sample and
    ``permutation_type="samples"`` flips the sign of each centred observation independently (exactly
    enumerated when ``2**n <= n_resamples``).

    Args:
        x: per-unit values ``[n]`` (e.g. per-prompt metric drops).

    Returns:
        :class:`TestOutcome`, ``effect = mean(x)``, bootstrap CI of the mean.
    """
    _check_alternative(alternative)
    xa = _as_1d(x, "x", 2)
    rng = as_generator(seed)
    centred = xa - float(null_value)
    res = scipy.stats.permutation_test(
        (centred,), _mean_stat, permutation_type="samples", vectorized=True,
        n_resamples=n_resamples, alternative=alternative, **_rng_kwargs(scipy.stats.permutation_test, rng),
    )
    lo, hi = bootstrap_ci(xa, confidence_level=confidence_level, n_resamples=n_resamples, seed=rng)
    return TestOutcome(
        statistic="mean_sign_flip", effect=float(np.mean(xa)), p_value=float(res.pvalue),
        ci_low=lo, ci_high=hi, n=int(xa.size), null_value=float(null_value), alternative=alternative,
        details={"n_null": int(np.size(res.null_distribution))},
    )


# --------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = _mean_stat,
    *,
    confidence_level: float = 0.95,
    method: Literal["BCa", "percentile", "basic"] = "BCa",
    n_resamples: int = 9999,
    seed: SeedLike = 0,
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``statistic(x)`` via :func:`scipy.stats.bootstrap`.

    Args:
        x: sample ``[n]``.
        statistic: vectorised statistic ``f(x, axis=-1)``; default the mean.
        method: scipy's method; BCa falls back to percentile when BCa is undefined (e.g. a sample
            whose values are all equal), and a constant sample gets the degenerate CI ``(c, c)``.

    Returns:
        ``(ci_low, ci_high)``; ``(nan, nan)`` for a single observation.
    """
    if not 0.0 < confidence_level < 1.0:
        raise StatsInputError(f"confidence_level must be in (0, 1), got {confidence_level}")
    xa = _as_1d(x, "x", 1)
    if xa.size < 2:
        return (math.nan, math.nan)
    if np.ptp(xa) == 0.0:
        value = float(np.asarray(statistic(xa[None, :], axis=-1)).reshape(-1)[0])
        return (value, value)
    rng = as_generator(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=scipy.stats.DegenerateDataWarning)
        res = scipy.stats.bootstrap(
            (xa,), statistic, n_resamples=n_resamples, vectorized=True, confidence_level=confidence_level,
            method=method, **_rng_kwargs(scipy.stats.bootstrap, rng),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if method == "BCa" and not (np.isfinite(lo) and np.isfinite(hi)):
        return bootstrap_ci(xa, statistic, confidence_level=confidence_level, method="percentile",
                            n_resamples=n_resamples, seed=rng)
    return (lo, hi)


def _bootstrap_two_sample_ci(
    x: np.ndarray, y: np.ndarray, confidence_level: float, rng: np.random.Generator, n_resamples: int = 9999,
) -> tuple[float, float]:
    if np.ptp(x) == 0.0 and np.ptp(y) == 0.0:
        d = float(x[0] - y[0])
        return (d, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=scipy.stats.DegenerateDataWarning)
        res = scipy.stats.bootstrap(
            (x, y), _mean_diff_stat, n_resamples=n_resamples, vectorized=True,
            confidence_level=confidence_level, method="percentile", **_rng_kwargs(scipy.stats.bootstrap, rng),
        )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def bootstrap_mean_test(
    x: Sequence[float] | np.ndarray,
    *,
    null_value: float,
    alternative: Alternative = "greater",
    n_resamples: int = 9999,
    confidence_level: float = 0.95,
    method: Literal["BCa", "percentile", "basic"] = "BCa",
    seed: SeedLike = 0,
) -> TestOutcome:
    """Bootstrap test of ``mean(x)`` against ``null_value`` (Efron & Tibshirani 1993, §16.4).

    The null distribution of the mean is the bootstrap distribution of the sample shifted to have mean
    ``null_value``; for the mean that is ``boot_mean - mean(x) + null_value`` with ``boot_mean`` from
    :func:`scipy.stats.bootstrap`. The p-value carries the ``+1`` correction. The CI is the bootstrap
    CI of the mean (``method``).

    Args:
        x: per-unit values ``[n]`` (e.g. per-prompt faithfulness).
    """
    _check_alternative(alternative)
    xa = _as_1d(x, "x", 2)
    rng = as_generator(seed)
    mean = float(np.mean(xa))
    if np.ptp(xa) == 0.0:
        # every resample equals the observed mean: the null distribution is the point null_value
        null = np.full(1, float(null_value))
        lo = hi = mean
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=scipy.stats.DegenerateDataWarning)
            res = scipy.stats.bootstrap(
                (xa,), _mean_stat, n_resamples=n_resamples, vectorized=True,
                confidence_level=confidence_level, method=method, **_rng_kwargs(scipy.stats.bootstrap, rng),
            )
        null = np.asarray(res.bootstrap_distribution) - mean + float(null_value)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            lo, hi = (float(q) for q in np.quantile(res.bootstrap_distribution,
                                                     [(1 - confidence_level) / 2, (1 + confidence_level) / 2]))
    p = empirical_p_value(mean, null, alternative=alternative)
    return TestOutcome(
        statistic="mean_bootstrap", effect=mean, p_value=p, ci_low=lo, ci_high=hi, n=int(xa.size),
        null_value=float(null_value), alternative=alternative, details={"n_resamples": int(null.size)},
    )


# --------------------------------------------------------------------------------------------------
# empirical baselines
# --------------------------------------------------------------------------------------------------


def empirical_p_value(
    observed: float,
    null_samples: Sequence[float] | np.ndarray,
    *,
    alternative: Alternative = "greater",
) -> float:
    """Monte-Carlo p-value of ``observed`` against samples drawn under H0, with the +1 correction.

    ``greater``: ``(1 + #{s >= observed}) / (1 + n)``; ``less`` mirrors it; ``two-sided`` is
    ``min(1, 2 * min(p_greater, p_less))``. A tiny relative tolerance counts float-equal samples as ties.

    Args:
        observed: the observed statistic.
        null_samples: ``[n]`` statistics of samples drawn under the null (e.g. random circuits).
    """
    _check_alternative(alternative)
    if not np.isfinite(observed):
        raise StatsInputError(f"observed must be finite, got {observed}")
    null = _as_1d(null_samples, "null_samples", 1)
    tol = 1e-12 * max(1.0, abs(float(observed)))
    n = null.size
    p_greater = (1.0 + np.count_nonzero(null >= observed - tol)) / (1.0 + n)
    p_less = (1.0 + np.count_nonzero(null <= observed + tol)) / (1.0 + n)
    if alternative == "greater":
        return float(p_greater)
    if alternative == "less":
        return float(p_less)
    return float(min(1.0, 2.0 * min(p_greater, p_less)))


def z_score(observed: float, null_samples: Sequence[float] | np.ndarray) -> float:
    """``(observed - mean(null)) / std(null, ddof=1)``; ``±inf`` (or NaN when equal) if the null has no spread."""
    null = _as_1d(null_samples, "null_samples", 2)
    sd = float(np.std(null, ddof=1))
    diff = float(observed) - float(np.mean(null))
    if sd == 0.0:
        return math.nan if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / sd


# --------------------------------------------------------------------------------------------------
# multiple comparisons, binomial, overlap
# --------------------------------------------------------------------------------------------------


def benjamini_hochberg(
    p_values: Sequence[float] | np.ndarray, *, alpha: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg FDR control via ``statsmodels.stats.multitest.multipletests(method="fdr_bh")``.

    NaN p-values (tests that could not run) are left out of the family and stay NaN / not rejected.

    Args:
        p_values: ``[m]`` unadjusted p-values in [0, 1] (or NaN).

    Returns:
        ``(reject [m] bool, p_adjusted [m] float)``.
    """
    if not 0.0 < alpha < 1.0:
        raise StatsInputError(f"alpha must be in (0, 1), got {alpha}")
    p = np.asarray(p_values, dtype=float).reshape(-1)
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise StatsInputError("p-values must lie in [0, 1]")
    reject = np.zeros(p.shape, dtype=bool)
    adjusted = np.full(p.shape, np.nan)
    if finite.any():
        rej, padj, _, _ = multipletests(p[finite], alpha=alpha, method="fdr_bh")
        reject[finite] = rej
        adjusted[finite] = padj
    return reject, adjusted


def binomial_test(
    k: int,
    n: int,
    *,
    p0: float,
    alternative: Alternative = "greater",
    confidence_level: float = 0.95,
) -> TestOutcome:
    """Exact binomial test of a success rate ``k / n`` against ``p0`` (:func:`scipy.stats.binomtest`).

    ``effect`` is the observed rate, the CI the two-sided Wilson score interval of the rate.
    """
    _check_alternative(alternative)
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer))):
        raise StatsInputError("k and n must be integers")
    if n < 1 or not 0 <= k <= n:
        raise StatsInputError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 <= p0 <= 1.0:
        raise StatsInputError(f"p0 must be in [0, 1], got {p0}")
    res = scipy.stats.binomtest(int(k), int(n), p=float(p0), alternative=alternative)
    # two-sided interval whatever the test direction (a one-sided test object gives a one-sided CI)
    ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence_level, method="wilson")
    return TestOutcome(
        statistic="rate_binomial", effect=float(k) / float(n), p_value=float(res.pvalue),
        ci_low=float(ci.low), ci_high=float(ci.high), n=int(n), null_value=float(p0),
        alternative=alternative, details={"k": int(k)},
    )


def jaccard(a: Any, b: Any) -> float:
    """Jaccard index ``|a ∩ b| / |a ∪ b|`` of two collections of hashable items (1.0 when both are empty)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


# --------------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------------


def decide_verdict(result: TestResult, *, alpha: float = 0.05) -> str:
    """Verdict from the adjusted p-value and the direction of the effect.

    * ``"supported"``: ``p_adjusted < alpha`` and the effect lies on the predicted side of
      ``null_value`` (for two-sided hypotheses: any side).
    * ``"not supported"``: the data contradict the prediction — the effect is significant
      but on the wrong side, or not significant and the confidence interval lies entirely on the null
      side (``ci_high <= null_value`` for ``greater``, ``ci_low >= null_value`` for ``less``; when no
      CI is available, the point estimate on the null side is used instead).
    * ``"inconclusive"``: anything else (not significant, CI covers both sides; no data; NaN p).
    """
    p = result.p_adjusted if np.isfinite(result.p_adjusted) else math.nan
    if not np.isfinite(p) or result.n <= 0 or not np.isfinite(result.effect):
        return "inconclusive"
    d = result.effect - result.null_value
    alt = result.alternative
    in_direction = (alt == "two-sided" and d != 0) or (alt == "greater" and d > 0) or (alt == "less" and d < 0)
    if p < alpha:
        return "supported" if in_direction else "not supported"
    if alt == "two-sided":
        return "inconclusive"
    has_ci = np.isfinite(result.ci_low) and np.isfinite(result.ci_high)
    if alt == "greater":
        null_side = result.ci_high <= result.null_value if has_ci else d <= 0
    else:
        null_side = result.ci_low >= result.null_value if has_ci else d >= 0
    return "not supported" if null_side else "inconclusive"
