"""Registry of testable hypotheses about factual-recall circuits, and the runner that writes ``hypotheses.csv``.

A *hypothesis* has an ``id``, a ``description`` and a test that takes a *context* — a plain mapping of
precomputed arrays (the pipeline computes them from the model; nothing here touches a model) — and
returns one or more :class:`~circuit_discovery.validation.stats.TestResult` (or
:class:`~circuit_discovery.validation.stats.TestOutcome`, which is wrapped with the hypothesis id and
``context.get("relation", "all")``). :func:`run_hypotheses` runs them, applies Benjamini–Hochberg
within each hypothesis family (see below), sets each verdict from the adjusted p-value and the direction of the
effect (:func:`~circuit_discovery.validation.stats.decide_verdict`) and returns a DataFrame with
:data:`HYPOTHESIS_COLUMNS`.

Adding your own hypothesis — with the decorator::

    import numpy as np
    from circuit_discovery.validation.hypotheses import register_hypothesis, run_hypotheses
    from circuit_discovery.validation.stats import sign_flip_test

    @register_hypothesis("bos_sink", description="Ablating BOS attention lowers the metric",
                         required_keys=("bos_ablation_drop",))
    def bos_sink(context, rng):
        # context["bos_ablation_drop"]: [n_prompts] metric drop per prompt
        return sign_flip_test(context["bos_ablation_drop"], alternative="greater", seed=rng)

    df = run_hypotheses({"bos_ablation_drop": np.random.default_rng(0).normal(1, 1, 40)}, ids=["bos_sink"])

or by subclassing (subclasses with a non-empty ``id`` register themselves when defined)::

    from circuit_discovery.validation.hypotheses import Hypothesis

    class BosSink(Hypothesis):
        id = "bos_sink_v2"
        description = "Ablating BOS attention lowers the metric"
        required_keys = ("bos_ablation_drop",)

        def test(self, context, rng):
            return sign_flip_test(context["bos_ablation_drop"], seed=rng)

The test function may take ``(context)`` or ``(context, rng)``; ``rng`` is a
:class:`numpy.random.Generator` seeded from ``run_hypotheses(seed=...)`` and the hypothesis id, so a
hypothesis gives the same numbers whichever others run with it.

Per-relation data: every built-in accepts for each key either one value (tested once, relation
``context.get("relation", "all")``) or a mapping ``{relation: value}`` (one test per relation; a key
``"all"`` next to real relations is ignored: the built-ins add their own pooled rows).
Optional context keys read by all built-ins: ``"n_resamples"`` (permutation / bootstrap resamples,
default 9999), ``"confidence_level"`` (default 0.95).

Multiple comparisons: Benjamini–Hochberg runs *within each family*, never over the whole run. A row's
family is its hypothesis id, or ``"<id>/pooled"`` for a built-in's pooled row over relations (the pooled
test is read first, the per-relation rows inside their own family); the ``family`` column says which.
A hypothesis of your own may put a row in another family with ``details["family"] = "..."``.
``n`` is always the number of independent units (facts, prompts or relations), never resamples or
random draws (those are in ``details``).

Built-in hypotheses and the context keys they need (shapes per relation):

=============================== ==============================================================================
``early_site_mlp``              ``mlp_ie``, ``attn_ie`` ``[n_facts, n_layers]``: windowed indirect effects of
                                the MLP and of the attention output at the last subject token (ROME noise).
                                Per fact the paired contrast ``sum_{l in early half} (mlp - attn) /
                                sum_l (|mlp| + |attn|)`` (the middle layer of an odd count weighs 1/2);
                                sign-flip test of ``contrast > 0``; n = facts. Attention at the same token
                                is the control: any component at the subject token has an early-layer
                                effect, the claim is that the MLPs carry more of it.
``late_attention_extraction``   ``attn_block_drop_upper``, ``attn_block_drop_lower`` ``[n_prompts]``: metric
                                drop when attention from subject positions to the last position is blocked
                                in the upper / lower half of the layers. Per relation: paired permutation test
                                of ``upper - lower > 0`` (n = prompts); with >= 2 relations also a pooled row
                                (unit = a relation's mean difference, sign-flip test, n = relations).
``sparsity``                    ``faithfulness_at_5pct`` ``[n_prompts]``: per-prompt faithfulness of the
                                circuit with <= 5% of the nodes (held-out prompts); optional
                                ``sparsity_threshold`` (0.8). One-sided bootstrap test of ``mean > threshold``.
``shared_mechanism``            ``circuit_halves`` ``{relation: (ids_a, ids_b)}`` (circuits found on disjoint
                                halves of the relation's discovery facts, >= 2 relations) and
                                ``relation_universe`` ``{relation: [relevant node ids]}``; optional
                                ``node_stratum`` (callable id -> hashable; default ``(component, layer, role)``
                                of :func:`~circuit_discovery.validation.nulls.node_stratum`) and
                                ``n_random_circuits`` (999); optional ``relation_metric_gap`` ``{relation:
                                m(N) - m(empty)}`` on the discovery facts with ``min_metric_gap`` (0.5):
                                relations below it are left out (their circuits carry no metric difference).
                                One pooled row: mean between-relation Jaccard of
                                the half circuits against a stratified null that redraws every circuit inside
                                its strata with the same per-stratum counts (p-value); effect = (between -
                                null mean) / (within - null mean), the share of the reproducible, above-chance
                                overlap that is shared across relations (NaN, verdict inconclusive, when the
                                halves of a relation overlap no more than chance). Second pooled row
                                ``relation_specificity``: within minus between overlap (on the nodes every
                                relation has) against relation labels permuted across the halves. n =
                                relations. Legacy keys ``circuits`` ``{relation: ids}`` + ``node_universe``
                                run the first row without halves (effect = between - null mean).
``features_matter``             necessity: ``feature_ablation_drop`` and ``random_feature_ablation_drop``
                                ``[n_prompts]`` (held-out prompts; the latter the mean drop over matched random
                                feature sets of that prompt): sign-flip test of the paired difference ``> 0``.
                                sufficiency: ``steering_flips`` ``[n_prompts]`` 0/1 and
                                ``steering_random_flip_rate`` ``[n_prompts]`` (that prompt's flip rate under
                                random-feature steering; optional ``steering_random_draws``, the number of
                                draws behind each rate): exact conditional test of ``sum(flips)`` with
                                ``flip_i ~ Bernoulli(q_i)`` under H0, ``q_i = (flip_i + draws * rate_i) /
                                (draws + 1)`` (circuit exchangeable with the random draws of its prompt;
                                ``q_i = rate_i`` when ``draws`` is not given); effect = mean paired
                                difference. n = prompts. Pooled rows over all prompts with >= 2 relations.
                                Either part may be absent; the legacy keys (a drop without a random control,
                                ``steering_baseline_rate``) give an inconclusive row that says what is missing.
=============================== ==============================================================================
"""
from __future__ import annotations

import abc
import inspect
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from circuit_discovery.errors import CircuitDiscoveryError, InputError
from circuit_discovery.io import atomic_write_text
from circuit_discovery.validation.nulls import (
    jaccard_matrix,
    label_permutation_overlap_null,
    overlap_data,
    overlap_summary,
    poisson_binomial_sf,
    stratified_overlap_null,
)
from circuit_discovery.validation.stats import (
    StatsInputError,
    TestOutcome,
    TestResult,
    benjamini_hochberg,
    bootstrap_ci,
    bootstrap_mean_test,
    decide_verdict,
    empirical_p_value,
    paired_permutation_test,
    sign_flip_test,
    z_score,
)

__all__ = [
    "HYPOTHESIS_COLUMNS",
    "HypothesisError",
    "HypothesisRegistryError",
    "MissingContextError",
    "Hypothesis",
    "FunctionHypothesis",
    "register_hypothesis",
    "unregister_hypothesis",
    "get_hypothesis",
    "list_hypotheses",
    "evaluate_hypotheses",
    "results_to_frame",
    "run_hypotheses",
    "write_hypotheses_csv",
    "first_half_share",
    "jaccard_null",
    "early_mlp_attn_contrast",
    "family_of",
]

HYPOTHESIS_COLUMNS: tuple[str, ...] = (
    "hypothesis_id", "relation", "statistic", "effect", "ci_low", "ci_high", "p_value", "p_adjusted", "n",
    "verdict", "family",
)

Context = Mapping[str, Any]


#: what a hypothesis test raises on data it cannot test (recorded with ``on_error="record"``); anything else is a
#: programming error and propagates
_TEST_ERRORS = (CircuitDiscoveryError, ValueError, TypeError, KeyError, IndexError, ArithmeticError)


class HypothesisError(CircuitDiscoveryError, RuntimeError):
    """A hypothesis test failed on the given context."""


class HypothesisRegistryError(CircuitDiscoveryError, KeyError):
    """Unknown or duplicate hypothesis id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingContextError(CircuitDiscoveryError, KeyError):
    """The context lacks keys a requested hypothesis needs."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, Hypothesis] = {}


# --------------------------------------------------------------------------------------------------
# hypothesis types
# --------------------------------------------------------------------------------------------------


class Hypothesis(abc.ABC):
    """Base class: subclass, set ``id``/``description``/``required_keys`` and implement :meth:`test`.

    Subclass keywords: ``register=False`` to not register on definition, ``overwrite=True`` to replace
    a registered hypothesis with the same id.
    """

    id: ClassVar[str] = ""
    description: ClassVar[str] = ""
    required_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, register: bool = True, overwrite: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register and cls.__dict__.get("id") and not inspect.isabstract(cls):
            _add(cls(), overwrite=overwrite)

    def missing_keys(self, context: Context) -> list[str]:
        """Context keys this hypothesis needs but ``context`` lacks (empty list: it can run)."""
        return [k for k in self.required_keys if k not in context]

    def applicable(self, context: Context) -> bool:
        return not self.missing_keys(context)

    @abc.abstractmethod
    def test(self, context: Context, rng: np.random.Generator) -> Any:
        """Return a TestResult / TestOutcome or an iterable of them."""

    def run(self, context: Context, rng: np.random.Generator) -> list[TestResult]:
        """Call :meth:`test` and normalise its output to a list of :class:`TestResult`."""
        return _normalise(self.id, self.test(context, rng), context)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"


class FunctionHypothesis(Hypothesis, register=False):
    """A hypothesis backed by a plain function ``fn(context)`` or ``fn(context, rng)``."""

    def __init__(self, hypothesis_id: str, fn: Callable[..., Any], description: str = "",
                 required_keys: Iterable[str] = ()) -> None:
        self.id = hypothesis_id  # type: ignore[misc]  # instance attribute shadows the ClassVar
        self.description = description or (inspect.getdoc(fn) or "").split("\n")[0]  # type: ignore[misc]
        self.required_keys = tuple(required_keys)  # type: ignore[misc]
        self.fn = fn
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._takes_rng = "rng" in inspect.signature(fn).parameters or len(params) >= 2

    def test(self, context: Context, rng: np.random.Generator) -> Any:
        return self.fn(context, rng) if self._takes_rng else self.fn(context)


def _normalise(hypothesis_id: str, out: Any, context: Context) -> list[TestResult]:
    relation = str(context.get("relation", "all"))
    items = [out] if isinstance(out, (TestResult, TestOutcome)) else list(out or [])
    results: list[TestResult] = []
    for item in items:
        if isinstance(item, TestResult):
            if not item.hypothesis_id:
                item.hypothesis_id = hypothesis_id
            results.append(item)
        elif isinstance(item, TestOutcome):
            results.append(TestResult.from_outcome(hypothesis_id, relation, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], TestOutcome):
            results.append(TestResult.from_outcome(hypothesis_id, str(item[0]), item[1]))
        else:
            raise HypothesisError(
                f"hypothesis {hypothesis_id!r} returned {type(item).__name__}; expected TestResult, "
                "TestOutcome or (relation, TestOutcome)")
    return results


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def _add(h: Hypothesis, overwrite: bool) -> None:
    if not h.id or not isinstance(h.id, str):
        raise HypothesisRegistryError("a hypothesis needs a non-empty string id")
    if h.id in _REGISTRY and not overwrite:
        raise HypothesisRegistryError(
            f"hypothesis id {h.id!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[h.id] = h


def register_hypothesis(hypothesis_id: str, *, description: str = "", required_keys: Iterable[str] = (),
                        overwrite: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(context[, rng]) -> TestResult | TestOutcome | iterable`` as a hypothesis.

    The decorated function is returned unchanged. See the module docstring for an example.
    """
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError("register_hypothesis decorates a callable")
        _add(FunctionHypothesis(hypothesis_id, fn, description, required_keys), overwrite=overwrite)
        return fn
    return deco


def unregister_hypothesis(hypothesis_id: str) -> None:
    """Remove a hypothesis from the registry (unknown id: :class:`HypothesisRegistryError`)."""
    if hypothesis_id not in _REGISTRY:
        raise HypothesisRegistryError(f"no hypothesis registered as {hypothesis_id!r}")
    del _REGISTRY[hypothesis_id]


def get_hypothesis(hypothesis_id: str) -> Hypothesis:
    try:
        return _REGISTRY[hypothesis_id]
    except KeyError:
        raise HypothesisRegistryError(
            f"no hypothesis registered as {hypothesis_id!r}; known: {sorted(_REGISTRY)}") from None


def list_hypotheses() -> dict[str, str]:
    """``{id: description}`` of every registered hypothesis, in registration order."""
    return {k: h.description for k, h in _REGISTRY.items()}


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def _rng_for(seed: int, hypothesis_id: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(hypothesis_id.encode("utf-8"))])


def evaluate_hypotheses(
    context: Context,
    ids: Iterable[str] | None = None,
    *,
    alpha: float = 0.05,
    seed: int = 0,
    on_error: str = "raise",
) -> list[TestResult]:
    """Run hypotheses, apply BH within each family (:func:`family_of`) and set verdicts; see :func:`run_hypotheses`."""
    if on_error not in ("raise", "record"):
        raise InputError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    if not isinstance(context, Mapping):
        raise InputError(f"context must be a mapping of context keys to data, got {type(context).__name__}")
    if ids is None:
        selected = [h for h in _REGISTRY.values() if h.applicable(context)]
    else:
        selected = [get_hypothesis(i) for i in ids]
        for h in selected:
            if not h.applicable(context):
                raise MissingContextError(
                    f"hypothesis {h.id!r} needs context keys {h.missing_keys(context) or list(h.required_keys)}")
    results: list[TestResult] = []
    for h in selected:
        try:
            results.extend(h.run(context, _rng_for(seed, h.id)))
        except _TEST_ERRORS as exc:  # bad or insufficient data: re-raised or recorded with the hypothesis id
            if on_error == "raise":
                raise HypothesisError(f"hypothesis {h.id!r} failed: {exc}") from exc
            results.append(TestResult(
                hypothesis_id=h.id, relation=str(context.get("relation", "all")), statistic="error",
                effect=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan, n=0,
                details={"error": f"{type(exc).__name__}: {exc}"}))
    families: dict[str, list[TestResult]] = {}
    for r in results:
        r.details.setdefault("family", r.hypothesis_id)
        families.setdefault(family_of(r), []).append(r)
    for fam in families.values():  # BH within each family, never across the run
        _, padj = benjamini_hochberg([r.p_value for r in fam], alpha=alpha)
        for r, pa in zip(fam, padj):
            r.p_adjusted = float(pa)
            r.verdict = decide_verdict(r, alpha=alpha)
    return results


def family_of(result: TestResult) -> str:
    """The multiple-comparison family of a result: ``details["family"]``, else its hypothesis id."""
    return str(result.details.get("family") or result.hypothesis_id)


def results_to_frame(results: Iterable[TestResult]) -> pd.DataFrame:
    """DataFrame with exactly :data:`HYPOTHESIS_COLUMNS`; ``df.attrs["results"]`` keeps the full results."""
    results = list(results)
    rows = [{c: family_of(r) if c == "family" else getattr(r, c) for c in HYPOTHESIS_COLUMNS} for r in results]
    df = pd.DataFrame(rows, columns=list(HYPOTHESIS_COLUMNS))
    df = df.astype({"effect": float, "ci_low": float, "ci_high": float, "p_value": float,
                    "p_adjusted": float, "n": int})
    df.attrs["results"] = results
    return df


def run_hypotheses(
    context: Context,
    ids: Iterable[str] | None = None,
    alpha: float = 0.05,
    *,
    seed: int = 0,
    on_error: str = "raise",
) -> pd.DataFrame:
    """Run registered hypotheses on ``context`` and return one row per test result.

    Args:
        context: mapping of precomputed inputs (see the module docstring for the built-ins' keys).
        ids: hypothesis ids to run; ``None`` runs every registered hypothesis whose keys are present
            (others are skipped silently). Explicit ids with missing keys raise :class:`MissingContextError`.
        alpha: FDR level for Benjamini–Hochberg (within each family) and the verdicts.
        seed: base seed; each hypothesis gets its own generator from ``(seed, id)``.
        on_error: ``"raise"`` (:class:`HypothesisError`) or ``"record"`` (an inconclusive row with
            ``statistic="error"`` and NaN p-value, left out of the BH family).

    Returns:
        DataFrame with columns :data:`HYPOTHESIS_COLUMNS`.
    """
    return results_to_frame(evaluate_hypotheses(context, ids, alpha=alpha, seed=seed, on_error=on_error))


def write_hypotheses_csv(df: pd.DataFrame, path: Any) -> Any:
    """Write ``df`` (columns :data:`HYPOTHESIS_COLUMNS`, in that order) atomically as CSV; returns the path."""
    missing = [c for c in HYPOTHESIS_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"hypotheses frame lacks columns {missing}")
    text = df.loc[:, list(HYPOTHESIS_COLUMNS)].to_csv(index=False, float_format="%.6g", lineterminator="\n")
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------------
# helpers for built-ins
# --------------------------------------------------------------------------------------------------


def _per_relation(context: Context, *keys: str) -> list[tuple[str, tuple[Any, ...]]]:
    """Pair up the values of ``keys``: all mappings (same relations) or all plain values."""
    values = [context[k] for k in keys]
    is_map = [isinstance(v, Mapping) for v in values]
    if any(is_map) and not all(is_map):
        raise StatsInputError(f"context keys {list(keys)} must all be per-relation mappings or all plain values")
    if not any(is_map):
        return [(str(context.get("relation", "all")), tuple(values))]
    rels = list(values[0].keys())
    ignore = {"all"} if len(rels) > 1 and "all" in rels else set()  # pooled copies: the built-ins pool themselves
    rels = [r for r in rels if r not in ignore]
    for k, v in zip(keys[1:], values[1:]):
        if set(v.keys()) - ignore != set(rels):
            raise StatsInputError(f"context key {k!r} has relations {sorted(v)} but {keys[0]!r} has {sorted(rels)}")
    return [(str(r), tuple(v[r] for v in values)) for r in rels]


def _opts(context: Context) -> dict[str, Any]:
    return {"n_resamples": int(context.get("n_resamples", 9999)),
            "confidence_level": float(context.get("confidence_level", 0.95))}


def first_half_share(effects: Any) -> np.ndarray:
    """Per-prompt share of ``|effect|`` in the first half of the layers.

    This is the statistic of the *old* ``early_site_mlp`` test (share vs 0.5), kept for comparison: any
    component at the subject token passes it, because subject positions stop mattering in upper layers.
    The built-in now uses :func:`early_mlp_attn_contrast`.

    Args:
        effects: ``[n_prompts, n_layers]`` per-layer effects.

    Returns:
        ``[n_prompts]`` shares in [0, 1]; NaN for prompts whose effects are all 0. With an odd number of
        layers the middle layer counts half to each half, so layer-exchangeable effects give share 0.5
        in expectation.
    """
    ie = np.abs(np.asarray(effects, dtype=float))
    if ie.ndim != 2 or ie.shape[1] < 2:
        raise StatsInputError(f"effects must be [n_prompts, n_layers >= 2], got shape {ie.shape}")
    if not np.all(np.isfinite(ie)):
        raise StatsInputError("effects contain NaN or infinite values")
    L = ie.shape[1]
    w = np.zeros(L)
    w[: L // 2] = 1.0
    if L % 2:
        w[L // 2] = 0.5
    total = ie.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, ie @ w / np.where(total > 0, total, 1.0), np.nan)


def early_mlp_attn_contrast(mlp_ie: Any, attn_ie: Any) -> np.ndarray:
    """Per-fact paired contrast of MLP against attention indirect effects over the early half of the layers.

    Args:
        mlp_ie, attn_ie: ``[n_facts, n_layers]`` windowed indirect effects of the MLP and of the attention
            output at the same token (the last subject token), from the same noise samples.

    Returns:
        ``[n_facts]`` values ``sum_l w_l (mlp_l - attn_l) / sum_l (|mlp_l| + |attn_l|)`` with ``w_l = 1`` in
        the first half of the layers (``1/2`` for the middle layer of an odd count), else 0; NaN for a fact
        whose effects are all 0. Swapping MLP and attention of a fact flips the sign, so when the two are
        exchangeable the contrast is symmetric about 0 (the null of the sign-flip test).
    """
    m = np.asarray(mlp_ie, dtype=float)
    a = np.asarray(attn_ie, dtype=float)
    if m.ndim != 2 or m.shape[1] < 2:
        raise StatsInputError(f"mlp_ie must be [n_facts, n_layers >= 2], got shape {m.shape}")
    if a.shape != m.shape:
        raise StatsInputError(f"attn_ie must have the shape of mlp_ie {m.shape}, got {a.shape}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(a))):
        raise StatsInputError("mlp_ie / attn_ie contain NaN or infinite values")
    L = m.shape[1]
    w = np.zeros(L)
    w[: L // 2] = 1.0
    if L % 2:
        w[L // 2] = 0.5
    total = (np.abs(m) + np.abs(a)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, (m - a) @ w / np.where(total > 0, total, 1.0), np.nan)


def _min_sign_flip_p(n: int) -> float:
    """Smallest one-sided p-value an exact sign-flip test on ``n`` units can reach."""
    return float(0.5 ** n)


def _pooled(result: TestResult) -> TestResult:
    result.details["family"] = f"{result.hypothesis_id}/pooled"
    return result


def _nan_row(hypothesis_id: str, relation: str, statistic: str, why: str) -> TestResult:
    """An inconclusive row (NaN p-value, left out of BH) saying which input is missing."""
    return TestResult(hypothesis_id=hypothesis_id, relation=relation, statistic=statistic, effect=math.nan,
                      ci_low=math.nan, ci_high=math.nan, p_value=math.nan, n=0, details={"note": why})


# --------------------------------------------------------------------------------------------------
# built-in hypotheses
# --------------------------------------------------------------------------------------------------


class _EarlySiteMlp(Hypothesis):
    id = "early_site_mlp"
    description = ("Early-site MLPs at the last subject token carry more of the factual-recall effect than attention "
                   "at the same token (paired per-fact contrast over the early half of the layers > 0).")
    required_keys = ("mlp_ie", "attn_ie")

    def missing_keys(self, context: Context) -> list[str]:
        if "mlp_indirect_effect" in context and "mlp_ie" not in context:
            return []  # legacy key: test() explains what is needed now
        return super().missing_keys(context)

    def test(self, context: Context, rng: np.random.Generator) -> list[TestResult]:
        if "mlp_ie" not in context or "attn_ie" not in context:
            raise InputError(
                "early_site_mlp now needs 'mlp_ie' and 'attn_ie' ([n_facts, n_layers] windowed indirect effects of "
                "the MLP and of attention at the last subject token); the old MLP-share test ('mlp_indirect_effect' "
                "alone, share vs 0.5) is passed by any component at the subject token and was removed")
        out: list[TestResult] = []
        per = _per_relation(context, "mlp_ie", "attn_ie")
        all_c = []
        for rel, (m, a) in per:
            c = early_mlp_attn_contrast(m, a)
            keep = np.isfinite(c)
            all_c.append(c[keep])
            out.append(self._row(rel, c[keep], int((~keep).sum()), np.asarray(m), np.asarray(a), rng, context))
        if len(per) >= 2:
            allm = np.concatenate([np.asarray(m, dtype=float) for _, (m, _a) in per])
            alla = np.concatenate([np.asarray(a, dtype=float) for _, (_m, a) in per])
            c = np.concatenate(all_c)
            out.append(_pooled(self._row("all", c, int(sum(len(np.asarray(m)) for _, (m, _a) in per) - c.size),
                                         allm, alla, rng, context)))
        return out

    def _row(self, rel: str, c: np.ndarray, dropped: int, m: np.ndarray, a: np.ndarray,
             rng: np.random.Generator, context: Context) -> TestResult:
        L = m.shape[1]
        if c.size < 2:
            return _nan_row(self.id, rel, "early_mlp_minus_attn_contrast_sign_flip",
                            f"{c.size} fact(s) with a non-zero effect; the paired test needs >= 2")
        o = sign_flip_test(c, null_value=0.0, alternative="greater", seed=rng, **_opts(context))
        o.statistic = "early_mlp_minus_attn_contrast_sign_flip"
        early = slice(0, L // 2)
        o.details.update({"n_layers": int(L), "early_layers": f"0-{L // 2 - 1}" + (f" + {L // 2}/2" if L % 2 else ""),
                          "n_dropped_zero_effect": dropped, "unit": "fact",
                          "mean_early_mlp_ie": float(m[:, early].mean()),
                          "mean_early_attn_ie": float(a[:, early].mean()),
                          "min_attainable_p": _min_sign_flip_p(c.size)})
        return TestResult.from_outcome(self.id, rel, o)


class _LateAttentionExtraction(Hypothesis):
    id = "late_attention_extraction"
    description = ("Upper-layer attention from subject positions to the last token extracts the attribute "
                   "(blocking it in upper layers hurts more than in lower layers).")
    required_keys = ("attn_block_drop_upper", "attn_block_drop_lower")

    def test(self, context: Context, rng: np.random.Generator) -> list[TestResult]:
        out = []
        means = []
        per = _per_relation(context, "attn_block_drop_upper", "attn_block_drop_lower")
        for rel, (up, low) in per:
            o = paired_permutation_test(up, low, alternative="greater", seed=rng, **_opts(context))
            o.statistic = "upper_minus_lower_attention_block_drop_paired_permutation"
            o.details.update({"unit": "prompt", "min_attainable_p": _min_sign_flip_p(o.n)})
            out.append(TestResult.from_outcome(self.id, rel, o))
            means.append(float(np.mean(np.asarray(up, dtype=float) - np.asarray(low, dtype=float))))
        if len(per) >= 2:
            o = sign_flip_test(means, null_value=0.0, alternative="greater", seed=rng, **_opts(context))
            o.statistic = "relation_mean_upper_minus_lower_drop_sign_flip"
            o.details.update({"unit": "relation", "min_attainable_p": _min_sign_flip_p(len(means)),
                              "relations": [r for r, _ in per]})
            out.append(_pooled(TestResult.from_outcome(self.id, "all", o)))
        return out


@register_hypothesis(
    "sparsity",
    description="A circuit with at most 5% of the nodes recovers more than 80% of the metric "
                "(mean per-prompt faithfulness > threshold, one-sided bootstrap test).",
    required_keys=("faithfulness_at_5pct",),
)
def _sparsity(context: Context, rng: np.random.Generator) -> list[TestResult]:
    thr = float(context.get("sparsity_threshold", 0.8))
    out = []
    for rel, (f,) in _per_relation(context, "faithfulness_at_5pct"):
        o = bootstrap_mean_test(f, null_value=thr, alternative="greater", seed=rng, **_opts(context))
        o.statistic = "mean_faithfulness_at_5pct_bootstrap"
        o.details["unit"] = "prompt"
        out.append(TestResult.from_outcome("sparsity", rel, o))
    return out


def jaccard_null(universe_size: int, size_a: int, size_b: int, n_samples: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Jaccard indices ``[n_samples]`` of independent uniform random subsets of sizes ``size_a``, ``size_b``.

    The *old* ``shared_mechanism`` null (uniform sets over one universe), kept for comparison only: any two
    circuits that concentrate on the same tokens and layers beat it. The built-in now uses
    :func:`~circuit_discovery.validation.nulls.stratified_overlap_null`.
    """
    if not (0 < size_a <= universe_size and 0 < size_b <= universe_size):
        raise StatsInputError(f"circuit sizes {size_a}, {size_b} must be in [1, {universe_size}]")
    ra = rng.random((n_samples, universe_size)).argsort(axis=1)[:, :size_a]
    rb = rng.random((n_samples, universe_size)).argsort(axis=1)[:, :size_b]
    ma = np.zeros((n_samples, universe_size), dtype=bool)
    mb = np.zeros((n_samples, universe_size), dtype=bool)
    np.put_along_axis(ma, ra, True, axis=1)
    np.put_along_axis(mb, rb, True, axis=1)
    inter = (ma & mb).sum(axis=1)
    return inter / (size_a + size_b - inter)


class _SharedMechanism(Hypothesis):
    id = "shared_mechanism"
    description = ("Circuits of different relations share node identities beyond what their tokens, layers and "
                   "components imply (between-relation overlap vs a stratified null, relative to the "
                   "within-relation split-half overlap; one pooled test).")
    required_keys = ("circuit_halves", "relation_universe")

    def missing_keys(self, context: Context) -> list[str]:
        miss = []
        if "circuit_halves" not in context and "circuits" not in context:
            miss.append("circuit_halves")
        if "relation_universe" not in context and "node_universe" not in context:
            miss.append("relation_universe")
        return miss

    def test(self, context: Context, rng: np.random.Generator) -> list[TestResult]:
        legacy = "circuit_halves" not in context
        raw = context["circuits"] if legacy else context["circuit_halves"]
        if not isinstance(raw, Mapping) or len(raw) < 2:
            raise InputError(f"context[{'circuits' if legacy else 'circuit_halves'!r}] must map >= 2 relations to "
                             "circuits; shared_mechanism compares relations")
        if legacy:
            circuits = {str(r): [list(c)] for r, c in raw.items()}
        else:
            circuits = {}
            for r, halves in raw.items():
                halves = list(halves)
                if len(halves) != 2:
                    raise InputError(f"circuit_halves[{r!r}] must be (ids_a, ids_b), two circuits found on disjoint "
                                     f"halves of the relation's facts; got {len(halves)}")
                circuits[str(r)] = [list(h) for h in halves]
        if "relation_universe" in context:
            universes = {str(r): list(u) for r, u in context["relation_universe"].items()}
        else:
            universes = {r: list(context["node_universe"]) for r in circuits}
        excluded: dict[str, float] = {}
        if "relation_metric_gap" in context:
            # a circuit found where the metric barely moves is not a mechanism to compare: only relations whose
            # |m(N) - m(empty)| on the facts the circuits came from reaches min_metric_gap take part
            min_gap = float(context.get("min_metric_gap", 0.5))
            gaps = {str(r): float(g) for r, g in context["relation_metric_gap"].items()}
            missing = sorted(set(circuits) - set(gaps))
            if missing:
                raise InputError(f"relation_metric_gap lacks relation(s) {missing}; give the discovery metric gap "
                                 "|m(N) - m(empty)| of every relation in circuit_halves")
            excluded = {r: gaps[r] for r in circuits if not abs(gaps[r]) >= min_gap}
            circuits = {r: c for r, c in circuits.items() if r not in excluded}
            if len(circuits) < 2:
                row = _nan_row(self.id, "all", "shared_overlap_share_between_vs_within_stratified_null",
                               f"fewer than 2 relations with a discovery metric gap >= {min_gap:g} "
                               f"({len(excluded)} degenerate): nothing to compare")
                row.details["excluded_degenerate"] = excluded
                return [row]
        data = overlap_data(circuits, universes, context.get("node_stratum"))
        within, between = (float(x) for x in overlap_summary(data.masks, data.rel_of))
        n_draws = int(context.get("n_random_circuits", 999))
        null_w, null_b = stratified_overlap_null(data, n_draws, rng)
        mu_b = float(null_b.mean())
        p = empirical_p_value(between, null_b, alternative="greater")
        n_rel = len(circuits)
        # nodes in the circuits of >= 2 relations (either half), most shared first
        counts: dict[str, int] = {}
        for ri in range(n_rel):
            for i in np.flatnonzero(data.masks[data.rel_of == ri].any(axis=0)):
                counts[data.nodes[i]] = counts.get(data.nodes[i], 0) + 1
        shared = sorted(((c, n) for n, c in counts.items() if c >= 2), key=lambda t: (-t[0], t[1]))[:10]
        details: dict[str, Any] = {
            "unit": "relation", "between_jaccard": between, "null_between_mean": mu_b,
            "null_between_q025_q50_q975": np.quantile(null_b, [0.025, 0.5, 0.975]).tolist(),
            "z_between": z_score(between, null_b) if np.ptp(null_b) > 0 else math.nan,
            "n_random_circuits": n_draws, "null": "stratified: per-circuit counts per (component, layer, role) kept",
            "circuit_sizes": {r: [int(data.masks[h].sum()) for h in np.flatnonzero(data.rel_of == ri)]
                              for ri, r in enumerate(data.relations)},
            "most_shared_nodes": [[n, c] for c, n in shared]}
        if excluded:
            details["excluded_degenerate"] = excluded
        if legacy:
            effect, stat = between - mu_b, "between_relation_jaccard_minus_stratified_null"
            details["note"] = "one circuit per relation (no circuit_halves): within-relation overlap not available"
        else:
            mu_w = float(null_w.mean())
            denom = within - mu_w
            details.update({"within_jaccard": within, "null_within_mean": mu_w})
            if denom > 1e-9:
                effect = (between - mu_b) / denom
            else:
                effect = math.nan
                details["note"] = ("the split-half circuits of a relation overlap no more than the stratified null "
                                   "(circuits not reproducible), so a shared mechanism cannot be judged")
            stat = "shared_overlap_share_between_vs_within_stratified_null"
        out = [TestResult.from_outcome(self.id, "all", TestOutcome(
            statistic=stat, effect=effect, p_value=p, n=n_rel, null_value=0.0, alternative="greater",
            details=details))]
        if not legacy and context.get("relation_specificity", False):
            # opt-in: its label-permutation null ignores that circuits of one template overlap on any model
            # (random-weights control: supported in 20 of 20 seeds; benchmarks/results/validation_controls.json)
            out.append(self._specificity(data, n_draws, rng))
        return out

    def _specificity(self, data: Any, n_draws: int, rng: np.random.Generator) -> TestResult:
        common = data.universes.all(axis=0)
        masks = data.masks[:, common]
        jmat = jaccard_matrix(masks)
        w, b = (float(x) for x in overlap_summary(masks, data.rel_of))
        null = label_permutation_overlap_null(jmat, 2, n_draws, rng)
        d = w - b
        return TestResult.from_outcome(self.id, "all", TestOutcome(
            statistic="relation_specificity_within_minus_between_jaccard_label_permutation", effect=d,
            p_value=empirical_p_value(d, null, alternative="greater"), n=len(data.relations), null_value=0.0,
            alternative="greater",
            details={"unit": "relation", "within_jaccard_common": w, "between_jaccard_common": b,
                     "n_common_nodes": int(common.sum()), "n_permutations": int(n_draws),
                     "null_q025_q50_q975": np.quantile(null, [0.025, 0.5, 0.975]).tolist(),
                     "null": "relation labels permuted across the split-half circuits (nodes every relation has)"}))


class _FeaturesMatter(Hypothesis):
    id = "features_matter"
    description = ("The circuit's top features matter more than matched random features: ablating them lowers the "
                   "metric more (necessity) and steering them flips the answer more often (sufficiency), per prompt.")
    required_keys = ("feature_ablation_drop", "random_feature_ablation_drop", "steering_flips",
                     "steering_random_flip_rate")

    def missing_keys(self, context: Context) -> list[str]:
        if "feature_ablation_drop" in context or "steering_flips" in context:
            return []  # either part may run; a part without its control gives an inconclusive row
        return list(self.required_keys)

    def test(self, context: Context, rng: np.random.Generator) -> list[TestResult]:
        out: list[TestResult] = []
        opts = _opts(context)
        rel0 = str(context.get("relation", "all"))
        if "feature_ablation_drop" in context and "random_feature_ablation_drop" in context:
            per = _per_relation(context, "feature_ablation_drop", "random_feature_ablation_drop")
            diffs = []
            for rel, (drop, rand) in per:
                d = _paired_diff(drop, rand, "feature_ablation_drop", "random_feature_ablation_drop")
                diffs.append(d)
                out.append(self._necessity(rel, d, rng, opts))
            if len(per) >= 2:
                out.append(_pooled(self._necessity("all", np.concatenate(diffs), rng, opts)))
        elif "feature_ablation_drop" in context:
            out.append(_nan_row(self.id, rel0, "necessity_needs_random_feature_control",
                                "feature_ablation_drop without random_feature_ablation_drop: a drop can only be "
                                "judged against matched random features of the same prompts"))
        if "steering_flips" in context and "steering_random_flip_rate" in context:
            draws = context.get("steering_random_draws")
            per = _per_relation(context, "steering_flips", "steering_random_flip_rate")
            parts = []
            for rel, (flips, rate) in per:
                m = draws.get(rel) if isinstance(draws, Mapping) else draws
                f, r = _as_binary(flips, "steering_flips"), _rates(rate, "steering_random_flip_rate")
                if f.shape != r.shape:
                    raise StatsInputError(f"steering_flips ({f.size}) and steering_random_flip_rate ({r.size}) "
                                          f"of relation {rel!r} must have one value per prompt")
                m_arr = np.full(f.size, np.nan if m is None else float(m))
                parts.append((f, r, m_arr))
                out.append(TestResult.from_outcome(self.id, rel, _sufficiency(f, r, m_arr, opts, rng)))
            if len(per) >= 2:
                f, r, m_arr = (np.concatenate(x) for x in zip(*parts))
                out.append(_pooled(TestResult.from_outcome(self.id, "all", _sufficiency(f, r, m_arr, opts, rng))))
        elif "steering_flips" in context:
            out.append(_nan_row(self.id, rel0, "sufficiency_needs_per_prompt_random_rate",
                                "steering_flips needs steering_random_flip_rate (each prompt's flip rate under random-"
                                "feature steering); pooled random draws would count draws as prompts"))
        return out

    def _necessity(self, rel: str, d: np.ndarray, rng: np.random.Generator, opts: dict[str, Any]) -> TestResult:
        if d.size < 2:
            return _nan_row(self.id, rel, "necessity_drop_minus_random_drop_sign_flip",
                            f"{d.size} prompt(s); the paired test needs >= 2")
        o = sign_flip_test(d, null_value=0.0, alternative="greater", seed=rng, **opts)
        o.statistic = "necessity_drop_minus_random_drop_sign_flip"
        o.details.update({"unit": "prompt", "min_attainable_p": _min_sign_flip_p(d.size)})
        return TestResult.from_outcome(self.id, rel, o)


def _paired_diff(x: Any, y: Any, xname: str, yname: str) -> np.ndarray:
    xa, ya = np.asarray(x, dtype=float).reshape(-1), np.asarray(y, dtype=float).reshape(-1)
    if xa.shape != ya.shape:
        raise StatsInputError(f"{xname} ({xa.size}) and {yname} ({ya.size}) need one value per prompt each")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise StatsInputError(f"{xname} / {yname} contain NaN or infinite values")
    return xa - ya


def _as_binary(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x).reshape(-1)
    if arr.size == 0:
        raise StatsInputError(f"{name} is empty")
    if not np.all(np.isin(arr.astype(float), (0.0, 1.0))):
        raise StatsInputError(f"{name} must contain only 0/1 (or booleans)")
    return arr.astype(bool)


def _rates(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
        raise StatsInputError(f"{name} must be finite rates in [0, 1], one per prompt")
    return arr


def _sufficiency(f: np.ndarray, rate: np.ndarray, draws: np.ndarray, opts: dict[str, Any],
                 rng: np.random.Generator) -> TestOutcome:
    """Exact conditional test of ``sum(f)`` given each prompt's random flip rate (see the module docstring)."""
    known = np.isfinite(draws)
    q = np.where(known, (f + np.where(known, draws, 0.0) * rate) / (np.where(known, draws, 0.0) + 1.0), rate)
    k = int(f.sum())
    d = f.astype(float) - rate
    lo, hi = bootstrap_ci(d, confidence_level=opts["confidence_level"], n_resamples=opts["n_resamples"], seed=rng) \
        if d.size >= 2 else (math.nan, math.nan)
    return TestOutcome(
        statistic="sufficiency_flip_minus_random_rate_exact_conditional", effect=float(d.mean()),
        p_value=poisson_binomial_sf(q, k), ci_low=lo, ci_high=hi, n=int(f.size), null_value=0.0,
        alternative="greater",
        details={"unit": "prompt", "k": k, "circuit_flip_rate": k / f.size, "mean_random_rate": float(rate.mean()),
                 "expected_flips_under_null": float(q.sum()),
                 "random_draws": None if not known.any() else int(np.nanmax(draws)),
                 "null": "circuit exchangeable with the random draws of its prompt" if known.all()
                 else "random flip rate taken as the prompt's flip probability"})
