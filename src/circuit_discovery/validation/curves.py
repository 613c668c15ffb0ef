"""Faithfulness, faithfulness curves (CPR / CMD), completeness, minimality and random-circuit baselines.

All functions are model-independent: the caller supplies ``metric_of(kept_nodes) -> float``, which runs
the model with every node *not* in ``kept_nodes`` ablated (mean / zero / resample ablation — the
caller's choice) and returns the task metric averaged over prompts (e.g. the logit difference).
Nodes are any hashable identifiers (``Node.key`` strings such as ``"mlp_out/L3/subject_last"`` or
``Node`` objects).

Batched evaluation: pass ``batched=True`` and a ``metric_of(list_of_node_lists) -> sequence of
floats`` (one value per node list, same order) to let the caller batch the forward passes of many
ablation patterns together.

Faithfulness (Wang et al. 2023; MIB, Mueller et al. 2025)::

    f(C) = (m(C) - m(∅)) / (m(N) - m(∅))

with ``N`` the full node set (nothing ablated) and ``∅`` the empty circuit (everything ablated), so
``f(N) = 1`` and ``f(∅) = 0`` by construction.

CPR and CMD follow the MIB circuit-localization track (Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark", ICML 2025; reference implementation ``evaluate_area_under_curve`` in
``MIB-circuit-track/MIB_circuit_track/evaluation.py``): the circuit is the top-``k`` fraction of
ranked nodes for ``k`` in ``(0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%)``; with the
trapezoid rule over the *fraction* axis (linear, not log, from the first to the last fraction —
there is no point at 0)::

    CPR = sum_i (k[i+1] - k[i]) * (f[i] + f[i+1]) / 2                 # signed f, no clipping
    CMD = sum_i (k[i+1] - k[i]) * (|1 - f[i]| + |1 - f[i+1]|) / 2     # |1 - f| taken per point

MIB neither clips ``f`` to [0, 1] nor renormalises the x range, and neither do we. Higher CPR is
better; CMD = 0 is optimal. (MIB floors ``k * n`` to an integer; we round *up* and keep at least one
node for every fraction > 0, so tiny fractions of small graphs are not empty circuits.)

**The curve's 100% point is always m(N).** ``faithfulness_curve(ranked, ..., universe=N)`` orders ``N`` by the
ranking (ranked nodes first, the unranked rest of ``N`` appended in ``N``'s order), so the last point keeps every
node of ``N`` and the normaliser is ``m(N) - m(∅)``, never ``m(ranked subset)``. Callers that rank only a
subset of ``N`` (feature graphs rank a few hundred of thousands of active features) must pass ``universe``.

**Random-circuit baselines.** :func:`random_circuit_baseline` draws null circuits that keep the circuit's
*forced* nodes (those every discovered circuit keeps by construction, e.g. the embeddings) and draw the rest
*matched*: for each stratum (e.g. ``(component, layer, role)``) as many nodes as the circuit has there, uniformly
from the universe's nodes of that stratum. Without ``forced`` and ``stratum`` it is the plain uniform same-size
draw, which a circuit that always keeps the subject embedding beats by construction under corrupted-run
ablation (most uniform draws lack it and score ``f = 0`` exactly; ``null_zero_share`` reports that share).
:func:`topm_random_baseline` is the stronger null of random subsets of the top-``M`` ranked nodes.

**Faithfulness with a confidence interval.** :func:`faithfulness_ci` takes per-prompt ``m(C), m(N), m(∅)``:
``f`` is the ratio of the prompt means (as above) and its CI the percentile bootstrap over prompts of that
ratio (:func:`ratio_of_means_bootstrap`). When ``|mean(m(N) - m(∅))| < min_gap`` (default
:data:`DEFAULT_MIN_GAP` = 0.5 logits) ablating everything barely moves the metric, so ``f`` is a ratio of noise:
the result is flagged ``degenerate`` and ``f`` / the CI are ``None`` instead of a wild number.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from scipy.integrate import trapezoid

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.validation.stats import (
    Alternative,
    SeedLike,
    TestOutcome,
    as_generator,
    empirical_p_value,
    z_score,
)

__all__ = [
    "MIB_FRACTIONS",
    "DEFAULT_MIN_GAP",
    "ZERO_TOL",
    "CurveInputError",
    "DegenerateMetricError",
    "MetricFn",
    "faithfulness",
    "circuit_sizes",
    "area_under_curve",
    "area_from_one",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "order_by_ranking",
    "circuit_faithfulness",
    "CompletenessResult",
    "completeness",
    "MinimalityResult",
    "minimality",
    "RandomBaselineResult",
    "random_circuit_baseline",
    "topm_random_baseline",
    "ratio_of_means_bootstrap",
    "faithfulness_ci",
]

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

#: Smallest ``|mean(m(N) - m(∅))|`` (in logits, for the logit-difference metric) for which faithfulness is
#: reported: below it, ablating every node barely changes the metric and ``f`` is a ratio of noise
#: (:func:`faithfulness_ci` then reports ``degenerate=True`` and no value).
DEFAULT_MIN_GAP: float = 0.5

#: ``|f| < ZERO_TOL`` counts as an exact zero in a baseline's null distribution (``null_zero_share``).
ZERO_TOL: float = 1e-9

Node = Hashable
_N = TypeVar("_N", bound=Hashable)  # the node type of one call (e.g. ``str`` node ids)
#: ``metric_of(kept_nodes) -> float``, or with ``batched=True`` ``metric_of([kept_0, kept_1, ...]) -> [m_0, m_1, ...]``
MetricFn = Callable[[Any], Any]


class CurveInputError(CircuitDiscoveryError, ValueError):
    """Bad input to a curve / circuit-validation routine (duplicates, unknown nodes, bad fractions...)."""


class DegenerateMetricError(CircuitDiscoveryError, ZeroDivisionError):
    """``m(N) == m(∅)``: ablating everything does not change the metric, so faithfulness is undefined."""


# --------------------------------------------------------------------------------------------------
# basic quantities
# --------------------------------------------------------------------------------------------------


def faithfulness(m_circuit: Any, m_full: Any, m_empty: Any, *, eps: float = 1e-12,
                 on_degenerate: str = "raise") -> Any:
    """``(m(C) - m(∅)) / (m(N) - m(∅))``, elementwise for arrays (e.g. per-prompt ``[n_prompts]``).

    Args:
        m_circuit, m_full, m_empty: scalars or broadcastable arrays.
        eps: ``|m(N) - m(∅)| <= eps`` counts as degenerate.
        on_degenerate: ``"raise"`` (:class:`DegenerateMetricError`) or ``"nan"`` (NaN where degenerate).

    Returns:
        float for scalar input, otherwise ``np.ndarray``.
    """
    if on_degenerate not in ("raise", "nan"):
        raise CurveInputError(f"on_degenerate must be 'raise' or 'nan', got {on_degenerate!r}")
    mc, mn, me = (np.asarray(v, dtype=float) for v in (m_circuit, m_full, m_empty))
    den = mn - me
    bad = np.abs(den) <= eps
    if np.any(bad) and on_degenerate == "raise":
        raise DegenerateMetricError(
            f"m(N) - m(empty) is {float(np.min(np.abs(den))):.3g} (<= {eps}): ablating every node does not "
            "change the metric, so faithfulness is undefined")
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(bad, np.nan, (mc - me) / np.where(bad, 1.0, den))
    return float(f) if f.ndim == 0 else f


def circuit_sizes(n_nodes: int, fractions: Sequence[float] | np.ndarray = MIB_FRACTIONS) -> np.ndarray:
    """Number of top-ranked nodes kept at each fraction: ``ceil(k * n)``, at least 1 when ``k > 0``.

    Returns:
        ``[len(fractions)]`` int array.
    """
    if n_nodes < 1:
        raise CurveInputError(f"need at least one node, got n_nodes={n_nodes}")
    fr = _check_fractions(fractions)
    # round before ceil so that e.g. 0.1 * 30 = 3.0000000000000004 keeps 3 nodes, not 4
    sizes = np.ceil(np.round(fr * n_nodes, 9)).astype(int)
    sizes = np.where(fr > 0, np.maximum(sizes, 1), 0)
    return np.minimum(sizes, n_nodes)


def _check_fractions(fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    fr = np.asarray(fractions, dtype=float).reshape(-1)
    if fr.size < 1 or not np.all(np.isfinite(fr)) or np.any(fr < 0) or np.any(fr > 1):
        raise CurveInputError(f"fractions must be finite values in [0, 1], got {list(fractions)}")
    if np.any(np.diff(fr) <= 0):
        raise CurveInputError(f"fractions must be strictly increasing, got {list(fractions)}")
    return fr


def _check_curve(fractions: Sequence[float] | np.ndarray,
                 f: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fr = _check_fractions(fractions)
    fa = np.asarray(f, dtype=float).reshape(-1)
    if fa.shape != fr.shape:
        raise CurveInputError(f"{fr.size} fractions but {fa.size} faithfulness values")
    if fr.size < 2:
        raise CurveInputError("need at least two points to integrate a curve")
    return fr, fa


def area_under_curve(fractions: Sequence[float] | np.ndarray, f: Sequence[float] | np.ndarray) -> float:
    """CPR: trapezoid area under the (signed, unclipped) faithfulness curve over the fraction axis."""
    fr, fa = _check_curve(fractions, f)
    return float(trapezoid(fa, fr))


def area_from_one(fractions: Sequence[float] | np.ndarray, f: Sequence[float] | np.ndarray) -> float:
    """CMD: trapezoid area of ``|1 - f|`` over the fraction axis (absolute value taken at each point, as MIB)."""
    fr, fa = _check_curve(fractions, f)
    return float(trapezoid(np.abs(1.0 - fa), fr))


# --------------------------------------------------------------------------------------------------
# evaluation helper
# --------------------------------------------------------------------------------------------------


class _Evaluator:
    """Calls ``metric_of`` one node list at a time or batched; counts the node lists evaluated."""

    def __init__(self, metric_of: MetricFn, batched: bool) -> None:
        if not callable(metric_of):
            raise CurveInputError("metric_of must be callable")
        self.metric_of = metric_of
        self.batched = batched
        self.n_evaluated = 0

    def many(self, node_lists: list[list[Node]]) -> np.ndarray:
        if not node_lists:
            return np.zeros(0)
        if self.batched:
            out = self.metric_of([list(k) for k in node_lists])
            values = [float(v) for v in out]
            if len(values) != len(node_lists):
                raise CurveInputError(
                    f"batched metric_of returned {len(values)} values for {len(node_lists)} node lists")
        else:
            values = [float(self.metric_of(list(k))) for k in node_lists]
        arr = np.asarray(values, dtype=float)
        if not np.all(np.isfinite(arr)):
            raise CurveInputError("metric_of returned a NaN or infinite value")
        self.n_evaluated += len(node_lists)
        return arr

    def one(self, nodes: list[Node]) -> float:
        return float(self.many([nodes])[0])


def _unique_list(nodes: Sequence[_N], name: str) -> list[_N]:
    out = list(nodes)
    seen: set[_N] = set()
    for n in out:
        if n in seen:
            raise CurveInputError(f"{name} contains duplicate node {n!r}")
        seen.add(n)
    return out


def _references(ev: _Evaluator, universe: list[Node], m_full: float | None, m_empty: float | None
                ) -> tuple[float, float]:
    todo = []
    if m_full is None:
        todo.append(universe)
    if m_empty is None:
        todo.append([])
    vals = list(ev.many(todo))
    mf = float(m_full) if m_full is not None else vals.pop(0)
    me = float(m_empty) if m_empty is not None else vals.pop(0)
    return mf, me


# --------------------------------------------------------------------------------------------------
# faithfulness curve
# --------------------------------------------------------------------------------------------------


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-``k`` fraction of ranked nodes.

    Attributes (arrays are ``[n_points]``): ``fractions``, ``sizes`` (nodes kept), ``metric`` (``m`` of
    the kept set), ``faithfulness``; ``m_full`` = m(N), ``m_empty`` = m(∅), ``cpr``, ``cmd``,
    ``n_nodes`` = |N|.
    """

    fractions: np.ndarray
    sizes: np.ndarray
    metric: np.ndarray
    faithfulness: np.ndarray
    m_full: float
    m_empty: float
    cpr: float
    cmd: float
    n_nodes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("fractions", "sizes", "metric", "faithfulness"):
            d[k] = np.asarray(d[k]).tolist()
        return d

    def faithfulness_at(self, fraction: float) -> float:
        """Faithfulness at the largest evaluated fraction ``<= fraction`` (NaN if none)."""
        idx = np.nonzero(self.fractions <= fraction + 1e-12)[0]
        return float(self.faithfulness[idx[-1]]) if idx.size else math.nan


def faithfulness_curve(
    ranked_nodes: Sequence[Node],
    metric_of: MetricFn,
    *,
    fractions: Sequence[float] = MIB_FRACTIONS,
    batched: bool = False,
    m_full: float | None = None,
    m_empty: float | None = None,
    universe: Sequence[Node] | None = None,
) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` fraction of ``ranked_nodes`` for each ``k`` in ``fractions``.

    Args:
        ranked_nodes: nodes ordered most important first. Without ``universe`` they *are* ``N`` (the caller
            ranked every node); with ``universe`` they may be any ranking (ranked nodes outside ``universe`` are
            dropped, duplicates after the first ignored).
        metric_of: see module docstring; called with the kept prefix of the ordered nodes (in rank order).
        fractions: strictly increasing fractions in [0, 1] (default MIB's 0.1%..100%).
        batched: call ``metric_of`` once with every node list.
        m_full, m_empty: precomputed ``m(N)`` / ``m(∅)`` (evaluated when omitted).
        universe: ``N``; the curve runs over all of it (ranked nodes first, the unranked rest appended in
            ``universe`` order), so the 100% point is ``m(N)`` and ``n_nodes = |N|``.

    Returns:
        :class:`FaithfulnessCurve` with CPR and CMD (needs >= 2 fractions).

    Raises:
        CurveInputError: duplicates, bad fractions. DegenerateMetricError: ``m(N) == m(∅)``.
    """
    if universe is not None:
        ranked_nodes = order_by_ranking(ranked_nodes, universe)
    nodes = _unique_list(ranked_nodes, "ranked_nodes")
    fr = _check_fractions(fractions)
    sizes = circuit_sizes(len(nodes), fr)
    ev = _Evaluator(metric_of, batched)
    n = len(nodes)
    known = {}
    if m_full is not None:
        known[n] = float(m_full)
    if m_empty is not None:
        known[0] = float(m_empty)
    need = sorted((set(int(s) for s in sizes) | {0, n}) - set(known))
    by_size = dict(zip(need, ev.many([nodes[:s] for s in need]).tolist()))
    by_size.update(known)
    mf, me = by_size[n], by_size[0]
    metric = np.array([by_size[int(s)] for s in sizes])
    f = np.asarray(faithfulness(metric, mf, me), dtype=float).reshape(-1)
    cpr = area_under_curve(fr, f) if fr.size >= 2 else math.nan
    cmd = area_from_one(fr, f) if fr.size >= 2 else math.nan
    return FaithfulnessCurve(fractions=fr, sizes=sizes, metric=metric, faithfulness=f, m_full=mf,
                             m_empty=me, cpr=cpr, cmd=cmd, n_nodes=len(nodes))


def order_by_ranking(ranked_nodes: Sequence[_N], universe: Sequence[_N]) -> list[_N]:
    """``universe`` reordered: the nodes of ``ranked_nodes`` that are in ``universe`` first (rank order, first
    occurrence), then the rest of ``universe`` in its own order. Length ``len(universe)``."""
    N = _unique_list(universe, "universe")
    Nset = set(N)
    seen: set[_N] = set()
    out: list[_N] = []
    for n in ranked_nodes:
        if n in Nset and n not in seen:
            seen.add(n)
            out.append(n)
    out += [n for n in N if n not in seen]
    return out


def circuit_faithfulness(
    circuit: Sequence[Node], metric_of: MetricFn, *, universe: Sequence[Node] | None = None,
    m_full: float | None = None, m_empty: float | None = None, batched: bool = False,
) -> float:
    """Faithfulness of one circuit; ``universe`` (or ``m_full``) defines ``N``."""
    if m_full is None and universe is None:
        raise CurveInputError("give either universe or m_full")
    ev = _Evaluator(metric_of, batched)
    mf, me = _references(ev, list(universe or []), m_full, m_empty)
    return float(faithfulness(ev.one(list(circuit)), mf, me))


# --------------------------------------------------------------------------------------------------
# completeness
# --------------------------------------------------------------------------------------------------


@dataclass
class CompletenessResult:
    """Incompleteness scores ``|m(C \\ K) - m(N \\ K)|`` for subsets ``K ⊆ C`` (Wang et al. 2023, §4).

    A complete circuit has every score near 0. ``*_normalized`` divide by ``|m(N) - m(∅)|``.

    Attributes:
        sampled_scores: ``[n_samples]`` scores for random ``K`` (each node of C kept in K w.p. ``p_include``).
        sampled_sizes: ``[n_samples]`` ``|K|``.
        greedy_subset: the greedily grown ``K`` (in the order nodes were added).
        greedy_scores: ``[len(greedy_subset)]`` score after each greedy addition.
        max_score: largest score seen (sampled or greedy).
    """

    sampled_scores: np.ndarray
    sampled_sizes: np.ndarray
    greedy_subset: list[Node]
    greedy_scores: np.ndarray
    max_score: float
    m_full: float
    m_empty: float
    sampled_scores_normalized: np.ndarray = field(default_factory=lambda: np.zeros(0))
    greedy_scores_normalized: np.ndarray = field(default_factory=lambda: np.zeros(0))
    max_score_normalized: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = v.tolist()
        d["greedy_subset"] = [str(n) if not isinstance(n, (str, int)) else n for n in self.greedy_subset]
        return d


def completeness(
    circuit: Sequence[Node],
    universe: Sequence[Node],
    metric_of: MetricFn,
    *,
    n_samples: int = 100,
    p_include: float = 0.5,
    greedy_steps: int | None = 5,
    batched: bool = False,
    seed: SeedLike = 0,
    m_full: float | None = None,
    m_empty: float | None = None,
) -> CompletenessResult:
    """Completeness of ``circuit`` inside ``universe`` (= N): ``|m(C \\ K) - m(N \\ K)|`` for ``K ⊆ C``.

    Random subsets: each circuit node joins ``K`` independently with probability ``p_include``.
    Greedy subset: starting from ``K = ∅``, repeatedly add the circuit node that maximises the score
    (``greedy_steps`` additions, at most ``|C|``; ``0``/``None`` skips the greedy search). Each greedy step
    evaluates ``2 * |C \\ K|`` node lists.

    Raises:
        CurveInputError: circuit nodes outside the universe, duplicates, bad parameters.
    """
    C = _unique_list(circuit, "circuit")
    N = _unique_list(universe, "universe")
    Nset = set(N)
    missing = [n for n in C if n not in Nset]
    if missing:
        raise CurveInputError(f"{len(missing)} circuit node(s) not in universe, e.g. {missing[0]!r}")
    if not 0.0 < p_include <= 1.0:
        raise CurveInputError(f"p_include must be in (0, 1], got {p_include}")
    if n_samples < 0:
        raise CurveInputError(f"n_samples must be >= 0, got {n_samples}")
    rng = as_generator(seed)
    ev = _Evaluator(metric_of, batched)
    mf, me = _references(ev, N, m_full, m_empty)

    def scores(subsets: list[set[Node]]) -> np.ndarray:
        lists: list[list[Node]] = []
        for K in subsets:
            lists.append([n for n in C if n not in K])
            lists.append([n for n in N if n not in K])
        v = ev.many(lists)
        return np.abs(v[0::2] - v[1::2])

    masks = rng.random((n_samples, len(C))) < p_include
    sampled_sets = [{C[j] for j in np.nonzero(row)[0]} for row in masks]
    sampled = scores(sampled_sets) if sampled_sets else np.zeros(0)

    greedy: list[Node] = []
    greedy_scores: list[float] = []
    steps = min(int(greedy_steps or 0), len(C))
    for _ in range(steps):
        cands = [n for n in C if n not in set(greedy)]
        sc = scores([set(greedy) | {c} for c in cands])
        best = int(np.argmax(sc))
        greedy.append(cands[best])
        greedy_scores.append(float(sc[best]))
    gs = np.asarray(greedy_scores, dtype=float)
    all_scores = np.concatenate([sampled, gs])
    mx = float(all_scores.max()) if all_scores.size else math.nan
    den = abs(mf - me)
    norm = (lambda a: a / den) if den > 1e-12 else (lambda a: np.full_like(np.asarray(a, dtype=float), np.nan))
    return CompletenessResult(
        sampled_scores=sampled, sampled_sizes=masks.sum(axis=1).astype(int), greedy_subset=greedy,
        greedy_scores=gs, max_score=mx, m_full=mf, m_empty=me,
        sampled_scores_normalized=norm(sampled), greedy_scores_normalized=norm(gs),
        max_score_normalized=float(norm(np.asarray(mx))) if np.isfinite(mx) else math.nan,
    )


# --------------------------------------------------------------------------------------------------
# minimality
# --------------------------------------------------------------------------------------------------


@dataclass
class MinimalityResult:
    """Marginal effect of each circuit node: ``effect[v] = m(C) - m(C \\ {v})``.

    ``relative[v] = effect[v] / (m(C) - m(∅))`` (share of the circuit's own effect; NaN if that is 0).
    ``redundant`` lists nodes with ``|relative| < threshold``.
    """

    nodes: list[Node]
    effects: np.ndarray
    relative: np.ndarray
    m_circuit: float
    m_empty: float
    threshold: float
    redundant: list[Node]

    def as_dict(self) -> dict[Node, float]:
        return {n: float(e) for n, e in zip(self.nodes, self.effects)}


def minimality(
    circuit: Sequence[Node],
    metric_of: MetricFn,
    *,
    threshold: float = 0.01,
    batched: bool = False,
    m_empty: float | None = None,
) -> MinimalityResult:
    """Marginal effect of removing each node from the circuit (``|C| + 1`` or ``|C| + 2`` evaluations).

    Args:
        circuit: ``[n_circuit]`` nodes.
        threshold: ``|relative effect|`` below which a node counts as redundant.
    """
    C = _unique_list(circuit, "circuit")
    if not C:
        raise CurveInputError("circuit is empty")
    ev = _Evaluator(metric_of, batched)
    lists = [C] + [[n for n in C if n != v] for v in C]
    if m_empty is None:
        lists.append([])
    vals = ev.many(lists)
    mc = float(vals[0])
    me = float(m_empty) if m_empty is not None else float(vals[-1])
    effects = mc - vals[1: 1 + len(C)]
    den = mc - me
    relative = effects / den if abs(den) > 1e-12 else np.full(len(C), np.nan)
    redundant = [n for n, r in zip(C, relative) if np.isfinite(r) and abs(r) < threshold]
    return MinimalityResult(nodes=C, effects=effects, relative=relative, m_circuit=mc, m_empty=me,
                            threshold=float(threshold), redundant=redundant)


# --------------------------------------------------------------------------------------------------
# random-circuit baseline
# --------------------------------------------------------------------------------------------------


@dataclass
class RandomBaselineResult:
    """Faithfulness of a circuit against random circuits drawn under a null (uniform, matched or top-``M``).

    Attributes:
        observed: ``f`` of the circuit.
        null_faithfulness: ``[n_samples]`` ``f`` of the random circuits.
        p_value: +1-corrected empirical p-value (``alternative`` direction); its resolution is
            ``1 / (n_samples + 1)``.
        z: z-score of ``observed`` against the null (``±inf`` when the null has no spread).
        circuit_size: ``|C|``; n_universe: ``|N|`` of the universe drawn from.
        null_zero_share: share of random circuits with ``|f| < ZERO_TOL`` (exact zeros: under corrupted-run
            ablation a random circuit without the subject embedding scores exactly 0; a null that is mostly
            zeros is not evidence).
        n_samples: number of random circuits.
        n_forced: nodes kept in every random circuit (the circuit's forced nodes).
        kind: ``"uniform"``, ``"matched"`` (stratified) or ``"top_m"``.
        n_possible: number of distinct random circuits the null can draw (``inf`` above 1e300); 1 means
            every draw is the circuit itself and the test cannot reject.
        null_identical_share: share of draws equal (as a set) to the circuit.
        min_p_attainable: smallest p-value this null can give.
    """

    observed: float
    null_faithfulness: np.ndarray
    p_value: float
    z: float
    circuit_size: int
    n_universe: int
    alternative: Alternative = "greater"
    null_zero_share: float = math.nan
    n_samples: int = 0
    n_forced: int = 0
    kind: str = "uniform"
    n_possible: float = math.inf
    null_identical_share: float = math.nan
    min_p_attainable: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)

    def to_outcome(self) -> TestOutcome:
        """As a :class:`~circuit_discovery.validation.stats.TestOutcome`: effect = observed f, null value =
        mean random f, CI = NaN (the observed f is a single number), ``n = 1`` (one circuit is tested; the
        random draws are resamples of the null, listed in ``details["n_samples"]``)."""
        q = np.quantile(self.null_faithfulness, [0.025, 0.5, 0.975]).tolist()
        return TestOutcome(
            statistic="faithfulness_vs_random_circuits", effect=self.observed, p_value=self.p_value,
            n=1, null_value=float(np.mean(self.null_faithfulness)),
            alternative=self.alternative,
            details={"z": self.z, "null_q025_q50_q975": q, "circuit_size": self.circuit_size,
                     "n_universe": self.n_universe, "n_samples": int(self.n_samples),
                     "null_zero_share": self.null_zero_share, "n_forced": self.n_forced, "kind": self.kind,
                     "n_possible": self.n_possible, "null_identical_share": self.null_identical_share,
                     "min_p_attainable": self.min_p_attainable, **self.details},
        )


def _n_possible(pools: list[tuple[list[Node], int]]) -> float:
    total = 1
    for pool, k in pools:
        total *= math.comb(len(pool), k)
        if total > 10 ** 300:
            return math.inf
    return float(total)


def _baseline_from_pools(
    C: list[Node], forced: list[Node], pools: list[tuple[list[Node], int]], metric_of: MetricFn, *,
    n_samples: int, batched: bool, seed: SeedLike, m_full: float | None, m_empty: float | None,
    reference_universe: list[Node], alternative: Alternative, kind: str, n_universe: int,
    details: dict[str, Any] | None = None,
) -> RandomBaselineResult:
    """Null circuits = ``forced`` + for each ``(pool, k)`` a uniform ``k``-subset of ``pool``."""
    if n_samples < 2:
        raise CurveInputError(f"n_samples must be >= 2 (>= 100 for a p-value resolution of 0.01), got {n_samples}")
    rng = as_generator(seed)
    ev = _Evaluator(metric_of, batched)
    mf, me = _references(ev, reference_universe, m_full, m_empty)
    draws: list[list[Node]] = []
    for _ in range(n_samples):
        nodes = list(forced)
        for pool, k in pools:
            if k:
                idx = np.sort(rng.choice(len(pool), size=k, replace=False))
                nodes += [pool[i] for i in idx]
        draws.append(nodes)
    vals = ev.many([C] + draws)
    f = np.asarray(faithfulness(vals, mf, me), dtype=float)
    obs, null = float(f[0]), f[1:]
    cset = frozenset(C)
    n_possible = _n_possible(pools)
    return RandomBaselineResult(
        observed=obs, null_faithfulness=null, p_value=empirical_p_value(obs, null, alternative=alternative),
        z=z_score(obs, null), circuit_size=len(C), n_universe=n_universe, alternative=alternative,
        null_zero_share=float(np.mean(np.abs(null) < ZERO_TOL)), n_samples=int(n_samples),
        n_forced=len(forced), kind=kind, n_possible=n_possible,
        null_identical_share=float(np.mean([frozenset(d) == cset for d in draws])),
        min_p_attainable=max(1.0 / (n_samples + 1), 1.0 / n_possible) if n_possible > 0 else 1.0,
        details=dict(details or {}),
    )


def _split_forced(C: list[Node], forced: Sequence[Node]) -> tuple[list[Node], list[Node]]:
    F = _unique_list(forced, "forced")
    Cset = set(C)
    extra = [n for n in F if n not in Cset]
    if extra:
        raise CurveInputError(f"{len(extra)} forced node(s) are not in the circuit, e.g. {extra[0]!r}: forced nodes "
                              "are the circuit's own nodes that every random circuit keeps")
    Fset = set(F)
    return F, [n for n in C if n not in Fset]


def random_circuit_baseline(
    circuit: Sequence[Node],
    universe: Sequence[Node],
    metric_of: MetricFn,
    *,
    n_samples: int = 100,
    forced: Sequence[Node] = (),
    stratum: Callable[[Any], Hashable] | None = None,  # called with the universe's nodes (e.g. str node ids)
    batched: bool = False,
    seed: SeedLike = 0,
    m_full: float | None = None,
    m_empty: float | None = None,
    alternative: Alternative = "greater",
) -> RandomBaselineResult:
    """Compare ``f(circuit)`` with ``f`` of ``n_samples`` random circuits.

    Every random circuit = ``forced`` (kept as is) + for each stratum ``s`` as many nodes as the circuit has
    outside ``forced`` in ``s``, drawn uniformly without replacement from the ``universe`` nodes of ``s``
    that are not forced. ``stratum=None`` is one stratum: without ``forced`` that is the plain uniform
    same-size draw (kept for comparison; a circuit that always holds the nodes a random one lacks beats it by
    construction, see the module docstring).

    Args:
        circuit: ``[k]`` nodes; those outside ``forced`` must be in ``universe``.
        universe: ``[n]`` the node set drawn from (e.g. the causally relevant nodes); ``m(N)`` is
            ``m(universe)`` unless ``m_full`` is given.
        n_samples: random circuits (>= 100 for a p-value resolution of 0.01).
        forced: nodes of the circuit kept in every random circuit (e.g. the embeddings a pruned circuit
            always keeps); they need not be in ``universe``.
        stratum: ``node -> hashable`` key (e.g. ``(component, layer, role)``) for matched draws.

    Returns:
        :class:`RandomBaselineResult` (``null_zero_share``, ``n_possible``, ``min_p_attainable`` say how
        informative the null is).
    """
    C = _unique_list(circuit, "circuit")
    N = _unique_list(universe, "universe")
    F, free = _split_forced(C, forced)
    Nset, Fset = set(N), set(F)
    outside = [n for n in free if n not in Nset]
    if outside:
        raise CurveInputError(f"every circuit node must be in the universe (or forced); {outside[0]!r} is not")
    key = stratum if stratum is not None else (lambda _n: None)
    pools_by: dict[Hashable, list[Node]] = {}
    for n in N:
        if n not in Fset:
            pools_by.setdefault(key(n), []).append(n)
    counts: dict[Hashable, int] = {}
    for n in free:
        counts[key(n)] = counts.get(key(n), 0) + 1
    pools = [(pools_by[s], counts[s]) for s in pools_by if counts.get(s)]
    kind = "uniform" if stratum is None else "matched"
    return _baseline_from_pools(
        C, F, pools, metric_of, n_samples=n_samples, batched=batched, seed=seed, m_full=m_full,
        m_empty=m_empty, reference_universe=N, alternative=alternative, kind=kind, n_universe=len(N),
        details={"n_strata": len(pools)},
    )


def topm_random_baseline(
    circuit: Sequence[Node],
    ranked_nodes: Sequence[Node],
    metric_of: MetricFn,
    *,
    m_factor: float = 2,
    n_samples: int = 100,
    forced: Sequence[Node] = (),
    universe: Sequence[Node] | None = None,
    batched: bool = False,
    seed: SeedLike = 0,
    m_full: float | None = None,
    m_empty: float | None = None,
    alternative: Alternative = "greater",
) -> RandomBaselineResult:
    """Stronger null: ``forced`` + random subsets, of the circuit's non-forced size, of the top-``M`` ranked
    nodes (forced nodes skipped), ``M = ceil(m_factor * |circuit|)``. It asks whether the circuit's selection
    beats a random pick among the candidates the ranking already favours.

    Args:
        ranked_nodes: ranking, most important first (duplicates after the first ignored).
        universe: ``N`` for ``m(N)`` when ``m_full`` is omitted (default: the ranked nodes and the circuit).
    """
    C = _unique_list(circuit, "circuit")
    F, free = _split_forced(C, forced)
    if not m_factor >= 1:
        raise CurveInputError(f"m_factor must be >= 1, got {m_factor}")
    Fset = set(F)
    ranked = [n for n in dict.fromkeys(ranked_nodes) if n not in Fset]
    M = int(math.ceil(round(m_factor * len(C), 9)))
    pool = ranked[:M]
    if len(pool) < len(free):
        raise CurveInputError(f"the ranking has {len(ranked)} non-forced node(s); the top-M null needs at least "
                              f"{len(free)} (the circuit's non-forced size): rank more nodes")
    ref = _unique_list(universe, "universe") if universe is not None else list(dict.fromkeys([*ranked, *C]))
    return _baseline_from_pools(
        C, F, [(pool, len(free))], metric_of, n_samples=n_samples, batched=batched, seed=seed, m_full=m_full,
        m_empty=m_empty, reference_universe=ref, alternative=alternative, kind="top_m", n_universe=len(pool),
        details={"m": len(pool), "m_factor": float(m_factor),
                 "circuit_in_top_m": int(sum(n in set(pool) for n in free))},
    )


# --------------------------------------------------------------------------------------------------
# faithfulness with a confidence interval over prompts
# --------------------------------------------------------------------------------------------------


def _prompt_arrays(mc: Any, mf: Any, me: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrs = [np.asarray(v, dtype=float).reshape(-1) for v in (mc, mf, me)]
    n = arrs[0].size
    if n < 1 or any(a.size != n for a in arrs):
        raise CurveInputError(f"m_circuit, m_full, m_empty must be per-prompt arrays of one length >= 1, got sizes "
                              f"{[a.size for a in arrs]}")
    if not all(np.all(np.isfinite(a)) for a in arrs):
        raise CurveInputError("per-prompt metrics contain NaN or infinite values")
    return arrs[0], arrs[1], arrs[2]


def ratio_of_means_bootstrap(
    mc: Any, mf: Any, me: Any, *, n_boot: int = 2000, seed: SeedLike = 0, confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI over prompts of ``mean(mc - me) / mean(mf - me)``.

    Prompts are resampled with replacement (``n_boot`` times) and the ratio of the resample's means is taken;
    resamples whose denominator is exactly 0 are dropped. Returns ``(nan, nan)`` for fewer than 2 prompts.

    Args:
        mc, mf, me: per-prompt ``m(C)``, ``m(N)``, ``m(∅)`` ``[n_prompts]``.
    """
    a, b, c = _prompt_arrays(mc, mf, me)
    if not 0.0 < confidence < 1.0:
        raise CurveInputError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_boot) < 10:
        raise CurveInputError(f"n_boot must be >= 10 (2000 recommended), got {n_boot}")
    n = a.size
    if n < 2:
        return (math.nan, math.nan)
    rng = as_generator(seed)
    num, den = a - c, b - c
    idx = rng.integers(0, n, size=(int(n_boot), n))
    bn, bd = num[idx].mean(1), den[idx].mean(1)
    ok = bd != 0.0
    if not np.any(ok):
        return (math.nan, math.nan)
    r = bn[ok] / bd[ok]
    lo, hi = np.quantile(r, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (float(lo), float(hi))


def faithfulness_ci(
    mc: Any, mf: Any, me: Any, *, n_boot: int = 2000, seed: SeedLike = 0, confidence: float = 0.95,
    min_gap: float = DEFAULT_MIN_GAP,
) -> dict[str, Any]:
    """Faithfulness (ratio of prompt means) with a percentile-bootstrap CI over prompts.

    Args:
        mc, mf, me: per-prompt ``m(C)``, ``m(N)``, ``m(∅)`` ``[n_prompts]``.
        min_gap: ``|mean(mf - me)|`` below it is degenerate (default :data:`DEFAULT_MIN_GAP` logits).

    Returns:
        ``{"faithfulness", "ci_low", "ci_high", "per_prompt", "n", "m_full", "m_empty", "gap", "min_gap",
        "degenerate", "confidence", "n_boot"}``. ``degenerate``: ``|gap| < min_gap``; then ``faithfulness``,
        ``ci_low`` and ``ci_high`` are ``None``. ``per_prompt[i]`` is prompt ``i``'s own ``f`` (``None`` where its
        own ``|m(N) - m(∅)| < min_gap``). The CI is ``None`` with fewer than 2 prompts.
    """
    a, b, c = _prompt_arrays(mc, mf, me)
    if not min_gap >= 0:
        raise CurveInputError(f"min_gap must be >= 0, got {min_gap}")
    gap = float(np.mean(b - c))
    degenerate = bool(abs(gap) < min_gap or gap == 0.0)
    per_prompt = [None if abs(fi - ei) < min_gap or fi == ei else float((ci - ei) / (fi - ei))
                  for ci, fi, ei in zip(a.tolist(), b.tolist(), c.tolist())]
    out: dict[str, Any] = {"faithfulness": None, "ci_low": None, "ci_high": None, "per_prompt": per_prompt,
                           "n": int(a.size), "m_full": float(np.mean(b)), "m_empty": float(np.mean(c)),
                           "gap": gap, "min_gap": float(min_gap), "degenerate": degenerate,
                           "confidence": float(confidence), "n_boot": int(n_boot)}
    if degenerate:
        return out
    out["faithfulness"] = float(np.mean(a - c) / gap)
    if a.size >= 2:
        lo, hi = ratio_of_means_bootstrap(a, b, c, n_boot=n_boot, seed=seed, confidence=confidence)
        if np.isfinite(lo) and np.isfinite(hi):
            out["ci_low"], out["ci_high"] = lo, hi
    return out
