"""Influence and pruning of attribution graphs, checked against explicit path enumeration."""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from circuit_discovery.graph import (
    AttributionGraph,
    GraphError,
    NodeInfo,
    compute_edge_influence,
    compute_influence,
    compute_node_influence,
    cumulative_scores,
    find_threshold,
    normalize_matrix,
    prune_graph,
)
from circuit_discovery.nodes import Node


def random_dag_graph(seed: int = 0, n_pos: int = 3, n_layers: int = 3, feats_per_layer: int = 3,
                     n_logits: int = 2, density: float = 0.5) -> AttributionGraph:
    """A random layered DAG: embeddings -> (features, errors) per layer -> logits.

    Node order: embeddings, then per layer its features and errors, then logits; edges only go from a
    lower to a strictly higher layer, so the graph is acyclic.
    """
    rng = np.random.default_rng(seed)
    nodes: list[NodeInfo] = []
    layer_of: list[int] = []
    for p in range(n_pos):
        nodes.append(NodeInfo(Node("embed", -1, p), token_id=100 + p, label=f"tok{p}"))
        layer_of.append(-1)
    for layer in range(n_layers):
        for f in range(feats_per_layer):
            pos = int(rng.integers(n_pos))
            nodes.append(NodeInfo(Node("feature", layer, pos, 10 * layer + f), activation=float(rng.random()),
                                  label=f"feature {layer}/{f}"))
            layer_of.append(layer)
        nodes.append(NodeInfo(Node("error", layer, n_pos - 1)))
        layer_of.append(layer)
    logit_idx = []
    for k in range(n_logits):
        logit_idx.append(len(nodes))
        nodes.append(NodeInfo(Node("logit", n_layers, n_pos - 1, 500 + k), token=f"ans{k}"))
        layer_of.append(n_layers)
    n = len(nodes)
    adj = np.zeros((n, n))
    for t in range(n):
        for s in range(n):
            if layer_of[s] < layer_of[t] and nodes[s].kind != "logit" and rng.random() < density:
                adj[t, s] = rng.normal() * rng.uniform(0.1, 3.0)
    probs = rng.dirichlet(np.ones(n_logits)) * 0.9
    return AttributionGraph(nodes=nodes, adjacency=torch.tensor(adj), logit_indices=logit_idx,
                            logit_probabilities=torch.tensor(probs), prompt="a b c",
                            prompt_tokens=["a", " b", " c"][:n_pos] + ["x"] * max(0, n_pos - 3),
                            prompt_token_ids=[100 + p for p in range(n_pos)], n_layers=n_layers)


def brute_force_influence(graph: AttributionGraph) -> np.ndarray:
    """Sum over every explicit path s -> ... -> logit of w_logit * prod of normalised edge shares."""
    a = np.abs(graph.adjacency.numpy())
    rows = a.sum(1, keepdims=True)
    a_norm = np.divide(a, rows, out=np.zeros_like(a), where=rows > 0)
    g = nx.DiGraph()
    g.add_nodes_from(range(graph.n_nodes))
    for t, s in zip(*np.nonzero(a)):
        g.add_edge(int(s), int(t))
    w = graph.logit_weights().numpy()
    out = np.zeros(graph.n_nodes)
    for s in range(graph.n_nodes):
        for li in graph.logit_indices:
            if s == li:
                continue
            for path in nx.all_simple_paths(g, s, li):
                out[s] += w[li] * math.prod(a_norm[path[k + 1], path[k]] for k in range(len(path) - 1))
    return out


def brute_force_paths_from(graph: AttributionGraph, a_norm: np.ndarray, t: int) -> float:
    """w[t] + sum over paths t -> logit of w_logit * prod shares (the total influence of t as a target)."""
    g = nx.DiGraph()
    g.add_nodes_from(range(graph.n_nodes))
    for tt, s in zip(*np.nonzero(a_norm)):
        g.add_edge(int(s), int(tt))
    w = graph.logit_weights().numpy()
    total = w[t]
    for li in graph.logit_indices:
        if li != t:
            for path in nx.all_simple_paths(g, t, li):
                total += w[li] * math.prod(a_norm[path[k + 1], path[k]] for k in range(len(path) - 1))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_equals_sum_over_explicit_paths(seed):
    graph = random_dag_graph(seed)
    expected = brute_force_influence(graph)
    series = compute_node_influence(graph.adjacency, graph.logit_weights())
    solved = compute_influence(normalize_matrix(graph.adjacency), graph.logit_weights(), method="solve")
    np.testing.assert_allclose(series.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(solved.numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(graph.influence().numpy(), expected, rtol=1e-10, atol=1e-12)


def chain_graph() -> AttributionGraph:
    """emb -> f1 -> f2 -> logit and emb -> logit, with closed-form influences."""
    nodes = [NodeInfo(Node("embed", -1, 0), token_id=7), NodeInfo(Node("feature", 0, 0, 1)),
             NodeInfo(Node("feature", 1, 0, 2)), NodeInfo(Node("logit", 2, 0, 9))]
    edges = [("embed/L-1/P0", "feature/L0/I1/P0", 1.0), ("feature/L0/I1/P0", "feature/L1/I2/P0", -2.0),
             ("feature/L1/I2/P0", "logit/L2/I9/P0", 3.0), ("embed/L-1/P0", "logit/L2/I9/P0", 1.0)]
    return AttributionGraph.from_edges(nodes, edges, logit_probabilities={"logit/L2/I9/P0": 1.0}, n_layers=2,
                                       prompt="x", prompt_tokens=["x"], prompt_token_ids=[7])


def test_influence_closed_form_on_chain():
    g = chain_graph()
    # logit row shares: f2 3/4, emb 1/4; f2 <- f1 (1), f1 <- emb (1)
    np.testing.assert_allclose(g.influence().numpy(), [1.0, 0.75, 0.75, 0.0])
    np.testing.assert_allclose(cumulative_scores(g.influence()).numpy(), [1 / 2.5, 1.75 / 2.5, 1.0, 1.0])


def test_edge_scores_match_path_enumeration_and_conserve_flow():
    graph = random_dag_graph(3)
    w = graph.logit_weights()
    scores = compute_edge_influence(graph.adjacency, w).numpy()
    a_norm = normalize_matrix(graph.adjacency).numpy()
    for t, s in zip(*np.nonzero(a_norm)):
        assert scores[t, s] == pytest.approx(a_norm[t, s] * brute_force_paths_from(graph, a_norm, t), rel=1e-10)
    # the scores of a node's outgoing edges add up to its influence
    np.testing.assert_allclose(scores.sum(0), graph.influence().numpy(), rtol=1e-10, atol=1e-12)


def test_find_threshold_matches_sorted_prefix():
    rng = np.random.default_rng(5)
    scores = rng.exponential(size=200)
    order = np.sort(scores)[::-1]
    for thr in (0.0, 0.3, 0.8, 0.98, 1.0):
        k = next(i for i in range(len(order)) if order[: i + 1].sum() >= thr * order.sum() - 1e-12)
        cut = find_threshold(torch.tensor(scores), thr)
        assert cut == order[k]
        assert (scores >= cut).sum() == k + 1
    # zeros never count, even at threshold 1.0; nothing positive -> keep nothing
    assert find_threshold(torch.tensor([0.5, 0.25, 0.0, 0.0]), 1.0) == 0.25
    assert find_threshold(torch.zeros(4), 0.8) == math.inf


@pytest.mark.parametrize("seed", [0, 4, 7])
def test_prune_graph_keeps_minimal_influence_set_and_is_consistent(seed):
    graph = random_dag_graph(seed, n_layers=4, feats_per_layer=4)
    res = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    infl = brute_force_influence(graph)
    kinds = np.array([nd.kind for nd in graph.nodes])
    always = np.isin(kinds, ["embedding", "logit"])
    droppable = infl[~always]  # the share is taken over the nodes pruning may drop
    order = np.sort(droppable[droppable > 0])[::-1]
    k = int(np.searchsorted(np.cumsum(order) / order.sum(), 0.8 - 1e-12))
    oracle = infl >= order[k]
    keep = res.node_mask.numpy()
    assert keep[always].all()
    assert not (keep & ~(oracle | always)).any(), "kept a node outside the influence threshold set"
    em = res.edge_mask.numpy()
    assert not (em & (graph.adjacency.numpy() == 0)).any(), "kept an edge that does not exist"
    assert not (em & ~(keep[:, None] & keep[None, :])).any(), "kept an edge touching a pruned node"
    for i in np.flatnonzero(keep):
        if kinds[i] in ("intermediate", "error"):
            assert em[:, i].any(), f"kept node {graph.nodes[i].id} has no outgoing edge"
        if kinds[i] == "intermediate":
            assert em[i].any(), f"kept node {graph.nodes[i].id} has no incoming edge"
    np.testing.assert_allclose(res.node_influence.numpy(), infl, rtol=1e-10, atol=1e-12)


def test_edge_threshold_one_keeps_every_real_edge_between_kept_nodes():
    graph = random_dag_graph(2)
    res = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    keep = res.node_mask
    scores = res.edge_scores
    expected = (scores > 0) & keep[:, None] & keep[None, :]
    assert torch.equal(res.edge_mask, expected)


def test_top_n_and_absolute_thresholds():
    graph = random_dag_graph(1, n_layers=4, feats_per_layer=4)
    infl = graph.influence()
    cand = graph.kind_mask("intermediate", "error")
    res = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0, top_n=3)
    kept = res.node_mask & cand
    assert int(kept.sum()) <= 3
    top3 = set(torch.argsort(torch.where(cand, infl, -torch.ones_like(infl)), descending=True)[:3].tolist())
    assert set(kept.nonzero().flatten().tolist()) <= top3
    thr = float(infl[cand].median())
    res = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0, min_node_influence=thr)
    assert (infl[res.node_mask & cand] >= thr).all()
    res = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0, min_edge_score=0.01)
    assert (res.edge_scores[res.edge_mask] >= 0.01).all()


def test_chain_prunes_to_expected_circuit():
    g = chain_graph()
    res = prune_graph(g, node_threshold=0.5, edge_threshold=0.98)
    # influences 1.0 (emb), .75, .75 of total 2.5: 0.5 share needs emb + one .75 node; ties keep both
    assert res.node_mask.tolist() == [True, True, True, True]
    res = prune_graph(g, node_threshold=0.0, edge_threshold=0.5)
    # the share is taken over the droppable nodes (the two features, tied at .75): the top one passes, ties keep both
    assert res.node_mask.tolist() == [True, True, True, True]
    res = prune_graph(g, node_threshold=1.0, edge_threshold=0.5, min_node_influence=0.8)
    # features below the absolute cut are dropped; the embedding and logit always stay
    assert res.node_mask.tolist() == [True, False, False, True]
    assert res.edge_mask.nonzero().tolist() == [[3, 0]]


def test_bad_inputs_raise():
    g = chain_graph()
    with pytest.raises(ValueError, match="node_threshold"):
        prune_graph(g, node_threshold=1.5)
    with pytest.raises(ValueError, match="edge_threshold"):
        prune_graph(g, edge_threshold=-0.1)
    with pytest.raises(ValueError, match="top_n"):
        prune_graph(g, top_n=-1)
    nodes = g.nodes
    with pytest.raises(GraphError, match="shape"):
        AttributionGraph(nodes=nodes, adjacency=torch.zeros(3, 3), logit_indices=[3], logit_probabilities=[1.0])
    with pytest.raises(GraphError, match="not a logit"):
        AttributionGraph(nodes=nodes, adjacency=torch.zeros(4, 4), logit_indices=[1], logit_probabilities=[1.0])
    with pytest.raises(GraphError, match="unique"):
        AttributionGraph(nodes=nodes + [nodes[0]], adjacency=torch.zeros(5, 5), logit_indices=[3],
                         logit_probabilities=[1.0])
    with pytest.raises(GraphError, match="NaN"):
        AttributionGraph(nodes=nodes, adjacency=torch.full((4, 4), float("nan")), logit_indices=[3],
                         logit_probabilities=[1.0])
    cyc = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(GraphError, match="acyclic"):
        compute_influence(cyc, torch.tensor([1.0, 0.0]))
    with pytest.raises(GraphError, match="cycle"):
        compute_influence(cyc, torch.tensor([1.0, 0.0]), method="solve")


def test_subgraph_and_networkx_agree_with_adjacency():
    graph = random_dag_graph(0)
    res = prune_graph(graph)
    sub = graph.subgraph(res.node_mask, res.edge_mask)
    g = graph.to_networkx(res.edge_mask & res.node_mask[:, None] & res.node_mask[None, :])
    gs = sub.to_networkx()
    assert set(gs.edges) == set(g.edges)
    for s, t, d in gs.edges(data=True):
        assert d["weight"] == float(graph.adjacency[graph.index(t), graph.index(s)])
    assert set(gs.nodes) == {graph.nodes[i].id for i in res.node_mask.nonzero().flatten().tolist()}
