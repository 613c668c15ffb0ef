"""Export of attribution graphs in Neuronpedia's graph JSON format ("Anthropic Attribution Graph" v1).

Node ids (``node_id``; all fields separated by ``_``, last field the context index):

=====================  =================================  ==========================================
node                   ``node_id``                        notes
=====================  =================================  ==========================================
SAE/transcoder feature ``{layer}_{feature}_{ctx}``        as circuit-tracer
embedding              ``E_{token_id}_{ctx}``             as circuit-tracer; ``tok`` replaces the token
                                                          id of a relation-level embedding
logit                  ``{n_layers+1}_{token_id}_{ctx}``  as circuit-tracer; ``answer`` replaces the
                                                          token id of a relation-level logit (no token)
error                  ``{layer}_-1_{ctx}``               see below
head                   ``{layer}_H{head}_{ctx}``          component graphs
neuron                 ``{layer}_N{neuron}_{ctx}``
mlp_out / attn_out     ``{layer}_M_{ctx}`` / ``{layer}_A_{ctx}``
resid_pre/mid/post     ``{layer}_R_{ctx}`` / ``{layer}_RM_{ctx}`` / ``{layer}_RP_{ctx}``
=====================  =================================  ==========================================

Error nodes: the older circuit-tracer form ``0_{layer}_{ctx}`` is the id of layer-0 feature number
``layer`` and collides with it. We use circuit-tracer's current form ``{layer}_-1_{ctx}`` (with
``feature = -1``): feature indices are never negative, so no feature id can equal it, and it keeps the
three-field ``layer_feature_ctx`` shape that Neuronpedia's front end splits on. Component ids put a
letter tag in the middle field, which no feature, error, embedding or logit id has (those are
integers there), so they cannot collide either. A node with no position (patched at every
position) gets ``ctx_idx`` = the last prompt position (or its role's position from ``role_positions``)
and its role name, or ``all``, as the last id field. The schema does not constrain ids (it has no
pattern); uniqueness is checked at export.

``influence`` is circuit-tracer's cumulative influence share (the fraction of total influence held by
this node and every more influential node; Neuronpedia prunes dynamically by ``influence <=
node_threshold``); ``activation`` is the node's activation; ``clerp`` its label.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from importlib import metadata as _md
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch

from circuit_discovery.graph.graph import AttributionGraph, GraphError, NodeInfo
from circuit_discovery.graph.prune import PruneResult, prune_graph
from circuit_discovery.graph.supernodes import Supernode, supernodes_to_qparams
from circuit_discovery.io import atomic_write_json, read_json

COMPONENT_TAGS = {"head": "H", "neuron": "N", "mlp_out": "M", "attn_out": "A", "resid_pre": "R",
                  "resid_mid": "RM", "resid_post": "RP"}
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _version() -> str:
    try:
        return _md.version("factual-recall-circuits")
    except _md.PackageNotFoundError:
        return "unknown"


_SCHEMA_RESOURCE = ("data", "neuronpedia-graph-schema.json")


def default_schema_path() -> Path:
    """The copy of Neuronpedia's graph JSON schema shipped as package data
    (``circuit_discovery/graph/data/neuronpedia-graph-schema.json``)."""
    return Path(str(resources.files("circuit_discovery.graph").joinpath(*_SCHEMA_RESOURCE)))


def load_graph_schema(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load Neuronpedia's graph JSON schema from ``path`` (default: the packaged copy, :func:`default_schema_path`)."""
    if path is None:
        return json.loads(resources.files("circuit_discovery.graph").joinpath(*_SCHEMA_RESOURCE).read_text("utf-8"))
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Neuronpedia graph schema not found at {p}")
    return read_json(p)


def validate_neuronpedia(data: Mapping[str, Any], schema: Mapping[str, Any] | str | os.PathLike | None = None) -> None:
    """Validate a graph dict with jsonschema (raises ``jsonschema.ValidationError``) and check that
    node ids are unique and every link names an existing node (raises :class:`GraphError`)."""
    if schema is None or isinstance(schema, (str, os.PathLike)):
        schema = load_graph_schema(schema)
    jsonschema.validate(instance=data, schema=schema)
    ids = [n["node_id"] for n in data["nodes"]]
    if len(set(ids)) != len(ids):
        raise GraphError("Neuronpedia graph has duplicate node ids")
    known = set(ids)
    for link in data["links"]:
        if link["source"] not in known or link["target"] not in known:
            raise GraphError(f"link {link['source']} -> {link['target']} names a missing node")


def _ctx(info: NodeInfo, graph: AttributionGraph, role_positions: Mapping[str, int] | None) -> tuple[int, str]:
    pos = info.node.position
    if pos is not None:
        return pos, str(pos)
    last = max(len(graph.prompt_tokens) - 1, 0)
    if info.role is not None:
        return (role_positions or {}).get(info.role, last), info.role
    return last, "all"


def neuronpedia_node(info: NodeInfo, graph: AttributionGraph, role_positions: Mapping[str, int] | None = None,
                     feature_index: str = "plain") -> dict[str, Any]:
    """The Neuronpedia node dict of one graph node, without ``influence``/``activation``.

    ``feature_index="cantor"`` stores the Cantor pairing of (layer, feature) in ``feature`` (as
    circuit-tracer does for cross-layer transcoders); ``"plain"`` stores the feature index.
    """
    comp, layer, index = info.node.component, info.node.layer, info.node.index
    ctx, tail = _ctx(info, graph, role_positions)
    ft = info.feature_type
    if comp == "feature":
        if index is None:
            raise GraphError(f"feature node {info.id!r} has no feature index")
        feat = (layer + index) * (layer + index + 1) // 2 + index if feature_index == "cantor" else index
        return dict(node_id=f"{layer}_{index}_{tail}", feature=feat, layer=str(layer), ctx_idx=ctx,
                    feature_type=ft, jsNodeId=f"{layer}_{index}-0", clerp=info.label)
    if comp == "error":
        return dict(node_id=f"{layer}_-1_{tail}", feature=-1, layer=str(layer), ctx_idx=ctx, feature_type=ft,
                    jsNodeId=f"{layer}_-1-{tail}", clerp=info.label)
    if comp == "embed":
        tok = info.token_id
        if tok is None and graph.prompt_token_ids is not None and 0 <= ctx < len(graph.prompt_token_ids):
            tok = graph.prompt_token_ids[ctx]
        if tok is None and info.node.position is not None:
            raise GraphError(f"embedding node {info.id!r} needs a token id (NodeInfo.token_id or "
                             "AttributionGraph.prompt_token_ids)")
        mid = "tok" if tok is None else str(tok)  # relation-level embeddings stand for each fact's token
        label = info.label or (graph.prompt_tokens[ctx] if 0 <= ctx < len(graph.prompt_tokens) else "")
        if info.node.position is None and not info.label:
            label = info.role or label
        return dict(node_id=f"E_{mid}_{tail}", feature=ctx, layer="E", ctx_idx=ctx, feature_type=ft,
                    jsNodeId=f"E_{mid}-{tail}", clerp=label)
    if comp == "logit":
        if graph.n_layers is None:
            raise GraphError("AttributionGraph.n_layers is needed to place logit nodes")
        tok = info.token_id
        lay = str(graph.n_layers + 1)
        mid = "answer" if tok is None else str(tok)  # relation-level logits stand for each fact's answer
        return dict(node_id=f"{lay}_{mid}_{tail}", feature=tok, layer=lay, ctx_idx=ctx, feature_type=ft,
                    jsNodeId=f"L_{mid}-{tail}", clerp=info.label)
    tag = COMPONENT_TAGS[comp] + ("" if index is None else str(index))
    return dict(node_id=f"{layer}_{tag}_{tail}", feature=None, layer=str(layer), ctx_idx=ctx, feature_type=ft,
                jsNodeId=f"{layer}_{tag}-0", clerp=info.label or info.node.label(graph.prompt_tokens or None))


def to_neuronpedia(graph: AttributionGraph, slug: str, scan: str, node_threshold: float = 0.8,
                   edge_threshold: float = 0.98, prune: PruneResult | None = None,
                   supernodes: Sequence[Supernode | Sequence[str]] = (), pinned_ids: Sequence[str] = (),
                   feature_details: Mapping[str, str] | None = None, description: str | None = None,
                   generation_settings: Mapping[str, Any] | None = None,
                   role_positions: Mapping[str, int] | None = None, feature_index: str = "plain",
                   **prune_kwargs: Any) -> dict[str, Any]:
    """Prune ``graph`` (unless ``prune`` is given) and build a Neuronpedia graph dict.

    Kept nodes appear if they touch a kept link, embeddings and logits always (as in circuit-tracer);
    links carry the raw direct effect ``adjacency[target, source]``. ``supernodes`` (Supernode or
    ``[label, graph_node_id, ...]``) and ``pinned_ids`` use graph node ids and are translated;
    members that were pruned away are dropped. ``metadata`` holds slug, scan, prompt, prompt_tokens,
    ``node_threshold`` and ``pruning_settings`` {node_threshold, edge_threshold}.
    """
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise ValueError(f"slug must be a non-empty string of letters, digits, '.', '_' or '-', got {slug!r}")
    if not isinstance(scan, str) or not scan:
        raise ValueError("scan (the Neuronpedia model id, e.g. 'gemma-2-2b') must be a non-empty string")
    if feature_index not in ("plain", "cantor"):
        raise ValueError(f"feature_index must be 'plain' or 'cantor', got {feature_index!r}")
    if prune is None:
        prune = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold, **prune_kwargs)
    keep = prune.node_mask
    edges = prune.edge_mask & keep[:, None] & keep[None, :]
    tgt, src = edges.nonzero(as_tuple=True)
    used = set(tgt.tolist()) | set(src.tolist())
    probs = dict(zip(graph.logit_indices, graph.logit_probabilities.tolist()))
    top_logit = graph.logit_indices[int(torch.argmax(graph.logit_probabilities))]

    nodes: list[dict[str, Any]] = []
    id_map: dict[str, str] = {}
    for i in keep.nonzero().flatten().tolist():
        info = graph.nodes[i]
        if i not in used and info.kind not in ("embedding", "logit"):
            continue
        d = neuronpedia_node(info, graph, role_positions, feature_index)
        d["activation"] = None if info.activation is None else float(info.activation)
        if info.kind == "logit":
            p = float(probs[i])
            d["influence"] = None
            d["token_prob"] = p
            d["is_target_logit"] = i == top_logit
            if not d["clerp"]:
                d["clerp"] = f'Output "{info.token or d["feature"]}" (p={p:.3f})'
        else:
            d["influence"] = float(prune.cumulative_scores[i])
        nodes.append(d)
        id_map[info.id] = d["node_id"]
    np_ids = [d["node_id"] for d in nodes]
    if len(set(np_ids)) != len(np_ids):
        dup = sorted({x for x in np_ids if np_ids.count(x) > 1})
        raise GraphError(f"Neuronpedia node ids collide: {dup[:5]}")

    ids = graph.node_ids
    weights = graph.adjacency[tgt, src].tolist()
    links = [{"source": id_map[ids[s]], "target": id_map[ids[t]], "weight": float(w)}
             for t, s, w in zip(tgt.tolist(), src.tolist(), weights)]

    sn = [s if isinstance(s, Supernode) else Supernode(str(s[0]), [str(x) for x in s[1:]]) for s in supernodes]
    for s in sn:
        for nid in s.node_ids:
            graph.index(nid)  # KeyError for ids that are not in the graph at all
    meta: dict[str, Any] = {
        "slug": slug, "scan": scan, "prompt_tokens": list(graph.prompt_tokens), "prompt": graph.prompt,
        "schema_version": 1, "node_threshold": float(node_threshold),
        "pruning_settings": {"node_threshold": float(node_threshold), "edge_threshold": float(edge_threshold)},
        "info": {"generator": {"name": "factual-recall-circuits (circuit_discovery)", "version": _version()},
                 "create_time_ms": time.time() * 1000.0},
    }
    if description:
        meta["info"]["description"] = description
    if feature_details:
        meta["feature_details"] = dict(feature_details)
    if generation_settings:
        meta["generation_settings"] = dict(generation_settings)
    return {
        "metadata": meta,
        "qParams": {"pinnedIds": [id_map[p] for p in pinned_ids if p in id_map],
                    "supernodes": supernodes_to_qparams(sn, id_map), "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def write_neuronpedia_json(data: Mapping[str, Any], path: str | os.PathLike, validate: bool = False,
                           schema: Mapping[str, Any] | str | os.PathLike | None = None) -> Path:
    """Write a Neuronpedia graph dict atomically (compact JSON); validate first when asked."""
    if validate:
        validate_neuronpedia(data, schema)
    return atomic_write_json(path, dict(data), indent=None)
