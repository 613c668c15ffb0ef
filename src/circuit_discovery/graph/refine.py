"""Circuit search by exact ablation: greedy refinement of a ranked node list.

Attribution rankings (EAP, EAP-IG) are first-order estimates of each node's effect *alone, from the full model*;
a circuit is judged by what happens when *everything else* is ablated, where nodes interact. Greedy refinement
closes that gap with the judge itself:

* start from ``forced`` nodes (e.g. the embeddings the circuit always keeps), or nothing;
* each round, evaluate ``m(C + {v})`` exactly (the circuit evaluator's ablation, every node outside ``C + {v}``
  ablated) for every candidate ``v`` of a *pool*: the ``pool`` best-ranked nodes not yet taken (a window that
  slides down the base ranking as nodes are taken); all candidates of a round are one batched call of
  ``metric_of``;
* add the ``k`` candidates with the highest faithfulness (or, ``objective="distance"``, the smallest ``|1 - f|``):
  ``k = 1`` at first, then ``max(1, floor(growth x |C|))`` so large budgets take few rounds; stop at the size
  ``budget``;
* optionally prune: evaluate ``C - {v}`` for every non-forced ``v``; drop the node whose removal costs least if
  the circuit without it is at least as faithful (``>= f(C) - prune_tol``), ban it, refill, repeat.

The result's :attr:`RefineResult.order` is a full ranking (forced nodes, the picks in pick order, then the rest of
the base ranking), so it goes straight into faithfulness curves (``CircuitEvaluator.curve`` /
``faithfulness_at``). Its faithfulness on the *discovery* prompts is in-sample by construction: judge it on
held-out prompts (``benchmarks/circuit_search.py``).

Cost: ``sum over rounds of (pool + 1)`` evaluations, each one forward row per prompt.

Model-free: the model is reached only through ``metric_of`` / the evaluator passed in. The exact-patching ranking
(each node ablated alone, which runs the model) is
:func:`circuit_discovery.validation.exact_ranking.exact_patching_ranking`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from circuit_discovery.errors import InputError

__all__ = ["RefineResult", "greedy_refine", "refine_circuit"]


@dataclass
class RefineResult:
    """Greedy refinement result.

    ``nodes``: the circuit at the end (forced nodes first, then picks in pick order); ``order``: full ranking
    (``nodes``, then the unpicked nodes in base-ranking order, then the rest of the universe); ``sizes`` /
    ``faithfulness``: the circuit's size and discovery faithfulness after each round; ``pruned``: nodes removed
    by pruning (banned from re-entry); ``n_evaluations``: node sets evaluated; ``m_full``/``m_empty``: the
    references used.
    """

    nodes: list[str]
    order: list[str]
    sizes: list[int]
    faithfulness: list[float]
    n_evaluations: int
    m_full: float
    m_empty: float
    pruned: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)

    @property
    def final_faithfulness(self) -> float:
        return self.faithfulness[-1] if self.faithfulness else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "order": list(self.order), "sizes": list(self.sizes),
                "faithfulness": [float(x) for x in self.faithfulness], "n_evaluations": self.n_evaluations,
                "m_full": self.m_full, "m_empty": self.m_empty, "pruned": list(self.pruned),
                "forced": list(self.forced)}


def _unique(xs) -> list:
    return list(dict.fromkeys(xs))


def greedy_refine(metric_of: Callable[[list[list[str]]], Sequence[float]], ranked: Sequence[str], *, budget: int,
                  universe: Sequence[str] | None = None, forced: Sequence[str] = (), pool: int = 24,
                  growth: float = 0.25, prune: bool = False, prune_tol: float = 0.0, max_rounds_prune: int = 10,
                  m_full: float | None = None, m_empty: float | None = None,
                  max_evaluations: int | None = None, objective: str = "f") -> RefineResult:
    """Greedy forward selection of a circuit by exact faithfulness (see the module docstring).

    Args:
        metric_of: batched metric, ``[node list, ...] -> [m, ...]`` (e.g. ``CircuitEvaluator.metric_of``).
        ranked: base ranking, best first; only nodes of ``universe`` are candidates (all of ``ranked`` if None).
            Universe nodes missing from ``ranked`` are appended (in universe order) as the last candidates.
        budget: circuit size to stop at (forced nodes included).
        universe: the node set ``N`` (``m_full = m(N)`` when not given); use the evaluator's relevant universe.
        forced: nodes in the circuit from the start (kept even if outside ``universe``), never pruned.
        pool: candidates per round (the best-ranked ``pool`` nodes not yet taken).
        growth: nodes added per round = ``max(1, floor(growth x |picks|))``; 0 means one per round.
        prune: after reaching the budget, remove nodes whose removal does not lower f (see module docstring).
        m_full, m_empty: references ``m(N)``, ``m(∅)`` (evaluated when omitted, in the first batch).
        max_evaluations: stop early (with the circuit so far) before a round would exceed this many evaluations.
        objective: ``"f"`` (maximise faithfulness, as CPR rewards) or ``"distance"`` (minimise ``|1 - f|``, as CMD
            does: a node that overshoots f = 1 is not preferred).

    Raises:
        InputError: bad budget/pool/growth, or ``m(N) == m(∅)`` (faithfulness undefined).
    """
    if int(budget) < 1:
        raise InputError(f"budget must be >= 1 node, got {budget}")
    if int(pool) < 1:
        raise InputError(f"pool must be >= 1 candidate per round, got {pool}")
    if not 0 <= float(growth) < 10:
        raise InputError(f"growth must be in [0, 10), got {growth}")
    if objective not in ("f", "distance"):
        raise InputError(f"objective must be 'f' or 'distance', got {objective!r}")
    score = (lambda f: f) if objective == "f" else (lambda f: -abs(1.0 - f))
    budget, pool = int(budget), int(pool)
    ranked = _unique(ranked)
    forced = _unique(forced)
    if universe is None:
        universe = ranked
    universe = _unique(universe)
    in_u = set(universe)
    fset = set(forced)
    candidates = [n for n in ranked if n in in_u and n not in fset]
    seen = set(candidates)
    candidates += [n for n in universe if n not in seen and n not in fset]
    n_eval = 0

    def evaluate(sets: list[list[str]]) -> list[float]:
        nonlocal n_eval
        n_eval += len(sets)
        out = [float(x) for x in metric_of(sets)]
        if len(out) != len(sets):
            raise InputError(f"metric_of returned {len(out)} values for {len(sets)} node sets")
        return out

    refs = []
    if m_full is None:
        refs.append(list(universe))
    if m_empty is None:
        refs.append([])
    C = list(forced)
    first = evaluate(refs + [list(C)]) if refs else None
    if first is not None:
        it = iter(first)
        m_full = next(it) if m_full is None else m_full
        m_empty = next(it) if m_empty is None else m_empty
        m_c = next(it)
    else:
        m_c = evaluate([list(C)])[0]
    assert m_full is not None and m_empty is not None  # given, or evaluated in the first batch
    m_full, m_empty = float(m_full), float(m_empty)
    gap = m_full - m_empty
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        raise InputError(f"m(N) = {m_full:.6g} and m(∅) = {m_empty:.6g} coincide: faithfulness is undefined on these "
                         "prompts, so there is nothing to refine (check the pairs' corruption)")

    def f_of(m: float) -> float:
        return (m - m_empty) / gap

    sizes, faith = [len(C)], [f_of(m_c)]
    remaining = list(candidates)

    def budget_left() -> bool:
        return max_evaluations is None or n_eval < max_evaluations

    def add_rounds() -> None:
        nonlocal remaining
        while len(C) < budget and remaining:
            cand = remaining[:pool]
            if max_evaluations is not None and n_eval + len(cand) > max_evaluations:
                return
            ms = evaluate([C + [v] for v in cand])
            fs = [f_of(m) for m in ms]
            n_picks = len(C) - len(forced)
            k = 1 if growth == 0 else max(1, int(growth * n_picks))
            k = min(k, budget - len(C), len(cand))
            best = sorted(range(len(cand)), key=lambda i: (-score(fs[i]), i))[:k]
            picks = [cand[i] for i in best]
            C.extend(picks)
            taken = set(picks)
            remaining = [n for n in remaining if n not in taken]
            if k == 1:
                sizes.append(len(C))
                faith.append(fs[best[0]])
            else:  # the joint effect of k picks is not known yet: measure it (one more evaluation)
                sizes.append(len(C))
                faith.append(f_of(evaluate([list(C)])[0]))

    add_rounds()
    pruned: list[str] = []
    if prune:
        for _ in range(int(max_rounds_prune)):
            free = [v for v in C if v not in fset]
            if not free or not budget_left():
                break
            if max_evaluations is not None and n_eval + len(free) > max_evaluations:
                break
            fs = [f_of(m) for m in evaluate([[u for u in C if u != v] for v in free])]
            i = max(range(len(free)), key=lambda j: (score(fs[j]), -j))
            if score(fs[i]) < score(faith[-1]) - prune_tol:
                break
            v = free[i]
            C.remove(v)  # v is neither in C nor among the remaining candidates any more: it cannot come back
            pruned.append(v)
            sizes.append(len(C))
            faith.append(fs[i])
            add_rounds()
    order = _unique(list(C) + [n for n in candidates if n not in set(C) and n not in set(pruned)] + pruned)
    return RefineResult(nodes=list(C), order=order, sizes=sizes, faithfulness=faith, n_evaluations=n_eval,
                        m_full=m_full, m_empty=m_empty, pruned=pruned, forced=list(forced))


def refine_circuit(evaluator, ranked: Sequence[str], *, budget: int | None = None, budget_fraction: float = 0.1,
                   forced: Sequence[str] | None = None, **kwargs: Any) -> RefineResult:
    """:func:`greedy_refine` with a circuit evaluator (``CircuitEvaluator`` or any ``EvaluatorMethods``).

    The universe is the evaluator's ``relevant_universe`` (inert nodes excluded) where it has one, else its
    ``universe``; ``budget`` defaults to ``ceil(budget_fraction x |universe|)``; ``forced`` defaults to none
    (pass e.g. the embedding nodes to keep them). References ``m(N)``/``m(∅)`` are the evaluator's.
    """
    universe = list(evaluator.relevant_universe) if hasattr(evaluator, "relevant_universe") else \
        list(evaluator.universe)
    if not universe:
        raise InputError("the evaluator's universe is empty (every node inert): nothing to refine")
    if budget is None:
        if not 0 < budget_fraction <= 1:
            raise InputError(f"budget_fraction must be in (0, 1], got {budget_fraction}")
        budget = max(1, math.ceil(budget_fraction * len(universe)))
    ranked = evaluator._components_only(list(ranked))
    forced = evaluator._components_only(list(forced or []))
    if "m_full" not in kwargs or "m_empty" not in kwargs:
        mf, me = evaluator.metric_of([evaluator.universe, []])
        kwargs.setdefault("m_full", mf)
        kwargs.setdefault("m_empty", me)
    return greedy_refine(evaluator.metric_of, ranked, budget=budget, universe=universe, forced=forced, **kwargs)

