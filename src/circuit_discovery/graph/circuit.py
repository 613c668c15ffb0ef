"""``Circuit``: the pruned, labelled result of attribution for one prompt or one relation.

Serialises to the ``circuits.json`` format of ``docs/ARCHITECTURE.md``. Relation-level circuits
key their nodes by (component, layer, role, index), with ids from :func:`graph.role_key`
(``mlp_out/L3/subject_last``); per-prompt circuits use ``Node.key`` (``mlp_out/L3/P4``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import networkx as nx
import torch

from circuit_discovery.graph.graph import AttributionGraph, GraphError, NodeInfo, role_key
from circuit_discovery.graph.prune import PruneResult, prune_graph
from circuit_discovery.io import atomic_write_json, read_json
from circuit_discovery.nodes import Node


@dataclass
class CircuitNode:
    """One node of a circuit (a row of ``circuits.json`` ``nodes``)."""

    id: str
    component: str
    layer: int
    role: str | None = None
    position: int | None = None
    index: int | None = None
    label: str = ""
    score: float | None = None
    activation: float | None = None
    influence: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CircuitNode:
        known = {f.name for f in fields(cls)}
        missing = {"id", "component", "layer"} - set(d)
        if missing:
            raise ValueError(f"circuit node {dict(d)!r} lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CircuitEdge:
    """A directed edge ``source -> target`` with the (averaged) direct effect ``weight``."""

    source: str
    target: str
    weight: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CircuitEdge:
        try:
            return cls(str(d["source"]), str(d["target"]), float(d["weight"]))
        except KeyError as exc:
            raise ValueError(f"circuit edge {dict(d)!r} lacks {exc}") from None


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass
class CircuitValidation:
    """The headline validation of a circuit (the ``validation`` object of a ``circuits.json`` circuit): a subset
    of the circuit's ``metrics.json`` entry, which has every number.

    ``faithfulness``: in-sample (discovery facts); ``held_out_faithfulness`` and its bootstrap ``held_out_ci``: on
    the held-out facts (``None`` without held-out facts or where the metric gap is degenerate); ``node_share``,
    ``cpr``, ``random_baseline_p``: held out. ``kind`` (``"component"`` or ``"feature"``) chooses the keys
    written: feature circuits add ``held_out_faithfulness_live`` (live error nodes), ``not_validated_reason`` and
    ``dictionary_quality`` (whether the transcoders meet the quality bar; a feature circuit on dictionaries below it
    is not validated).
    """

    kind: str = "component"
    faithfulness: float | None = None
    held_out_faithfulness: float | None = None
    held_out_ci: list | None = None
    held_out_faithfulness_live: float | None = None
    node_share: float | None = None
    cpr: float | None = None
    random_baseline_p: float | None = None
    validated: bool | None = None
    not_validated_reason: str | None = None
    dictionary_quality: dict | None = None
    ablation: str | None = None

    #: the keys written per kind, in ``circuits.json`` order
    KEYS = {"component": ("faithfulness", "held_out_faithfulness", "held_out_ci", "node_share", "cpr",
                          "random_baseline_p", "validated", "ablation"),
            "feature": ("faithfulness", "held_out_faithfulness", "held_out_ci", "held_out_faithfulness_live",
                        "node_share", "cpr", "random_baseline_p", "validated", "not_validated_reason",
                        "dictionary_quality", "ablation")}

    def __post_init__(self) -> None:
        if self.kind not in self.KEYS:
            raise GraphError(f"circuit validation kind must be one of {', '.join(self.KEYS)}, got {self.kind!r}")

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], kind: str = "component") -> CircuitValidation:
        """The validation of a circuit from its ``metrics.json`` entry (the keys of ``kind``; others are ignored)."""
        if kind not in cls.KEYS:
            raise GraphError(f"circuit validation kind must be one of {', '.join(cls.KEYS)}, got {kind!r}")
        return cls(kind=kind, **{k: metrics.get(k) for k in cls.KEYS[kind]})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CircuitValidation:
        """Inverse of :meth:`to_dict` (a feature circuit's validation has ``held_out_faithfulness_live``)."""
        return cls.from_metrics(d, "feature" if "held_out_faithfulness_live" in d else "component")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS[self.kind]}


@dataclass
class Circuit:
    """A circuit for one relation (or one prompt).

    Attributes:
        attribution_score: share of the attribution mass the circuit's nodes hold:
            ``sum |score of kept nodes| / sum |score of all nodes|`` (node scores before pruning, logit nodes
            excluded; in [0, 1]; ``None`` when unknown). Its causal counterpart is ``faithfulness``.
        faithfulness: metric recovered by the circuit alone, ``None`` until validation ran.
        facts: the facts (``{"prompt": ..., "answer": ...}``) the circuit was built from.
        n_facts: defaults to ``len(facts)``.
        extra: further top-level keys of the circuit's JSON object (``prompt_tokens``, ``graphs``,
            anything else), written back unchanged.
        validation: the headline validation (:class:`CircuitValidation`), ``None`` until validation ran; set it
            with :func:`attach_validation`, which also sets ``faithfulness``.
    """

    name: str
    relation: str | None = None
    nodes: list[CircuitNode] = field(default_factory=list)
    edges: list[CircuitEdge] = field(default_factory=list)
    attribution_score: float | None = None
    faithfulness: float | None = None
    facts: list[dict[str, Any]] = field(default_factory=list)
    n_facts: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    validation: CircuitValidation | None = None

    def __post_init__(self) -> None:
        if self.n_facts is None:
            self.n_facts = len(self.facts)
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise GraphError(f"circuit {self.name!r} has duplicate node ids")
        known = set(ids)
        for e in self.edges:
            if e.source not in known or e.target not in known:
                raise GraphError(f"circuit {self.name!r}: edge {e.source!r} -> {e.target!r} names an unknown node")

    # ------------------------------------------------------------ access
    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    def node(self, node_id: str) -> CircuitNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in circuit {self.name!r}")

    # ------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "relation": self.relation, "n_facts": self.n_facts,
            "attribution_score": self.attribution_score, "faithfulness": self.faithfulness,
            "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges],
            "facts": [dict(f) for f in self.facts],
        }
        for k, v in self.extra.items():
            if k in d or k == "validation":
                raise GraphError(f"circuit extra key {k!r} shadows a circuit field")
            d[k] = v
        if self.validation is not None:
            d["validation"] = self.validation.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        if "name" not in d:
            raise ValueError("circuit object lacks 'name'")
        own = {"name", "relation", "n_facts", "attribution_score", "faithfulness", "nodes", "edges", "facts",
               "validation"}
        v = d.get("validation")
        return cls(name=str(d["name"]), relation=d.get("relation"),
                   nodes=[CircuitNode.from_dict(n) for n in d.get("nodes", [])],
                   edges=[CircuitEdge.from_dict(e) for e in d.get("edges", [])],
                   attribution_score=_opt_float(d.get("attribution_score")),
                   faithfulness=_opt_float(d.get("faithfulness")),
                   facts=[dict(f) for f in d.get("facts", [])], n_facts=d.get("n_facts"),
                   extra={k: x for k, x in d.items() if k not in own},
                   validation=None if v is None else CircuitValidation.from_dict(v))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        return cls.from_dict(json.loads(text))

    def to_networkx(self) -> nx.DiGraph:
        """DiGraph over node ids; node attributes are the :class:`CircuitNode` fields, edge attribute
        ``weight``; graph attributes name, relation, attribution_score, faithfulness, n_facts."""
        g = nx.DiGraph(name=self.name, relation=self.relation, attribution_score=self.attribution_score,
                       faithfulness=self.faithfulness, n_facts=self.n_facts)
        for n in self.nodes:
            attrs = asdict(n)
            g.add_node(attrs.pop("id"), **attrs)
        for e in self.edges:
            g.add_edge(e.source, e.target, weight=e.weight)
        return g

    # -------------------------------------------------------- comparison
    def compare(self, other: Circuit) -> dict[str, float]:
        """Overlap with ``other``.

        Returns ``jaccard`` (|A ∩ B| / |A ∪ B| on node ids), ``weighted_jaccard``
        (``sum min(|s_a|, |s_b|) / sum max(|s_a|, |s_b|)`` over the union, a missing node or score
        counting 0), ``edge_jaccard`` (on (source, target) pairs), and the counts ``n_common``,
        ``n_only_self``, ``n_only_other``. Empty unions give 1.0 (two empty circuits are equal).
        """
        a = {n.id: abs(n.score or 0.0) for n in self.nodes}
        b = {n.id: abs(n.score or 0.0) for n in other.nodes}
        union = set(a) | set(b)
        common = set(a) & set(b)
        num = sum(min(a.get(k, 0.0), b.get(k, 0.0)) for k in union)
        den = sum(max(a.get(k, 0.0), b.get(k, 0.0)) for k in union)
        ea = {(e.source, e.target) for e in self.edges}
        eb = {(e.source, e.target) for e in other.edges}
        return {
            "jaccard": len(common) / len(union) if union else 1.0,
            "weighted_jaccard": num / den if den > 0 else (1.0 if not union else 0.0),
            "edge_jaccard": len(ea & eb) / len(ea | eb) if ea | eb else 1.0,
            "n_common": len(common), "n_only_self": len(set(a) - set(b)), "n_only_other": len(set(b) - set(a)),
        }

    # ------------------------------------------------------ construction
    @classmethod
    def from_graph(cls, graph: AttributionGraph, prune: PruneResult | None = None, name: str = "circuit",
                   relation: str | None = None, facts: Sequence[Mapping[str, Any]] = (),
                   **prune_kwargs: Any) -> Circuit:
        """The circuit of the kept nodes/edges of ``graph`` (pruned here with ``prune_kwargs`` unless
        ``prune`` is given). Node ``score`` is ``NodeInfo.score`` or, if absent, the graph influence
        (logit nodes: their probability); ``influence`` is the graph influence."""
        if prune is None:
            prune = prune_graph(graph, **prune_kwargs)
        scores = _node_scores(graph, prune.node_influence)
        keep = prune.node_mask
        nodes = []
        for i in keep.nonzero().flatten().tolist():
            info = graph.nodes[i]
            nodes.append(CircuitNode(
                id=info.id, component=info.node.component, layer=info.node.layer, role=info.role,
                position=info.node.position, index=info.node.index,
                label=info.label or info.node.label(graph.prompt_tokens or None), score=float(scores[i]),
                activation=info.activation, influence=float(prune.node_influence[i])))
        edges = _edges(graph, prune.edge_mask & keep[:, None] & keep[None, :])
        extra = {"prompt_tokens": list(graph.prompt_tokens)} if graph.prompt_tokens else {}
        return cls(name=name, relation=relation, nodes=nodes, edges=edges,
                   attribution_score=attribution_share(scores, keep, graph.kind_mask("logit")),
                   facts=[dict(f) for f in facts], extra=extra)


def _node_scores(graph: AttributionGraph, influence: torch.Tensor) -> torch.Tensor:
    w = graph.logit_weights()
    return torch.tensor([nd.score if nd.score is not None else float(influence[i] + w[i])
                         for i, nd in enumerate(graph.nodes)], dtype=torch.float64)


def _edges(graph: AttributionGraph, mask: torch.Tensor) -> list[CircuitEdge]:
    ids = graph.node_ids
    tgt, src = mask.nonzero(as_tuple=True)
    weights = graph.adjacency[tgt, src].tolist()
    return [CircuitEdge(ids[s], ids[t], float(w)) for t, s, w in zip(tgt.tolist(), src.tolist(), weights)]


def attribution_share(scores: torch.Tensor, kept: torch.Tensor, exclude: torch.Tensor | None = None) -> float | None:
    """``sum |scores[kept]| / sum |scores|`` over the nodes not in ``exclude`` (e.g. the logit nodes,
    which are the metric, not a part of its explanation): the share of the attribution mass the kept nodes
    hold, in [0, 1] (signed sums can cancel and leave the range). ``None`` if the total is 0."""
    s = torch.as_tensor(scores, dtype=torch.float64).abs()
    use = torch.ones_like(kept, dtype=torch.bool) if exclude is None else ~exclude
    total = float(s[use].sum())
    if total == 0 or not math.isfinite(total):
        return None
    return float(s[use & kept].sum()) / total


def attach_validation(circuit: Circuit, metrics: Mapping[str, Any] | None, kind: str = "component") -> Circuit:
    """The one place a circuit gets its validation: ``circuit.validation`` from the circuit's ``metrics.json``
    entry (:meth:`CircuitValidation.from_metrics`) and the headline ``circuit.faithfulness``, its held-out
    faithfulness (``None`` without held-out facts). ``metrics=None`` leaves the circuit unvalidated. Returns
    ``circuit``."""
    if metrics is not None:
        circuit.validation = CircuitValidation.from_metrics(metrics, kind)
        circuit.faithfulness = circuit.validation.held_out_faithfulness
    return circuit


# --------------------------------------------------------------------------- relation level
def _roles_of(graph: AttributionGraph, roles: Mapping[int, str] | Sequence[str] | None) -> list[str | None]:
    out: list[str | None] = []
    for nd in graph.nodes:
        pos = nd.node.position
        if nd.role is not None:
            out.append(nd.role)
        elif pos is None or roles is None:
            out.append(None)
        elif isinstance(roles, Mapping):
            if pos not in roles:
                raise GraphError(f"no role for position {pos} (node {nd.id!r})")
            out.append(roles[pos])
        else:
            if not 0 <= pos < len(roles):
                raise GraphError(f"no role for position {pos} (node {nd.id!r}); {len(roles)} roles given")
            out.append(roles[pos])
    return out


def combine_graphs(graphs: Sequence[AttributionGraph],
                   roles_per_graph: Sequence[Mapping[int, str] | Sequence[str] | None],
                   name: str = "circuit", relation: str | None = None,
                   facts: Sequence[Mapping[str, Any]] = (), node_threshold: float = 0.8,
                   edge_threshold: float = 0.98, **prune_kwargs: Any) -> tuple[Circuit, AttributionGraph]:
    """Average per-prompt graphs into one relation-level graph and prune it into a :class:`Circuit`.

    Nodes are keyed by ``(component, layer, role, index)``, the role of a node coming from its
    ``NodeInfo.role`` or from ``roles_per_graph[g]`` (a position -> role mapping or a list indexed by
    position). Logit nodes are keyed without their token id (different facts have different
    answers), so each graph contributes one output node ``logit/L{n}/{role}``. Within one graph,
    nodes sharing a key are merged by summing (their adjacency rows and columns, scores and logit
    weights add: e.g. two ``relation`` tokens act together). Across graphs, edge weights, node
    scores (``NodeInfo.score`` or influence) and logit weights are averaged, a node or edge missing
    from a graph counting 0; activations are averaged over the graphs that have the node. The
    averaged graph (self-loops from merged nodes dropped) is then pruned with :func:`prune_graph`
    and its ``attribution_score`` is the kept share of the averaged node scores.

    Returns:
        ``(circuit, combined_graph)``.
    """
    if not graphs:
        raise GraphError("combine_graphs needs at least one graph")
    if len(roles_per_graph) != len(graphs):
        raise GraphError(f"{len(graphs)} graphs but {len(roles_per_graph)} role assignments")
    keys: dict[tuple, int] = {}
    proto: list[tuple[Node, str | None, str, str | None]] = []  # node, role, label, feature_type
    per_graph = []
    for g, roles in zip(graphs, roles_per_graph):
        rl = _roles_of(g, roles)
        slots: list[int] = []
        for nd, role in zip(g.nodes, rl):
            comp = nd.node.component
            index = None if comp == "logit" else nd.node.index
            if role is None and nd.node.position is not None:
                raise GraphError(f"node {nd.id!r} has a position but no role; pass roles_per_graph")
            key = (comp, nd.node.layer, role, index)
            if key not in keys:
                keys[key] = len(keys)
                label = nd.label if comp not in ("logit", "embed") else ""
                proto.append((Node(comp, nd.node.layer, None, index), role, label, nd.feature_type))
            slots.append(keys[key])
        per_graph.append(torch.tensor(slots, dtype=torch.long))

    m, n_g = len(keys), len(graphs)
    adj = torch.zeros(m, m, dtype=torch.float64)
    score = torch.zeros(m, dtype=torch.float64)
    w = torch.zeros(m, dtype=torch.float64)
    act_sum = torch.zeros(m, dtype=torch.float64)
    act_n = torch.zeros(m, dtype=torch.float64)
    for g, idx in zip(graphs, per_graph):
        onehot = torch.zeros(m, g.n_nodes, dtype=torch.float64)
        onehot[idx, torch.arange(g.n_nodes)] = 1.0
        adj += onehot @ g.adjacency.to(torch.float64) @ onehot.T
        score += onehot @ _node_scores(g, g.influence())
        w += onehot @ g.logit_weights()
        for j, nd in enumerate(g.nodes):
            if nd.activation is not None:
                act_sum[idx[j]] += nd.activation
                act_n[idx[j]] += 1
    adj /= n_g
    adj.fill_diagonal_(0.0)  # merging same-key nodes of one graph must not create self-loops
    score /= n_g
    w /= n_g
    nodes = [NodeInfo(node=nd, role=role, label=label, feature_type=ft, score=float(score[i]),
                      activation=float(act_sum[i] / act_n[i]) if act_n[i] > 0 else None,
                      id=role_key(nd.component, nd.layer, role, nd.index))
             for i, (nd, role, label, ft) in enumerate(proto)]
    logit_idx = [i for i, nd in enumerate(nodes) if nd.kind == "logit"]
    combined = AttributionGraph(
        nodes=nodes, adjacency=adj, logit_indices=logit_idx, logit_probabilities=w[logit_idx],
        prompt=graphs[0].prompt, prompt_tokens=list(graphs[0].prompt_tokens), n_layers=graphs[0].n_layers,
        metadata={"n_graphs": n_g, "combined": True})
    prune = prune_graph(combined, node_threshold=node_threshold, edge_threshold=edge_threshold, **prune_kwargs)
    for i, nd in enumerate(combined.nodes):
        nd.influence = float(prune.node_influence[i])
    circuit = Circuit.from_graph(combined, prune, name=name, relation=relation, facts=facts)
    return circuit, combined


# --------------------------------------------------------------------------- circuits.json
def write_circuits_json(circuits: Sequence[Circuit], path: str | os.PathLike, model: str | None = None) -> None:
    """Write ``{"model": model, "circuits": [...]}`` atomically to ``path``."""
    names = [c.name for c in circuits]
    if len(set(names)) != len(names):
        raise GraphError(f"circuit names are not unique: {names}")
    atomic_write_json(path, {"model": model, "circuits": [c.to_dict() for c in circuits]})


def read_circuits_json(path: str | os.PathLike) -> tuple[str | None, list[Circuit]]:
    """Read a ``circuits.json`` file: ``(model, circuits)``."""
    data = read_json(path)
    if not isinstance(data, dict) or "circuits" not in data:
        raise ValueError(f"{path}: not a circuits.json file (no 'circuits' key)")
    return data.get("model"), [Circuit.from_dict(c) for c in data["circuits"]]
