"""Null distributions used by the built-in hypotheses (pure numpy; nothing here touches a model).

* :func:`node_stratum` — the default stratum of a node id, ``(component, layer, role or position)``.
* :func:`stratified_overlap_null` — between- and within-relation Jaccard overlap of circuits under a null that
  redraws every circuit uniformly *within* its strata, keeping its per-stratum node counts (so the null circuits
  concentrate on the same tokens, layers and components as the observed ones; only node identity is random).
* :func:`label_permutation_overlap_null` — within-minus-between overlap when relation labels are permuted across
  the split-half circuits.
* :func:`poisson_binomial_sf` — ``P(sum of independent Bernoulli(q_i) >= t)``, exact.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from circuit_discovery.errors import InputError
from circuit_discovery.validation.ablation import parse_component_id

__all__ = [
    "node_stratum",
    "OverlapData",
    "jaccard_matrix",
    "overlap_data",
    "overlap_summary",
    "stratified_overlap_null",
    "label_permutation_overlap_null",
    "poisson_binomial_sf",
]


def node_stratum(node_id: str) -> tuple[str, int | str, Any]:
    """``(component, layer, role or position)`` of a node id, e.g. ``'head/L4/I2/last' -> ('head', 4, 'last')``.

    Heads of one layer at one token share a stratum; an MLP or embedding node is alone in its stratum. An id
    that is not a component id (e.g. ``'logit'``) is a stratum of its own, so a null never moves it.
    """
    try:
        comp, layer, _index, role, position = parse_component_id(node_id)
    except InputError:
        return ("node", str(node_id), None)
    return comp, layer, role if role is not None else position


class OverlapData:
    """Circuits of several relations as boolean masks over one node index.

    Attributes:
        nodes: the global node list (union of the relations' universes, first-seen order).
        rel_of: ``[H]`` relation index of each circuit (two per relation for split halves).
        relations: relation names, in input order.
        masks: ``[H, N]`` bool, circuit membership.
        universes: per relation, ``[N]`` bool membership of that relation's universe.
        pools: per circuit, a list of ``(pool_indices, count)``: the circuit's nodes per stratum.
    """

    def __init__(self, nodes: list[str], relations: list[str], rel_of: np.ndarray, masks: np.ndarray,
                 universes: np.ndarray, pools: list[list[tuple[np.ndarray, int]]]) -> None:
        self.nodes, self.relations, self.rel_of, self.masks = nodes, relations, rel_of, masks
        self.universes, self.pools = universes, pools


def overlap_data(
    circuits: Mapping[str, Sequence[Sequence[str]]],
    universes: Mapping[str, Sequence[str]],
    stratum: Callable[[str], Hashable] | None = None,
) -> OverlapData:
    """Index ``{relation: [circuit, ...]}`` (each circuit a collection of node ids) over the relations' universes.

    Raises :class:`InputError` when a circuit is empty or has nodes outside its relation's universe.
    """
    stratum = stratum or node_stratum
    relations = [str(r) for r in circuits]
    missing = [r for r in circuits if r not in universes]
    if missing:
        raise InputError(f"relation_universe lacks relation(s) {missing}; give every relation's relevant node ids")
    nodes = list(dict.fromkeys(str(n) for r in circuits for n in universes[r]))
    index = {n: i for i, n in enumerate(nodes)}
    strata = [stratum(n) for n in nodes]
    uni = np.zeros((len(relations), len(nodes)), dtype=bool)
    rel_of, masks, pools = [], [], []
    for ri, r in enumerate(circuits):
        u_idx = np.fromiter((index[str(n)] for n in universes[r]), dtype=np.int64)
        uni[ri, u_idx] = True
        by_stratum: dict[Hashable, list[int]] = {}
        for i in u_idx.tolist():
            by_stratum.setdefault(strata[i], []).append(i)
        for ci, circ in enumerate(circuits[r]):
            ids = list(dict.fromkeys(str(n) for n in circ))
            if not ids:
                raise InputError(f"circuit {ci} of relation {r!r} is empty; every circuit needs at least one node")
            outside = [n for n in ids if n not in index or not uni[ri, index[n]]]
            if outside:
                raise InputError(f"circuit {ci} of relation {r!r} has {len(outside)} node(s) outside the relation's "
                                 f"universe (e.g. {outside[0]!r}); pass the universe the circuit was chosen from")
            m = np.zeros(len(nodes), dtype=bool)
            m[[index[n] for n in ids]] = True
            counts: dict[Hashable, int] = {}
            for n in ids:
                s = strata[index[n]]
                counts[s] = counts.get(s, 0) + 1
            pools.append([(np.asarray(by_stratum[s], dtype=np.int64), c) for s, c in counts.items()])
            rel_of.append(ri)
            masks.append(m)
    return OverlapData(nodes, relations, np.asarray(rel_of), np.asarray(masks), uni, pools)


def jaccard_matrix(masks: np.ndarray) -> np.ndarray:
    """``[..., H, H]`` Jaccard indices of ``[..., H, N]`` masks (0 where both circuits are empty)."""
    m = masks.astype(np.float32)
    inter = m @ np.swapaxes(m, -1, -2)
    size = m.sum(axis=-1)
    union = size[..., :, None] + size[..., None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _pair_masks(rel_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    same = rel_of[:, None] == rel_of[None, :]
    upper = np.triu(np.ones(same.shape, dtype=bool), k=1)
    return same & upper, ~same & upper


def overlap_summary(masks: np.ndarray, rel_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(within, between)``: mean Jaccard of same-relation and of cross-relation circuit pairs.

    ``masks`` is ``[..., H, N]``; the results have the leading shape (``within`` is NaN without same-relation
    pairs).
    """
    j = jaccard_matrix(masks)
    within_pairs, between_pairs = _pair_masks(rel_of)
    within = j[..., within_pairs].mean(axis=-1) if within_pairs.any() else np.full(j.shape[:-2], np.nan)
    between = j[..., between_pairs].mean(axis=-1)
    return within, between


def stratified_overlap_null(data: OverlapData, n_draws: int, rng: np.random.Generator,
                            chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``(within [n_draws], between [n_draws])`` under the stratified null.

    Every circuit is redrawn independently: for each stratum it uses, the same number of nodes drawn uniformly
    without replacement from its relation's universe nodes in that stratum. Strata a circuit does not use stay
    empty, so a node the other relation cannot have contributes the same to the observed and the null overlap.
    """
    if n_draws < 1:
        raise InputError(f"n_draws must be >= 1, got {n_draws}")
    H, N = data.masks.shape
    within = np.empty(n_draws)
    between = np.empty(n_draws)
    for start in range(0, n_draws, chunk):
        k = min(chunk, n_draws - start)
        m = np.zeros((k, H, N), dtype=bool)
        rows = np.arange(k)[:, None]
        for h, pools in enumerate(data.pools):
            for pool, count in pools:
                if count == pool.size:
                    m[:, h, pool] = True
                else:
                    pick = np.argsort(rng.random((k, pool.size)), axis=1)[:, :count]
                    m[rows, h, pool[pick]] = True
        w, b = overlap_summary(m, data.rel_of)
        within[start:start + k] = w
        between[start:start + k] = b
    return within, between


def label_permutation_overlap_null(jmat: np.ndarray, n_per_relation: int, n_draws: int,
                                   rng: np.random.Generator) -> np.ndarray:
    """``within - between`` mean Jaccard ``[n_draws]`` when the circuits' relation labels are permuted.

    Args:
        jmat: ``[H, H]`` Jaccard matrix of the circuits (``H = n_relations * n_per_relation``).
        n_per_relation: circuits per relation (2 for split halves); a draw groups a random permutation of the
            circuits into consecutive blocks of this size.
    """
    H = jmat.shape[0]
    if H % n_per_relation:
        raise InputError(f"{H} circuits cannot be grouped into relations of {n_per_relation}")
    rel = np.repeat(np.arange(H // n_per_relation), n_per_relation)
    within_pairs, between_pairs = _pair_masks(rel)
    out = np.empty(n_draws)
    for i in range(n_draws):
        p = rng.permutation(H)
        jp = jmat[np.ix_(p, p)]
        out[i] = jp[within_pairs].mean() - jp[between_pairs].mean()
    return out


def poisson_binomial_sf(q: Sequence[float] | np.ndarray, t: int) -> float:
    """Exact ``P(T >= t)`` for ``T`` a sum of independent ``Bernoulli(q_i)``."""
    qa = np.clip(np.asarray(q, dtype=float).reshape(-1), 0.0, 1.0)
    pmf = np.zeros(qa.size + 1)
    pmf[0] = 1.0
    for i, qi in enumerate(qa):
        pmf[1:i + 2] = pmf[1:i + 2] * (1 - qi) + pmf[:i + 1] * qi
        pmf[0] *= 1 - qi
    if t <= 0:
        return 1.0
    return float(min(1.0, max(0.0, pmf[int(t):].sum())))
