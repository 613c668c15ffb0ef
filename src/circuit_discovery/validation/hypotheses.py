"""Registry of testable hypotheses about factual-recall circuits, and the runner that writes ``hypotheses.csv``.

A *hypothesis* has an ``id``, a ``description`` and a test that takes a *context* — a plain mapping of
precomputed arrays (the pipeline computes them from the model; nothing here touches a model) — and
returns one or more :class:`~circuit_discovery.validation.stats.TestResult` (or
:class:`~circuit_discovery.validation.stats.TestOutcome`, which is wrapped with the hypothesis id and
``context.get("relation", "all")``). :func:`run_hypotheses` runs them, applies Benjamini–Hochberg
across *all* results of the run, sets each verdict from the adjusted p-value and the direction of the
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
``context.get("relation", "all")``) or a mapping ``{relation: value}`` (one test per relation).
Optional context keys read by all built-ins: ``"n_resamples"`` (permutation / bootstrap resamples,
default 9999), ``"confidence_level"`` (default 0.95).

Built-in hypotheses and the context keys they need (shapes per relation):

========================== ==================================================================================
``early_site_mlp``         ``mlp_indirect_effect`` ``[n_prompts, n_layers]``: indirect effect of the MLP output
                           at the last subject token (``blocks.{l}.hook_mlp_out`` at role ``subject_last``).
                           Statistic: per-prompt share of ``|IE|`` in the first half of the layers (the
                           middle layer of an odd count counts half); sign-flip test of ``share - 0.5 > 0``.
``late_attention_extraction`` ``attn_block_drop_upper``, ``attn_block_drop_lower`` ``[n_prompts]``: metric drop
                           when attention from subject positions to the last position is blocked in the
                           upper / lower half of the layers. Paired permutation test of ``upper - lower > 0``.
``sparsity``               ``faithfulness_at_5pct`` ``[n_prompts]``: per-prompt faithfulness of the circuit
                           with <= 5% of the nodes; optional ``sparsity_threshold`` (0.8). One-sided bootstrap
                           test of ``mean > threshold``.
``shared_mechanism``       ``circuits`` ``{relation: collection of node ids}`` (>= 2 relations),
                           ``node_universe`` (collection of all node ids); optional ``n_random_circuits``
                           (1000). For every pair of relations: Jaccard overlap vs random circuits of the same
                           sizes from the universe (empirical p, +1 corrected).
``features_matter``        necessity: ``feature_ablation_drop`` ``[n_prompts]`` metric drop when the top SAE
                           features are ablated (sign-flip test ``> 0``); sufficiency: ``steering_flips``
                           ``[n_prompts]`` 0/1 (answer flipped by steering) with ``steering_baseline_rate``
                           (a rate: exact binomial test; or ``[n_random]`` 0/1 outcomes of random-feature
                           steering: one-sided Fisher exact test). Either part may be absent.
========================== ==================================================================================
"""
from __future__ import annotations

import abc
import inspect
import itertools
import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd
import scipy.stats

from circuit_discovery.io import atomic_write_text
from circuit_discovery.validation.stats import (
    StatsInputError,
    TestOutcome,
    TestResult,
    benjamini_hochberg,
    binomial_test,
    bootstrap_mean_test,
    decide_verdict,
    empirical_p_value,
    jaccard,
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
]

HYPOTHESIS_COLUMNS: tuple[str, ...] = (
    "hypothesis_id", "relation", "statistic", "effect", "ci_low", "ci_high", "p_value", "p_adjusted", "n",
    "verdict",
)

Context = Mapping[str, Any]


class HypothesisError(RuntimeError):
    """A hypothesis test failed on the given context."""


class HypothesisRegistryError(KeyError):
    """Unknown or duplicate hypothesis id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingContextError(KeyError):
    """The context lacks keys a requested hypothesis needs."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, "Hypothesis"] = {}


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
    """Run hypotheses, apply BH across all their results and set verdicts; see :func:`run_hypotheses`."""
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    if not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping, got {type(context).__name__}")
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
        except Exception as exc:  # noqa: BLE001 — re-raised or recorded with the hypothesis id
            if on_error == "raise":
                raise HypothesisError(f"hypothesis {h.id!r} failed: {exc}") from exc
            results.append(TestResult(
                hypothesis_id=h.id, relation=str(context.get("relation", "all")), statistic="error",
                effect=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan, n=0,
                details={"error": f"{type(exc).__name__}: {exc}"}))
    _, padj = benjamini_hochberg([r.p_value for r in results], alpha=alpha)
    for r, pa in zip(results, padj):
        r.p_adjusted = float(pa)
        r.verdict = decide_verdict(r, alpha=alpha)
    return results


def results_to_frame(results: Iterable[TestResult]) -> pd.DataFrame:
    """DataFrame with exactly :data:`HYPOTHESIS_COLUMNS`; ``df.attrs["results"]`` keeps the full results."""
    results = list(results)
    rows = [{c: getattr(r, c) for c in HYPOTHESIS_COLUMNS} for r in results]
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
        alpha: FDR level for Benjamini–Hochberg and the verdicts.
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
    for k, v in zip(keys[1:], values[1:]):
        if set(v.keys()) != set(rels):
            raise StatsInputError(f"context key {k!r} has relations {sorted(v)} but {keys[0]!r} has {sorted(rels)}")
    return [(str(r), tuple(v[r] for v in values)) for r in rels]


def _opts(context: Context) -> dict[str, Any]:
    return {"n_resamples": int(context.get("n_resamples", 9999)),
            "confidence_level": float(context.get("confidence_level", 0.95))}


def first_half_share(effects: Any) -> np.ndarray:
    """Per-prompt share of ``|effect|`` in the first half of the layers.

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


# --------------------------------------------------------------------------------------------------
# built-in hypotheses
# --------------------------------------------------------------------------------------------------


@register_hypothesis(
    "early_site_mlp",
    description="Early-site MLPs at the last subject token carry most of the factual-recall effect "
                "(share of MLP indirect effect in the first half of the layers > 0.5).",
    required_keys=("mlp_indirect_effect",),
)
def _early_site_mlp(context: Context, rng: np.random.Generator) -> list[TestResult]:
    out = []
    for rel, (ie,) in _per_relation(context, "mlp_indirect_effect"):
        share = first_half_share(ie)
        keep = np.isfinite(share)
        o = sign_flip_test(share[keep], null_value=0.5, alternative="greater", seed=rng, **_opts(context))
        o.statistic = "first_half_mlp_effect_share_sign_flip"
        o.details.update({"n_layers": int(np.asarray(ie).shape[1]), "n_dropped_zero_effect": int((~keep).sum())})
        out.append(TestResult.from_outcome("early_site_mlp", rel, o))
    return out


@register_hypothesis(
    "late_attention_extraction",
    description="Upper-layer attention from subject positions to the last token extracts the attribute "
                "(blocking it in upper layers hurts more than in lower layers).",
    required_keys=("attn_block_drop_upper", "attn_block_drop_lower"),
)
def _late_attention_extraction(context: Context, rng: np.random.Generator) -> list[TestResult]:
    out = []
    for rel, (up, low) in _per_relation(context, "attn_block_drop_upper", "attn_block_drop_lower"):
        o = paired_permutation_test(up, low, alternative="greater", seed=rng, **_opts(context))
        o.statistic = "upper_minus_lower_attention_block_drop_paired_permutation"
        out.append(TestResult.from_outcome("late_attention_extraction", rel, o))
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
        out.append(TestResult.from_outcome("sparsity", rel, o))
    return out


def jaccard_null(universe_size: int, size_a: int, size_b: int, n_samples: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Jaccard indices ``[n_samples]`` of independent uniform random subsets of sizes ``size_a``, ``size_b``."""
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


@register_hypothesis(
    "shared_mechanism",
    description="Circuits of different relations overlap more than random circuits of the same sizes "
                "(Jaccard overlap vs random-circuit null).",
    required_keys=("circuits", "node_universe"),
)
def _shared_mechanism(context: Context, rng: np.random.Generator) -> list[TestResult]:
    circuits = context["circuits"]
    if not isinstance(circuits, Mapping) or len(circuits) < 2:
        raise StatsInputError("context['circuits'] must map >= 2 relations to node collections")
    universe = list(dict.fromkeys(context["node_universe"]))
    uset = set(universe)
    n_random = int(context.get("n_random_circuits", 1000))
    sets = {str(r): set(c) for r, c in circuits.items()}
    for r, s in sets.items():
        if not s:
            raise StatsInputError(f"circuit of relation {r!r} is empty")
        if not s <= uset:
            raise StatsInputError(f"circuit of relation {r!r} has {len(s - uset)} node(s) outside node_universe")
    out = []
    for a, b in itertools.combinations(sorted(sets), 2):
        obs = jaccard(sets[a], sets[b])
        null = jaccard_null(len(universe), len(sets[a]), len(sets[b]), n_random, rng)
        o = TestOutcome(
            statistic="jaccard_vs_random_circuits", effect=obs,
            p_value=empirical_p_value(obs, null, alternative="greater"), n=n_random,
            null_value=float(np.mean(null)), alternative="greater",
            details={"z": z_score(obs, null) if np.ptp(null) > 0 else math.nan,
                     "null_q025_q50_q975": np.quantile(null, [0.025, 0.5, 0.975]).tolist(),
                     "size_a": len(sets[a]), "size_b": len(sets[b]), "n_universe": len(universe),
                     "n_shared": len(sets[a] & sets[b])},
        )
        out.append(TestResult.from_outcome("shared_mechanism", f"{a}|{b}", o))
    return out


class _FeaturesMatter(Hypothesis):
    id = "features_matter"
    description = ("The circuit's top SAE features matter: ablating them lowers the metric (necessity) and "
                   "steering them flips the answer more often than baseline steering (sufficiency).")
    required_keys = ("feature_ablation_drop", "steering_flips", "steering_baseline_rate")

    def missing_keys(self, context: Context) -> list[str]:
        has_nec = "feature_ablation_drop" in context
        has_suf = "steering_flips" in context and "steering_baseline_rate" in context
        if has_nec or has_suf:
            return []
        return list(self.required_keys)

    def test(self, context: Context, rng: np.random.Generator) -> list[TestResult]:
        out: list[TestResult] = []
        if "feature_ablation_drop" in context:
            for rel, (drop,) in _per_relation(context, "feature_ablation_drop"):
                o = sign_flip_test(drop, null_value=0.0, alternative="greater", seed=rng, **_opts(context))
                o.statistic = "necessity_feature_ablation_drop_sign_flip"
                out.append(TestResult.from_outcome(self.id, rel, o))
        if "steering_flips" in context and "steering_baseline_rate" in context:
            flips_ctx = context["steering_flips"]
            base_ctx = context["steering_baseline_rate"]
            if isinstance(flips_ctx, Mapping) and not isinstance(base_ctx, Mapping):
                base_ctx = {r: base_ctx for r in flips_ctx}  # one baseline shared by every relation
                pairs = _per_relation({**context, "steering_baseline_rate": base_ctx},
                                      "steering_flips", "steering_baseline_rate")
            else:
                pairs = _per_relation(context, "steering_flips", "steering_baseline_rate")
            for rel, (flips, base) in pairs:
                out.append(TestResult.from_outcome(self.id, rel, _sufficiency(flips, base, _opts(context))))
        return out


def _as_binary(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x).reshape(-1)
    if arr.size == 0:
        raise StatsInputError(f"{name} is empty")
    if not np.all(np.isin(arr.astype(float), (0.0, 1.0))):
        raise StatsInputError(f"{name} must contain only 0/1 (or booleans)")
    return arr.astype(bool)


def _sufficiency(flips: Any, baseline: Any, opts: dict[str, Any]) -> TestOutcome:
    f = _as_binary(flips, "steering_flips")
    k, n = int(f.sum()), int(f.size)
    if np.ndim(baseline) == 0:
        o = binomial_test(k, n, p0=float(baseline), alternative="greater",
                          confidence_level=opts["confidence_level"])
        o.statistic = "sufficiency_steering_flip_rate_binomial"
        return o
    b = _as_binary(baseline, "steering_baseline_rate")
    kb, nb = int(b.sum()), int(b.size)
    table = [[k, n - k], [kb, nb - kb]]
    res = scipy.stats.fisher_exact(table, alternative="greater")
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=opts["confidence_level"], method="wilson")
    return TestOutcome(
        statistic="sufficiency_steering_flip_rate_fisher", effect=k / n, p_value=float(res.pvalue),
        ci_low=float(ci.low), ci_high=float(ci.high), n=n, null_value=kb / nb, alternative="greater",
        details={"k": k, "k_baseline": kb, "n_baseline": nb, "odds_ratio": float(res.statistic)},
    )
