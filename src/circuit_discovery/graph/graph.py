"""Attribution graphs: nodes plus a dense matrix of direct effects.

Convention (circuit-tracer): ``adjacency[target, source]`` is the direct effect of ``source`` on
``target``; rows are targets, columns are sources. A graph has four kinds of node, decided by the
node's component:

=================  ==========================  ==============================================
kind               components                  role in pruning
=================  ==========================  ==============================================
``embedding``      ``embed``                   source; always kept
``error``          ``error``                   source (no incoming edges needed)
``logit``          ``logit``                   sink; carries the output weight; always kept
``intermediate``   everything else             needs an incoming and an outgoing edge
=================  ==========================  ==============================================
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch

from circuit_discovery.errors import GraphError
from circuit_discovery.graph.influence import compute_node_influence
from circuit_discovery.nodes import Node

#: Neuronpedia ``feature_type`` per component (the first four are the strings circuit-tracer writes).
FEATURE_TYPES = {
    "embed": "embedding",
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "logit": "logit",
    "head": "attention head",
    "neuron": "mlp neuron",
    "mlp_out": "mlp output",
    "attn_out": "attention output",
    "resid_pre": "residual stream",
    "resid_mid": "residual stream",
    "resid_post": "residual stream",
}

_KIND = {"embed": "embedding", "error": "error", "logit": "logit"}


def node_kind(node: Node) -> str:
    """``"embedding"``, ``"error"``, ``"logit"`` or ``"intermediate"`` (see module docstring)."""
    return _KIND.get(node.component, "intermediate")


def role_key(component: str, layer: int, role: str | None, index: int | None = None) -> str:
    """Identifier of a relation-level (role-keyed) node, e.g. ``mlp_out/L3/subject_last`` or
    ``head/L4/I2/last``; the role part is omitted when ``role`` is ``None``."""
    parts = [component, f"L{layer}"]
    if index is not None:
        parts.append(f"I{index}")
    if role is not None:
        parts.append(role)
    return "/".join(parts)


@dataclass
class NodeInfo:
    """One node of an :class:`AttributionGraph`.

    ``node`` gives the place in the model (its ``position`` is the graph's ``ctx_idx``). ``id``
    defaults to ``node.key`` (or :func:`role_key` when ``role`` is set and the node has no position).
    ``token_id`` is the input token of an ``embed`` node or the output token of a ``logit`` node
    (defaults to ``node.index`` for logits). ``score`` is an optional external attribution score
    (e.g. from attribution patching); when absent, consumers use the graph influence.
    """

    node: Node
    label: str = ""
    activation: float | None = None
    influence: float | None = None
    score: float | None = None
    role: str | None = None
    token: str | None = None
    token_id: int | None = None
    feature_type: str | None = None
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.node, Node):
            raise TypeError(f"NodeInfo.node must be a Node, got {type(self.node).__name__}")
        if not self.id:
            if self.role is not None and self.node.position is None:
                self.id = role_key(self.node.component, self.node.layer, self.role, self.node.index)
            else:
                self.id = self.node.key
        if self.feature_type is None:
            self.feature_type = FEATURE_TYPES.get(self.node.component, self.node.component)
        if self.token_id is None and self.node.component == "logit":
            self.token_id = self.node.index

    @property
    def kind(self) -> str:
        return node_kind(self.node)

    @property
    def ctx_idx(self) -> int | None:
        return self.node.position


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    elif isinstance(x, (np.ndarray, list, tuple)):
        t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    return t


@dataclass(eq=False)
class AttributionGraph:
    """A per-prompt (or combined) attribution graph.

    Attributes:
        nodes: the ``n`` nodes, in matrix order.
        adjacency: ``[n, n]`` float tensor; ``adjacency[target, source]`` = direct effect of source on
            target (numpy input is converted).
        logit_indices: indices into ``nodes`` of the output (logit) nodes, best first.
        logit_probabilities: ``[n_logits]`` weights of those logit nodes (probabilities).
        prompt, prompt_tokens, prompt_token_ids: the attributed prompt (``prompt_token_ids`` is needed
            for Neuronpedia embedding ids when nodes carry no ``token_id``).
        n_layers: number of model layers (Neuronpedia places logits at layer ``n_layers + 1``).
        metadata: free-form JSON-serialisable information (model name, method, ...).
    """

    nodes: list[NodeInfo]
    adjacency: torch.Tensor
    logit_indices: list[int]
    logit_probabilities: torch.Tensor
    prompt: str = ""
    prompt_tokens: list[str] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    n_layers: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes = list(self.nodes)
        self.adjacency = _as_tensor(self.adjacency, "adjacency")
        n = len(self.nodes)
        if self.adjacency.shape != (n, n):
            raise GraphError(f"adjacency has shape {tuple(self.adjacency.shape)}, expected ({n}, {n}) for {n} nodes")
        if not torch.isfinite(self.adjacency).all():
            raise GraphError("adjacency contains NaN or infinite entries")
        ids = [nd.id for nd in self.nodes]
        if len(set(ids)) != n:
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise GraphError(f"node ids are not unique: {dup[:5]}")
        self.logit_indices = [int(i) for i in self.logit_indices]
        self.logit_probabilities = _as_tensor(self.logit_probabilities, "logit_probabilities").reshape(-1)
        if len(self.logit_indices) != self.logit_probabilities.numel():
            raise GraphError(f"{len(self.logit_indices)} logit indices but "
                             f"{self.logit_probabilities.numel()} logit probabilities")
        if not self.logit_indices:
            raise GraphError("a graph needs at least one logit node")
        for i in self.logit_indices:
            if not 0 <= i < n:
                raise GraphError(f"logit index {i} out of range for {n} nodes")
            if self.nodes[i].kind != "logit":
                raise GraphError(f"node {self.nodes[i].id!r} at logit index {i} is not a logit node")
        if (self.logit_probabilities < 0).any() or not torch.isfinite(self.logit_probabilities).all():
            raise GraphError("logit probabilities must be finite and non-negative")
        self._index = {nid: i for i, nid in enumerate(ids)}

    # ----------------------------------------------------------------- access
    @property
    def A(self) -> torch.Tensor:
        """Alias of ``adjacency`` (``[n, n]``, rows = targets)."""
        return self.adjacency

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def node_ids(self) -> list[str]:
        return [nd.id for nd in self.nodes]

    def index(self, node_id: str) -> int:
        try:
            return self._index[node_id]
        except KeyError:
            raise KeyError(f"no node {node_id!r} in the graph") from None

    def kind_mask(self, *kinds: str) -> torch.Tensor:
        """Boolean ``[n]`` mask of nodes whose :func:`node_kind` is one of ``kinds``."""
        return torch.tensor([nd.kind in kinds for nd in self.nodes], dtype=torch.bool)

    def logit_weights(self) -> torch.Tensor:
        """``[n]`` float64 vector: the logit probabilities at the logit nodes, 0 elsewhere."""
        w = torch.zeros(self.n_nodes, dtype=torch.float64)
        w[self.logit_indices] = self.logit_probabilities.to(torch.float64)
        return w

    # ---------------------------------------------------------- construction
    @classmethod
    def from_edges(cls, nodes: Sequence[NodeInfo], edges: Iterable[tuple[str, str, float]],
                   logit_probabilities: dict[str, float] | None = None, **kwargs: Any) -> AttributionGraph:
        """Build a graph from ``(source_id, target_id, weight)`` triples.

        ``logit_probabilities`` maps logit node ids to weights; by default every logit node gets
        weight ``1 / n_logits``.
        """
        nodes = list(nodes)
        index = {nd.id: i for i, nd in enumerate(nodes)}
        adj = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
        for s, t, w in edges:
            if s not in index or t not in index:
                raise GraphError(f"edge {s!r} -> {t!r} names a node that is not in the graph")
            adj[index[t], index[s]] += float(w)
        if logit_probabilities is None:
            logit_ids = [nd.id for nd in nodes if nd.kind == "logit"]
            logit_probabilities = {i: 1.0 / max(len(logit_ids), 1) for i in logit_ids}
        for lid in logit_probabilities:
            if lid not in index:
                raise GraphError(f"logit {lid!r} is not a node of the graph")
        return cls(nodes=nodes, adjacency=adj, logit_indices=[index[i] for i in logit_probabilities],
                   logit_probabilities=torch.tensor(list(logit_probabilities.values()), dtype=torch.float64),
                   **kwargs)

    # ----------------------------------------------------------- operations
    def influence(self) -> torch.Tensor:
        """``[n]`` indirect influence of every node on the logits (see :func:`influence.compute_node_influence`)."""
        return compute_node_influence(self.adjacency, self.logit_weights())

    def subgraph(self, node_mask: torch.Tensor, edge_mask: torch.Tensor | None = None) -> AttributionGraph:
        """A new graph with only the nodes in ``node_mask`` (``[n]`` bool) and, when given, only the
        edges in ``edge_mask`` (``[n, n]`` bool). Logit nodes must all be kept."""
        node_mask = torch.as_tensor(node_mask, dtype=torch.bool)
        if node_mask.shape != (self.n_nodes,):
            raise GraphError(f"node_mask has shape {tuple(node_mask.shape)}, expected ({self.n_nodes},)")
        if not node_mask[self.logit_indices].all():
            raise GraphError("subgraph must keep every logit node")
        adj = self.adjacency.clone()
        if edge_mask is not None:
            adj = adj * torch.as_tensor(edge_mask, dtype=torch.bool)
        keep = node_mask.nonzero().flatten()
        new_pos = {int(old): new for new, old in enumerate(keep.tolist())}
        return AttributionGraph(
            nodes=[self.nodes[i] for i in keep.tolist()], adjacency=adj[keep][:, keep],
            logit_indices=[new_pos[i] for i in self.logit_indices],
            logit_probabilities=self.logit_probabilities.clone(), prompt=self.prompt,
            prompt_tokens=list(self.prompt_tokens),
            prompt_token_ids=None if self.prompt_token_ids is None else list(self.prompt_token_ids),
            n_layers=self.n_layers, metadata=dict(self.metadata))

    def to_networkx(self, edge_mask: torch.Tensor | None = None) -> nx.DiGraph:
        """DiGraph over node ids with node attributes (component, layer, position, index, role, label,
        activation, influence, score, feature_type, kind) and edge attribute ``weight`` (the direct
        effect source -> target), for every non-zero entry (restricted to ``edge_mask`` if given)."""
        g = nx.DiGraph()
        for nd in self.nodes:
            g.add_node(nd.id, component=nd.node.component, layer=nd.node.layer, position=nd.node.position,
                       index=nd.node.index, role=nd.role, label=nd.label, activation=nd.activation,
                       influence=nd.influence, score=nd.score, feature_type=nd.feature_type, kind=nd.kind)
        mask = self.adjacency != 0
        if edge_mask is not None:
            mask &= torch.as_tensor(edge_mask, dtype=torch.bool)
        tgt, src = mask.nonzero(as_tuple=True)
        ids = self.node_ids
        for t, s, w in zip(tgt.tolist(), src.tolist(), self.adjacency[tgt, src].tolist()):
            g.add_edge(ids[s], ids[t], weight=float(w))
        return g
