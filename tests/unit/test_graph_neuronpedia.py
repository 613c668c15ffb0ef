"""Neuronpedia graph export, validated against Neuronpedia's own JSON schema."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from circuit_discovery.graph import (
    AttributionGraph,
    GraphError,
    NodeInfo,
    Supernode,
    combine_graphs,
    default_schema_path,
    load_graph_schema,
    prune_graph,
    to_neuronpedia,
    validate_neuronpedia,
    write_neuronpedia_json,
)
from circuit_discovery.nodes import Node
from tests.conftest import REPO, shared_path
from tests.unit.test_graph_prune import random_dag_graph

SCHEMA_PATH = default_schema_path()  # the copy shipped as package data


@pytest.fixture(scope="module")
def schema():
    return load_graph_schema()


def test_schema_is_package_data_identical_to_neuronpedias():
    """The default schema is the packaged copy (not ``../shared``), is listed as package data, and is the same
    file as the project's reference copy of Neuronpedia's schema."""
    import circuit_discovery.graph

    pkg = Path(circuit_discovery.graph.__file__).resolve().parent
    assert SCHEMA_PATH.resolve() == pkg / "data" / "neuronpedia-graph-schema.json" and SCHEMA_PATH.is_file()
    assert '"graph/data/*.json"' in (REPO / "pyproject.toml").read_text()
    assert load_graph_schema() == json.loads(SCHEMA_PATH.read_text()) == load_graph_schema(SCHEMA_PATH)
    assert load_graph_schema()["title"] == "Anthropic Attribution Graph"
    reference = shared_path("neuronpedia", "graph-schema.json")
    assert json.loads(reference.read_text()) == load_graph_schema()


FEATURE_ID = re.compile(r"^\d+_\d+_\d+$")


def test_feature_graph_export_validates_and_matches_pruning(schema):
    graph = random_dag_graph(0, n_layers=4, feats_per_layer=4)
    res = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    data = to_neuronpedia(graph, slug="fact-paris", scan="gemma-3-270m", prune=res)
    jsonschema.validate(data, schema)
    validate_neuronpedia(data, schema)
    meta = data["metadata"]
    assert (meta["slug"], meta["scan"], meta["prompt"]) == ("fact-paris", "gemma-3-270m", graph.prompt)
    assert meta["prompt_tokens"] == graph.prompt_tokens
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert meta["node_threshold"] == 0.8
    by_id = {n["node_id"]: n for n in data["nodes"]}
    # every kept edge appears with the raw direct effect as weight
    keep = res.node_mask
    tgt, src = (res.edge_mask & keep[:, None] & keep[None, :]).nonzero(as_tuple=True)
    assert len(data["links"]) == len(tgt)
    np_id = {}
    for n in graph.nodes:
        c = n.node.component
        if c == "feature":
            np_id[n.id] = f"{n.node.layer}_{n.node.index}_{n.node.position}"
        elif c == "error":
            np_id[n.id] = f"{n.node.layer}_-1_{n.node.position}"
        elif c == "embed":
            np_id[n.id] = f"E_{n.token_id}_{n.node.position}"
        else:
            np_id[n.id] = f"{graph.n_layers + 1}_{n.node.index}_{n.node.position}"
    links = {(l["source"], l["target"]): l["weight"] for l in data["links"]}
    for t, s in zip(tgt.tolist(), src.tolist()):
        key = (np_id[graph.nodes[s].id], np_id[graph.nodes[t].id])
        assert links[key] == pytest.approx(float(graph.adjacency[t, s]))
    for i, n in enumerate(graph.nodes):
        if n.kind in ("embedding", "logit"):
            assert np_id[n.id] in by_id
        if np_id[n.id] in by_id:
            d = by_id[np_id[n.id]]
            assert keep[i]
            if n.kind == "logit":
                assert d["feature_type"] == "logit" and d["layer"] == str(graph.n_layers + 1)
                assert d["token_prob"] == pytest.approx(float(graph.logit_probabilities[graph.logit_indices.index(i)]))
            else:
                assert d["influence"] == pytest.approx(float(res.cumulative_scores[i]))
            if n.kind == "intermediate":
                assert FEATURE_ID.match(d["node_id"]) and d["feature"] == n.node.index
                assert d["activation"] == pytest.approx(n.activation) and d["clerp"] == n.label
    assert sum(d["is_target_logit"] for d in data["nodes"] if d["feature_type"] == "logit") == 1


def test_error_ids_cannot_collide_with_feature_ids(schema):
    # the old circuit-tracer error id '0_{layer}_{pos}' would equal this layer-0 feature's id '0_1_2'
    nodes = [NodeInfo(Node("embed", -1, 2), token_id=3), NodeInfo(Node("feature", 0, 2, 1), label="f"),
             NodeInfo(Node("error", 1, 2)), NodeInfo(Node("feature", 1, 2, 0)), NodeInfo(Node("logit", 2, 2, 4))]
    edges = [("embed/L-1/P2", "feature/L0/I1/P2", 1.0), ("embed/L-1/P2", "error/L1/P2", 1.0),
             ("feature/L0/I1/P2", "feature/L1/I0/P2", 1.0), ("error/L1/P2", "logit/L2/I4/P2", 1.0),
             ("feature/L1/I0/P2", "logit/L2/I4/P2", 1.0), ("feature/L0/I1/P2", "logit/L2/I4/P2", 1.0)]
    g = AttributionGraph.from_edges(nodes, edges, n_layers=2, prompt="a b c", prompt_tokens=["a", "b", "c"])
    data = to_neuronpedia(g, "err-test", "m", node_threshold=1.0, edge_threshold=1.0)
    validate_neuronpedia(data, schema)
    ids = [n["node_id"] for n in data["nodes"]]
    assert "1_-1_2" in ids and "0_1_2" in ids and "1_0_2" in ids
    assert len(set(ids)) == len(ids)
    err = next(n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error")
    assert err["feature"] == -1 and not FEATURE_ID.match(err["node_id"])


def test_component_graph_ids_are_distinct_and_valid(schema):
    # a head, a neuron and an MLP output with the same layer/index/position: ids must all differ
    nodes = [NodeInfo(Node("embed", -1, 1), token_id=8), NodeInfo(Node("head", 0, 1, 3)),
             NodeInfo(Node("neuron", 0, 1, 3)), NodeInfo(Node("mlp_out", 0, 1)), NodeInfo(Node("attn_out", 0, 1)),
             NodeInfo(Node("resid_post", 0, 1)), NodeInfo(Node("feature", 0, 1, 3)),
             NodeInfo(Node("logit", 1, 1, 3))]
    edges = [("embed/L-1/P1", n.id, 1.0) for n in nodes[1:-1]] + [(n.id, "logit/L1/I3/P1", 1.0) for n in nodes[1:-1]]
    g = AttributionGraph.from_edges(nodes, edges, n_layers=1, prompt="a b", prompt_tokens=["a", "b"])
    data = to_neuronpedia(g, "components", "m", node_threshold=1.0, edge_threshold=1.0)
    validate_neuronpedia(data, schema)
    ids = {n["node_id"] for n in data["nodes"]}
    assert ids == {"E_8_1", "0_H3_1", "0_N3_1", "0_M_1", "0_A_1", "0_RP_1", "0_3_1", "2_3_1"}
    assert len(data["links"]) == 12


def test_relation_level_graph_exports_with_role_ids(schema):
    g = random_dag_graph(1)
    roles = ["bos", "subject_last", "last"]
    _, comb = combine_graphs([g, random_dag_graph(2)], [roles, roles], node_threshold=1.0, edge_threshold=1.0)
    data = to_neuronpedia(comb, "relation", "m", role_positions={"bos": 0, "subject_last": 1, "last": 2})
    validate_neuronpedia(data, schema)
    assert all(n["node_id"].split("_")[-1] in roles for n in data["nodes"])
    assert {n["ctx_idx"] for n in data["nodes"]} <= {0, 1, 2}
    ids = {n["node_id"] for n in data["nodes"]}
    assert {"E_tok_bos", "E_tok_subject_last", "E_tok_last", "4_answer_last"} <= ids
    assert len(ids) == len(data["nodes"])


def test_supernodes_and_pins_are_translated(schema):
    graph = random_dag_graph(0, n_layers=4, feats_per_layer=4)
    res = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    feats = [graph.nodes[i] for i in res.node_mask.nonzero().flatten().tolist() if graph.nodes[i].kind == "intermediate"]
    sn = [Supernode("group one", [feats[0].id, feats[1].id]), ["group two", feats[2].id]]
    data = to_neuronpedia(graph, "sn", "m", prune=res, supernodes=sn, pinned_ids=[feats[0].id])
    validate_neuronpedia(data, schema)
    exported = {n["node_id"] for n in data["nodes"]}
    qs = data["qParams"]["supernodes"]
    assert [q[0] for q in qs] == ["group one", "group two"]
    assert all(len(q) >= 2 and set(q[1:]) <= exported for q in qs)
    assert qs[0][1:] == [f"{f.node.layer}_{f.node.index}_{f.node.position}" for f in feats[:2]]
    assert data["qParams"]["pinnedIds"] == [qs[0][1]]
    with pytest.raises(KeyError):
        to_neuronpedia(graph, "sn", "m", prune=res, supernodes=[["x", "no/such/node"]])


def test_write_round_trip_and_validation_failures(schema, tmp_path):
    graph = random_dag_graph(2)
    data = to_neuronpedia(graph, "rt", "m")
    path = write_neuronpedia_json(data, tmp_path / "graphs" / "rt.json", validate=True, schema=SCHEMA_PATH)
    back = json.loads(Path(path).read_text())
    assert back == json.loads(json.dumps(data))
    validate_neuronpedia(back, SCHEMA_PATH)
    broken = json.loads(json.dumps(data))
    del broken["metadata"]["prompt"]
    with pytest.raises(jsonschema.ValidationError):
        validate_neuronpedia(broken, schema)
    broken = json.loads(json.dumps(data))
    broken["links"].append({"source": "nope", "target": broken["nodes"][0]["node_id"], "weight": 1.0})
    with pytest.raises(GraphError, match="missing node"):
        validate_neuronpedia(broken, schema)


def test_bad_export_inputs_raise():
    graph = random_dag_graph(0)
    with pytest.raises(ValueError, match="slug"):
        to_neuronpedia(graph, "has space", "m")
    with pytest.raises(ValueError, match="scan"):
        to_neuronpedia(graph, "ok", "")
    graph.prompt_token_ids = None
    for n in graph.nodes:
        n.token_id = None if n.kind == "embedding" else n.token_id
    with pytest.raises(GraphError, match="token id"):
        to_neuronpedia(graph, "ok", "m")
    g2 = random_dag_graph(0)
    g2.n_layers = None
    with pytest.raises(GraphError, match="n_layers"):
        to_neuronpedia(g2, "ok", "m")
