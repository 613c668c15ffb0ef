"""Supernodes: automatic grouping of graph nodes that play one role.

Two nodes are close when their outgoing attribution profiles point the same way (the columns
``adjacency[:, i]``: the direct effect of node ``i`` on every target) and, when decoder directions
are given, when their decoder directions do. Only nodes at compatible positions are grouped:
the graph is split by position (or role) and each part is clustered on its own with
agglomerative clustering (``scipy.cluster.hierarchy``). Groups are labelled with the words most
common among their members' labels, and export as Neuronpedia ``qParams.supernodes``
(``[[label, node_id, ...], ...]``).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from circuit_discovery.graph.graph import AttributionGraph, GraphError

_STOPWORDS = frozenset([
    "a", "an", "the", "of", "in", "on", "at", "to", "for", "and", "or", "is", "are", "was", "be", "by", "with",
    "as", "from", "that", "this", "it", "its", "l", "f", "p", "feature", "features", "token", "tokens",
])


@dataclass
class Supernode:
    """A named group of graph node ids (ids of the :class:`AttributionGraph`, not Neuronpedia ids)."""

    label: str
    node_ids: list[str] = field(default_factory=list)

    def to_list(self) -> list[str]:
        """Neuronpedia form: ``[label, node_id, ...]``."""
        return [self.label, *self.node_ids]


def _cosine_matrix(x: np.ndarray) -> np.ndarray:
    """``[k, d] -> [k, k]`` cosine similarities; zero rows are similar to nothing (0)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def label_group(labels: Sequence[str], max_words: int = 3) -> str:
    """Label from the words most common among ``labels`` (each label counts a word once; stop words
    and pure numbers are skipped; ties keep first appearance). Words in at least half the labels are
    used, up to ``max_words``; at least the single most common word; ``"group"`` if none."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for lab in labels:
        words = [w for w in (t.strip("'_") for t in re.findall(r"[\w']+", lab.lower()))
                 if w and w not in _STOPWORDS and not re.fullmatch(r"[lfpnhi]\d+|\d+\w?", w)]
        for w in dict.fromkeys(words):
            counts[w] += 1
            first.setdefault(w, len(first))
    if not counts:
        return "group"
    ranked = sorted(counts, key=lambda w: (-counts[w], first[w]))
    chosen = [w for w in ranked if counts[w] * 2 >= len(labels)][:max_words] or ranked[:1]
    return " / ".join(chosen)


def node_distances(graph: AttributionGraph, indices: Sequence[int], decoder_directions: np.ndarray | None = None,
                   alpha: float = 0.5) -> np.ndarray:
    """``[k, k]`` distances between the nodes ``indices``.

    ``d = alpha * (1 - cos_decoder) + (1 - alpha) * (1 - cos_profile)`` with ``cos_profile`` the cosine
    of the outgoing columns ``adjacency[:, i]``; without decoder directions ``d = 1 - cos_profile``.
    ``decoder_directions``: ``[k, d_model]`` rows aligned with ``indices``. Values lie in ``[0, 2]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    idx = list(indices)
    profiles = graph.adjacency.to(torch.float64)[:, idx].T.numpy()  # [k, n]
    dist = 1.0 - _cosine_matrix(profiles)
    if decoder_directions is not None:
        dec = np.asarray(decoder_directions, dtype=np.float64)
        if dec.ndim != 2 or dec.shape[0] != len(idx):
            raise GraphError(f"decoder_directions must have shape [{len(idx)}, d_model], got {dec.shape}")
        dist = alpha * (1.0 - _cosine_matrix(dec)) + (1.0 - alpha) * dist
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    return np.clip(dist, 0.0, 2.0)


def find_supernodes(graph: AttributionGraph, node_ids: Sequence[str] | None = None,
                    decoder_directions: Mapping[str, Sequence[float]] | np.ndarray | torch.Tensor | None = None,
                    alpha: float = 0.5, distance_threshold: float = 0.3, method: str = "average",
                    group_by: str = "position", min_size: int = 2) -> list[Supernode]:
    """Group nodes of ``graph`` that play one role.

    Args:
        node_ids: candidates (default: every intermediate node — not embeddings, errors, logits).
        decoder_directions: optional decoder direction per candidate, as ``{node_id: [d_model]}`` or a
            ``[k, d_model]`` array aligned with ``node_ids``; a position group in which some candidate
            has none is clustered on attribution profiles alone.
        alpha: weight of decoder-direction distance vs. attribution-profile distance.
        distance_threshold: clusters are cut where the linkage distance exceeds this (in ``[0, 2]``).
        method: scipy linkage method (``average``, ``complete``, ``single``, ``weighted``).
        group_by: ``"position"`` (same ``ctx_idx``), ``"role"`` (same role) or ``"any"``: only nodes
            in the same group may share a supernode.
        min_size: smallest group reported.

    Returns:
        supernodes, largest first, members in graph order.
    """
    if group_by not in ("position", "role", "any"):
        raise ValueError(f"group_by must be 'position', 'role' or 'any', got {group_by!r}")
    if method not in ("average", "complete", "single", "weighted"):
        raise ValueError(f"unsupported linkage method {method!r}")
    if node_ids is None:
        cand = [i for i, nd in enumerate(graph.nodes) if nd.kind == "intermediate"]
    else:
        cand = [graph.index(i) for i in node_ids]
    dec_rows: dict[int, np.ndarray] = {}
    if decoder_directions is not None:
        if isinstance(decoder_directions, Mapping):
            dec_rows = {graph.index(k): np.asarray(v, dtype=np.float64) for k, v in decoder_directions.items()}
        else:
            arr = np.asarray(decoder_directions.detach().cpu() if isinstance(decoder_directions, torch.Tensor)
                             else decoder_directions, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[0] != len(cand):
                raise GraphError(f"decoder_directions must be [{len(cand)}, d_model], got {arr.shape}")
            dec_rows = dict(zip(cand, arr))

    def group_key(i: int):
        nd = graph.nodes[i]
        return None if group_by == "any" else (nd.node.position if group_by == "position" else nd.role)

    parts: dict[object, list[int]] = {}
    for i in cand:
        parts.setdefault(group_key(i), []).append(i)

    groups: list[list[int]] = []
    for members in parts.values():
        if len(members) < max(min_size, 2):
            continue
        with_dec = all(i in dec_rows for i in members)
        dec = np.stack([dec_rows[i] for i in members]) if with_dec and dec_rows else None
        dist = node_distances(graph, members, dec, alpha)
        z = linkage(squareform(dist, checks=False), method=method)
        assign = fcluster(z, t=distance_threshold, criterion="distance")
        for c in np.unique(assign):
            grp = [members[j] for j in np.flatnonzero(assign == c)]
            if len(grp) >= min_size:
                groups.append(sorted(grp))
    groups.sort(key=lambda g: (-len(g), g[0]))
    return [Supernode(label_group([graph.nodes[i].label for i in g]), [graph.nodes[i].id for i in g])
            for g in groups]


def supernodes_to_qparams(supernodes: Sequence[Supernode], id_map: Mapping[str, str] | None = None) -> list[list[str]]:
    """``[[label, node_id, ...], ...]``, node ids translated with ``id_map`` when given (members not in
    ``id_map`` are dropped, groups left empty are dropped)."""
    out = []
    for sn in supernodes:
        ids = sn.node_ids if id_map is None else [id_map[i] for i in sn.node_ids if i in id_map]
        if ids:
            out.append([sn.label, *ids])
    return out
