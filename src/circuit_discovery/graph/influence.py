"""Graph influence on plain tensors: normalised adjacency, all-path node influence and edge scores.

The pure-tensor half of influence pruning (circuit-tracer keeps these free of graph classes too); the pruning
itself is :func:`circuit_discovery.graph.prune.prune_graph`. Adjacencies are ``[n, n]`` with rows as targets and
columns as sources.

1. Normalise: ``A_norm = |A| / rowsum(|A|)`` — each target's incoming effects become shares that
   sum to 1 (rows with no input stay 0).
2. Node influence: with ``w`` the ``[n]`` vector of logit probabilities (0 off the logit nodes),
   ``influence = w @ (A_norm + A_norm^2 + ...) = w @ ((I - A_norm)^-1 - I)`` — the probability-
   weighted sum, over every path from a node to a logit, of the product of normalised edge shares.
3. Edge score: ``A_norm[t, s] * (influence[t] + w[t])`` — the share of the target's (total) influence that flows
   through the edge.

This module imports no graph class, so :mod:`circuit_discovery.graph.graph` and
:mod:`circuit_discovery.graph.prune` can both import it.
"""
from __future__ import annotations

import torch

from circuit_discovery.errors import GraphError


def normalize_matrix(adjacency: torch.Tensor) -> torch.Tensor:
    """Row-normalised absolute adjacency: ``[n, n] -> [n, n]``, rows (targets) sum to 1 or are 0."""
    a = torch.as_tensor(adjacency).to(torch.float64).abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-300)


def compute_influence(a_norm: torch.Tensor, weights: torch.Tensor, method: str = "series",
                      max_iter: int | None = None) -> torch.Tensor:
    """Total (all-path) influence of every source on the weighted targets.

    Args:
        a_norm: ``[n, n]`` normalised adjacency (rows = targets).
        weights: ``[n]`` weight of each node as a target (logit probabilities).
        method: ``"series"`` sums ``w A + w A^2 + ...`` until it vanishes (exact for a DAG, where
            ``A`` is nilpotent); ``"solve"`` solves ``x (I - A) = w`` and returns ``x - w``.
        max_iter: series length limit (default ``n``); a DAG needs at most ``n - 1`` terms.

    Returns:
        ``[n]`` float64 influence ``w @ ((I - A)^-1 - I)``.

    Raises:
        GraphError: the series does not terminate (the graph has a cycle) or the solve fails.
    """
    a = torch.as_tensor(a_norm).to(torch.float64)
    w = torch.as_tensor(weights).to(torch.float64).reshape(-1)
    n = a.shape[0]
    if a.shape != (n, n) or w.shape != (n,):
        raise GraphError(f"shapes do not match: a_norm {tuple(a.shape)}, weights {tuple(w.shape)}")
    if method == "solve":
        eye = torch.eye(n, dtype=torch.float64)
        try:
            x = torch.linalg.solve((eye - a).T, w)
        except RuntimeError as exc:  # singular: a cycle of weight-1 shares
            raise GraphError(f"influence system is singular (the graph has a cycle): {exc}") from exc
        if not torch.isfinite(x).all():
            raise GraphError("influence diverged (the graph has a cycle)")
        return x - w
    if method != "series":
        raise ValueError(f"method must be 'series' or 'solve', got {method!r}")
    limit = n + 1 if max_iter is None else max_iter
    current = w @ a
    total = current.clone()
    for _ in range(limit):
        if not current.any():
            return total
        current = current @ a
        total += current
    if current.any():
        raise GraphError(f"influence series did not terminate after {limit} terms: the graph is not "
                         "acyclic; use method='solve' for graphs with damped cycles")
    return total


def compute_node_influence(adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[n]`` influence of each node on the weighted logits through all paths (normalised first)."""
    return compute_influence(normalize_matrix(adjacency), weights)


def compute_edge_influence(pruned_adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` edge scores ``A_norm[t, s] * (influence[t] + w[t])`` on a (node-pruned) adjacency."""
    a_norm = normalize_matrix(pruned_adjacency)
    w = torch.as_tensor(weights).to(torch.float64)
    target_total = compute_influence(a_norm, w) + w
    return a_norm * target_total[:, None]
