"""Influence-based pruning of attribution graphs (the algorithm of circuit-tracer's ``prune_graph``).

1. Normalise: ``A_norm = |A| / rowsum(|A|)`` — each target's incoming effects become shares that
   sum to 1 (rows with no input stay 0).
2. Node influence: with ``w`` the ``[n]`` vector of logit probabilities (0 off the logit nodes),
   ``influence = w @ (A_norm + A_norm^2 + ...) = w @ ((I - A_norm)^-1 - I)`` — the probability-
   weighted sum, over every path from a node to a logit, of the product of normalised edge shares.
3. Keep the fewest nodes whose influence adds up to ``node_threshold`` of the total (plus every
   embedding and logit node; optional ``top_n`` / absolute ``min_node_influence`` limits).
4. Edge score on the node-pruned graph: ``A'_norm[t, s] * (influence'[t] + w[t])`` — the share of
   the target's (total) influence that flows through the edge. Keep the fewest edges covering
   ``edge_threshold`` of the total score (optional absolute ``min_edge_score``).
5. Repeatedly drop intermediate and error nodes with no kept outgoing edge and intermediate nodes
   with no kept incoming edge, and the edges touching them, until nothing changes.

The tensor-only steps 1, 2 and 4's edge score live in :mod:`circuit_discovery.graph.influence`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from circuit_discovery.graph.graph import AttributionGraph
from circuit_discovery.graph.influence import compute_edge_influence, compute_node_influence


def find_threshold(scores: torch.Tensor, threshold: float) -> float:
    """Smallest score ``s`` such that the scores ``>= s`` hold ``threshold`` of the positive total.

    Only positive scores count (so ``threshold=1.0`` keeps every positive score and no zero);
    returns ``inf`` when nothing is positive.
    """
    s = torch.as_tensor(scores).to(torch.float64).flatten()
    s = s[s > 0]
    if s.numel() == 0:
        return float("inf")
    ordered = torch.sort(s, descending=True).values.numpy()
    cum = np.cumsum(ordered) / ordered.sum()
    idx = int(np.searchsorted(cum, threshold - 1e-12, side="left"))
    return float(ordered[min(idx, len(ordered) - 1)])


def cumulative_scores(influence: torch.Tensor) -> torch.Tensor:
    """``[n]``: for each node, the share of total influence held by it and every node ranked above it
    (the ``influence`` field of circuit-tracer's Neuronpedia export; smaller = more important)."""
    infl = torch.as_tensor(influence).to(torch.float64)
    total = infl.sum()
    out = torch.zeros_like(infl)
    if total <= 0:
        return out
    order = torch.argsort(infl, descending=True, stable=True)
    out[order] = torch.cumsum(infl[order], 0) / total
    return out


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # [n] bool, nodes kept
    edge_mask: torch.Tensor  # [n, n] bool, edges kept (rows = targets)
    node_influence: torch.Tensor  # [n] influence in the full graph
    cumulative_scores: torch.Tensor  # [n] cumulative influence share (see cumulative_scores)
    edge_scores: torch.Tensor  # [n, n] edge scores on the node-pruned graph


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                top_n: int | None = None, min_node_influence: float | None = None,
                min_edge_score: float | None = None, keep_errors: bool = False) -> PruneResult:
    """Prune ``graph`` to the nodes and edges that carry most of the influence on its logits.

    Args:
        node_threshold: keep the fewest nodes holding this share of total node influence.
        edge_threshold: keep the fewest edges holding this share of total edge score.
        top_n: additionally keep at most this many nodes besides embeddings/logits (and errors
            when ``keep_errors``), the most influential.
        min_node_influence: additionally require ``influence >= min_node_influence``.
        min_edge_score: additionally require ``edge score >= min_edge_score``.
        keep_errors: always keep error nodes (circuit-tracer does not).

    All criteria are intersected. Embedding and logit nodes are always kept, and the node threshold's share is
    taken over the other nodes (circuit-tracer takes it over all nodes; then, when the embeddings hold much of the
    influence, a true carrier can fall below the cut: ``tests/unit/test_planted.py``).
    """
    _check_fraction("node_threshold", node_threshold)
    _check_fraction("edge_threshold", edge_threshold)
    if top_n is not None and (int(top_n) != top_n or top_n < 0):
        raise ValueError(f"top_n must be a non-negative integer, got {top_n}")

    w = graph.logit_weights()
    infl = compute_node_influence(graph.adjacency, w)
    always = graph.kind_mask("embedding", "logit", *(("error",) if keep_errors else ()))
    intermediate = graph.kind_mask("intermediate")
    need_out = graph.kind_mask("intermediate", "error") & ~always

    # the share is over the nodes pruning can drop: the always-kept embeddings' influence does not count, or a
    # carrier could fall below the threshold because the embeddings hold much of the total (planted-circuit test)
    node_mask = infl >= find_threshold(infl[~always], node_threshold) if bool((~always).any()) else always.clone()
    if top_n is not None:
        cand = (~always).nonzero().flatten()
        order = cand[torch.argsort(infl[cand], descending=True, stable=True)]
        allowed = torch.zeros_like(node_mask)
        allowed[order[: int(top_n)]] = True
        node_mask &= allowed
    if min_node_influence is not None:
        node_mask &= infl >= float(min_node_influence)
    node_mask |= always

    pruned = graph.adjacency.to(torch.float64).clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = compute_edge_influence(pruned, w)
    edge_mask = (edge_scores >= find_threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    if min_edge_score is not None:
        edge_mask &= edge_scores >= float(min_edge_score)

    while True:
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[need_out] &= edge_mask[:, need_out].any(0)
        node_mask[intermediate] &= edge_mask[intermediate].any(1)
        if torch.equal(old, node_mask):
            break
    return PruneResult(node_mask, edge_mask, infl, cumulative_scores(infl), edge_scores)
