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
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from scipy.integrate import trapezoid

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
    "CurveInputError",
    "DegenerateMetricError",
    "MetricFn",
    "faithfulness",
    "circuit_sizes",
    "area_under_curve",
    "area_from_one",
    "FaithfulnessCurve",
    "faithfulness_curve",
    "circuit_faithfulness",
    "CompletenessResult",
    "completeness",
    "MinimalityResult",
    "minimality",
    "RandomBaselineResult",
    "random_circuit_baseline",
]

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

Node = Hashable
#: ``metric_of(kept_nodes) -> float``, or with ``batched=True`` ``metric_of([kept_0, kept_1, ...]) -> [m_0, m_1, ...]``
MetricFn = Callable[[Any], Any]


class CurveInputError(ValueError):
    """Bad input to a curve / circuit-validation routine (duplicates, unknown nodes, bad fractions...)."""


class DegenerateMetricError(ZeroDivisionError):
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


def circuit_sizes(n_nodes: int, fractions: Sequence[float] = MIB_FRACTIONS) -> np.ndarray:
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


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    fr = np.asarray(fractions, dtype=float).reshape(-1)
    if fr.size < 1 or not np.all(np.isfinite(fr)) or np.any(fr < 0) or np.any(fr > 1):
        raise CurveInputError(f"fractions must be finite values in [0, 1], got {list(fractions)}")
    if np.any(np.diff(fr) <= 0):
        raise CurveInputError(f"fractions must be strictly increasing, got {list(fractions)}")
    return fr


def _check_curve(fractions: Sequence[float], f: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    fr = _check_fractions(fractions)
    fa = np.asarray(f, dtype=float).reshape(-1)
    if fa.shape != fr.shape:
        raise CurveInputError(f"{fr.size} fractions but {fa.size} faithfulness values")
    if fr.size < 2:
        raise CurveInputError("need at least two points to integrate a curve")
    return fr, fa


def area_under_curve(fractions: Sequence[float], f: Sequence[float]) -> float:
    """CPR: trapezoid area under the (signed, unclipped) faithfulness curve over the fraction axis."""
    fr, fa = _check_curve(fractions, f)
    return float(trapezoid(fa, fr))


def area_from_one(fractions: Sequence[float], f: Sequence[float]) -> float:
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


def _unique_list(nodes: Sequence[Node], name: str) -> list[Node]:
    out = list(nodes)
    seen: set[Node] = set()
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
) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` fraction of ``ranked_nodes`` for each ``k`` in ``fractions``.

    Args:
        ranked_nodes: the full node set ``N`` ordered most important first ``[n_nodes]``.
        metric_of: see module docstring; called with the kept prefix of ``ranked_nodes`` (in rank order).
        fractions: strictly increasing fractions in [0, 1] (default MIB's 0.1%..100%).
        batched: call ``metric_of`` once with every node list.
        m_full, m_empty: precomputed ``m(N)`` / ``m(∅)`` (evaluated when omitted).

    Returns:
        :class:`FaithfulnessCurve` with CPR and CMD (needs >= 2 fractions).

    Raises:
        CurveInputError: duplicates, bad fractions. DegenerateMetricError: ``m(N) == m(∅)``.
    """
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
    """Faithfulness of a circuit against random circuits of the same size from the same universe.

    ``null_faithfulness`` is ``[n_samples]``; ``p_value`` is the +1-corrected empirical p-value,
    ``z`` the z-score of the observed faithfulness against the null.
    """

    observed: float
    null_faithfulness: np.ndarray
    p_value: float
    z: float
    circuit_size: int
    n_universe: int
    alternative: Alternative = "greater"

    def to_outcome(self) -> TestOutcome:
        """As a :class:`~circuit_discovery.validation.stats.TestOutcome` (effect = observed f,
        null value = mean random f, CI = NaN: the observed f is a single number)."""
        q = np.quantile(self.null_faithfulness, [0.025, 0.5, 0.975]).tolist()
        return TestOutcome(
            statistic="faithfulness_vs_random_circuits", effect=self.observed, p_value=self.p_value,
            n=int(self.null_faithfulness.size), null_value=float(np.mean(self.null_faithfulness)),
            alternative=self.alternative,
            details={"z": self.z, "null_q025_q50_q975": q, "circuit_size": self.circuit_size,
                     "n_universe": self.n_universe},
        )


def random_circuit_baseline(
    circuit: Sequence[Node],
    universe: Sequence[Node],
    metric_of: MetricFn,
    *,
    n_samples: int = 100,
    batched: bool = False,
    seed: SeedLike = 0,
    m_full: float | None = None,
    m_empty: float | None = None,
    alternative: Alternative = "greater",
) -> RandomBaselineResult:
    """Compare ``f(circuit)`` with ``f`` of ``n_samples`` uniformly random same-size subsets of ``universe``.

    Args:
        circuit: ``[k]`` nodes, all in ``universe``.
        universe: ``[n]`` the full node set N.
        n_samples: random circuits (>= 100 recommended for a p-value resolution of 0.01).
    """
    C = _unique_list(circuit, "circuit")
    N = _unique_list(universe, "universe")
    Nset = set(N)
    if any(n not in Nset for n in C):
        raise CurveInputError("every circuit node must be in the universe")
    if n_samples < 2:
        raise CurveInputError(f"n_samples must be >= 2, got {n_samples}")
    rng = as_generator(seed)
    ev = _Evaluator(metric_of, batched)
    mf, me = _references(ev, N, m_full, m_empty)
    k = len(C)
    idx = [np.sort(rng.choice(len(N), size=k, replace=False)) for _ in range(n_samples)]
    vals = ev.many([C] + [[N[i] for i in row] for row in idx])
    f = np.asarray(faithfulness(vals, mf, me), dtype=float)
    obs, null = float(f[0]), f[1:]
    return RandomBaselineResult(
        observed=obs, null_faithfulness=null, p_value=empirical_p_value(obs, null, alternative=alternative),
        z=z_score(obs, null), circuit_size=k, n_universe=len(N), alternative=alternative,
    )
