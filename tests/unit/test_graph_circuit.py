"""Circuit serialisation, comparison and relation-level combination of graphs."""
from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch

from circuit_discovery.graph import (
    AttributionGraph,
    Circuit,
    CircuitEdge,
    CircuitNode,
    GraphError,
    NodeInfo,
    combine_graphs,
    prune_graph,
    read_circuits_json,
    write_circuits_json,
)
from circuit_discovery.nodes import Node

EXAMPLE = {  # the circuits.json entry of docs/ARCHITECTURE.md
    "name": "capital_city", "relation": "capital_city", "n_facts": 20, "attribution_score": 0.83,
    "faithfulness": 0.91,
    "nodes": [{"id": "mlp_out/L3/subject_last", "component": "mlp_out", "layer": 3, "role": "subject_last",
               "position": None, "index": None, "label": "L3 MLP @ subject_last", "score": 0.42,
               "activation": None, "influence": 0.2},
              {"id": "logit/L18/last", "component": "logit", "layer": 18, "role": "last", "position": None,
               "index": None, "label": "answer", "score": 1.0, "activation": None, "influence": 0.0}],
    "edges": [{"source": "mlp_out/L3/subject_last", "target": "logit/L18/last", "weight": 0.31}],
    "facts": [{"prompt": "The capital of France is", "answer": " Paris"}],
    "prompt_tokens": ["<bos>", "The", " capital"],
    "graphs": ["graphs/capital_city_0.json"],
}


def test_dict_and_json_round_trip_preserve_the_documented_format():
    c = Circuit.from_dict(EXAMPLE)
    assert c.extra == {"prompt_tokens": EXAMPLE["prompt_tokens"], "graphs": EXAMPLE["graphs"]}
    assert c.to_dict() == EXAMPLE
    assert Circuit.from_json(c.to_json()).to_dict() == EXAMPLE
    assert json.loads(c.to_json()) == EXAMPLE


def test_write_and_read_circuits_json(tmp_path):
    a = Circuit.from_dict(EXAMPLE)
    b = Circuit(name="other", relation="r", nodes=[CircuitNode("head/L1/I2/last", "head", 1, "last", None, 2)],
                facts=[{"prompt": "p", "answer": " a"}])
    assert b.n_facts == 1 and b.faithfulness is None
    path = tmp_path / "out" / "circuits.json"
    write_circuits_json([a, b], path, model="gemma-3-270m")
    raw = json.loads(path.read_text())
    assert raw["model"] == "gemma-3-270m" and [c["name"] for c in raw["circuits"]] == ["capital_city", "other"]
    assert raw["circuits"][1]["faithfulness"] is None
    model, back = read_circuits_json(path)
    assert model == "gemma-3-270m"
    assert [c.to_dict() for c in back] == [a.to_dict(), b.to_dict()]
    assert [p.name for p in path.parent.iterdir()] == ["circuits.json"]  # no temporary file left
    with pytest.raises(GraphError, match="unique"):
        write_circuits_json([a, a], tmp_path / "dup.json")


def test_invalid_circuits_raise():
    with pytest.raises(GraphError, match="unknown node"):
        Circuit(name="x", nodes=[CircuitNode("a", "mlp_out", 0)], edges=[CircuitEdge("a", "b", 1.0)])
    with pytest.raises(GraphError, match="duplicate"):
        Circuit(name="x", nodes=[CircuitNode("a", "mlp_out", 0), CircuitNode("a", "mlp_out", 1)])
    with pytest.raises(ValueError, match="lacks"):
        CircuitNode.from_dict({"id": "a"})


def test_compare_against_hand_computed_overlaps():
    a = Circuit(name="a", nodes=[CircuitNode("x", "mlp_out", 0, score=0.5), CircuitNode("y", "mlp_out", 1, score=-0.2),
                                 CircuitNode("z", "mlp_out", 2, score=0.1)],
                edges=[CircuitEdge("x", "y", 1.0)])
    b = Circuit(name="b", nodes=[CircuitNode("x", "mlp_out", 0, score=0.3), CircuitNode("y", "mlp_out", 1, score=0.4),
                                 CircuitNode("w", "mlp_out", 3, score=0.6)],
                edges=[CircuitEdge("x", "y", 2.0), CircuitEdge("y", "w", 1.0)])
    r = a.compare(b)
    assert r["jaccard"] == pytest.approx(2 / 4)
    # min: x .3, y .2, z 0, w 0 = .5; max: x .5, y .4, z .1, w .6 = 1.6
    assert r["weighted_jaccard"] == pytest.approx(0.5 / 1.6)
    assert r["edge_jaccard"] == pytest.approx(1 / 2)
    assert (r["n_common"], r["n_only_self"], r["n_only_other"]) == (2, 1, 1)
    assert a.compare(a)["weighted_jaccard"] == pytest.approx(1.0)


def test_to_networkx_carries_attributes():
    c = Circuit.from_dict(EXAMPLE)
    g = c.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {"mlp_out/L3/subject_last", "logit/L18/last"}
    assert g.nodes["mlp_out/L3/subject_last"]["score"] == 0.42
    assert g.nodes["mlp_out/L3/subject_last"]["role"] == "subject_last"
    assert g.edges["mlp_out/L3/subject_last", "logit/L18/last"]["weight"] == 0.31
    assert g.graph["faithfulness"] == 0.91


def _prompt_graph(n_pos: int, subj_last: int, answer: int, w_mlp: float, w_head: float,
                  extra_head: float | None = None) -> AttributionGraph:
    """emb(subj_last) -> mlp_out L0 @ subj_last -> head L1.0 @ last -> logit; optional head L1.1."""
    last = n_pos - 1
    nodes = [NodeInfo(Node("embed", -1, subj_last), token_id=5), NodeInfo(Node("mlp_out", 0, subj_last)),
             NodeInfo(Node("head", 1, last, 0)), NodeInfo(Node("logit", 2, last, answer))]
    edges = [("embed/L-1/P%d" % subj_last, "mlp_out/L0/P%d" % subj_last, 1.0),
             ("mlp_out/L0/P%d" % subj_last, "head/L1/I0/P%d" % last, w_mlp),
             ("head/L1/I0/P%d" % last, "logit/L2/I%d/P%d" % (answer, last), w_head)]
    if extra_head is not None:
        nodes.insert(3, NodeInfo(Node("head", 1, last, 1)))
        edges.append(("mlp_out/L0/P%d" % subj_last, "head/L1/I1/P%d" % last, 1.0))
        edges.append(("head/L1/I1/P%d" % last, "logit/L2/I%d/P%d" % (answer, last), extra_head))
    return AttributionGraph.from_edges(nodes, edges, n_layers=2, prompt="p", prompt_tokens=["t"] * n_pos)


def test_combine_graphs_averages_over_roles_with_missing_as_zero():
    g1 = _prompt_graph(n_pos=5, subj_last=2, answer=11, w_mlp=2.0, w_head=4.0, extra_head=2.0)
    g2 = _prompt_graph(n_pos=7, subj_last=4, answer=22, w_mlp=1.0, w_head=6.0)
    roles1 = {2: "subject_last", 4: "last"}
    roles2 = ["bos", "relation", "relation", "subject_first", "subject_last", "relation", "last"]
    circuit, comb = combine_graphs([g1, g2], [roles1, roles2], name="rel", relation="rel",
                                   node_threshold=1.0, edge_threshold=1.0,
                                   facts=[{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}])
    ids = comb.node_ids
    assert set(ids) == {"embed/L-1/subject_last", "mlp_out/L0/subject_last", "head/L1/I0/last",
                        "head/L1/I1/last", "logit/L2/last"}
    a = comb.adjacency
    ix = comb.index
    assert a[ix("head/L1/I0/last"), ix("mlp_out/L0/subject_last")] == pytest.approx((2.0 + 1.0) / 2)
    assert a[ix("logit/L2/last"), ix("head/L1/I0/last")] == pytest.approx((4.0 + 6.0) / 2)
    # head 1 exists only in the first graph: its edges count 0 in the second
    assert a[ix("logit/L2/last"), ix("head/L1/I1/last")] == pytest.approx(2.0 / 2)
    # scores = per-graph influence averaged (missing = 0); g1: logit shares 4/6, 2/6; g2: head share 1
    s = {n.id: n.score for n in comb.nodes}
    assert s["head/L1/I0/last"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert s["head/L1/I1/last"] == pytest.approx((2 / 6 + 0.0) / 2)
    assert s["logit/L2/last"] == pytest.approx(1.0)  # logit weight (1 in each graph)
    assert circuit.n_facts == 2 and circuit.relation == "rel"
    assert {n.id for n in circuit.nodes} == set(ids)
    assert circuit.attribution_score == pytest.approx(1.0)
    # influence of the combined graph is the all-path influence of the averaged adjacency
    np.testing.assert_allclose([n.influence for n in comb.nodes], comb.influence().numpy())


def test_combine_sums_nodes_sharing_a_role_within_one_graph_and_prunes():
    # two relation tokens at positions 1 and 2 feed the logit; they merge into one 'relation' node
    nodes = [NodeInfo(Node("mlp_out", 0, 1)), NodeInfo(Node("mlp_out", 0, 2)), NodeInfo(Node("mlp_out", 0, 0)),
             NodeInfo(Node("embed", -1, 0), token_id=1), NodeInfo(Node("logit", 1, 3, 9))]
    edges = [("embed/L-1/P0", "mlp_out/L0/P0", 1.0), ("embed/L-1/P0", "mlp_out/L0/P1", 1.0),
             ("embed/L-1/P0", "mlp_out/L0/P2", 1.0),
             ("mlp_out/L0/P1", "logit/L1/I9/P3", 3.0), ("mlp_out/L0/P2", "logit/L1/I9/P3", 5.0),
             ("mlp_out/L0/P0", "logit/L1/I9/P3", 0.01)]
    g = AttributionGraph.from_edges(nodes, edges, n_layers=1, prompt_tokens=["a", "b", "c", "d"])
    roles = ["bos", "relation", "relation", "last"]
    circuit, comb = combine_graphs([g], [roles], node_threshold=0.9, edge_threshold=0.98)
    a = comb.adjacency
    assert a[comb.index("logit/L1/last"), comb.index("mlp_out/L0/relation")] == pytest.approx(8.0)
    assert "mlp_out/L0/bos" in comb.node_ids
    kept = {n.id for n in circuit.nodes}
    assert "mlp_out/L0/relation" in kept and "mlp_out/L0/bos" not in kept
    scores = {n.id: n.score for n in comb.nodes if n.node.component != "logit"}
    expected = sum(abs(v) for k, v in scores.items() if k in kept) / sum(abs(v) for v in scores.values())
    assert circuit.attribution_score == pytest.approx(expected)
    with pytest.raises(GraphError, match="role"):
        combine_graphs([g], [None])
    with pytest.raises(GraphError, match="role assignments"):
        combine_graphs([g, g], [roles])


def test_circuit_from_graph_uses_prune_result():
    g = _prompt_graph(n_pos=5, subj_last=2, answer=11, w_mlp=2.0, w_head=4.0, extra_head=0.001)
    res = prune_graph(g, node_threshold=0.9, edge_threshold=0.98)
    c = Circuit.from_graph(g, res, name="one")
    kept = [g.nodes[i].id for i in res.node_mask.nonzero().flatten().tolist()]
    assert c.node_ids == kept
    assert "head/L1/I1/P4" not in kept
    for e in c.edges:
        assert e.weight == float(g.adjacency[g.index(e.target), g.index(e.source)])
    infl = g.influence()
    total = float(infl[:-1].abs().sum())
    kept_sum = float(sum(abs(infl[g.index(i)]) for i in kept if not i.startswith("logit")))
    assert c.attribution_score == pytest.approx(kept_sum / total)
    assert torch.isclose(torch.tensor(c.node("head/L1/I0/P4").influence, dtype=torch.float64),
                         infl[g.index("head/L1/I0/P4")])
