"""Supernodes: planted groups of nodes with shared attribution profiles are recovered."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circuit_discovery.graph import (
    AttributionGraph,
    GraphError,
    NodeInfo,
    find_supernodes,
    label_group,
    default_schema_path,
    node_distances,
    to_neuronpedia,
    validate_neuronpedia,
)
from circuit_discovery.nodes import Node

SCHEMA_PATH = default_schema_path()  # the copy shipped as package data
N_TARGETS = 30


def planted_graph(seed: int = 0, same_profile_b: bool = False):
    """Features whose outgoing columns are noisy copies of a group's base profile.

    Groups: A (4 features @ position 3), B (3 @ 3), C (3 @ 4); decoys: one feature @ 4 with A's profile
    (wrong position), two features @ 3 with random profiles. Targets are ``N_TARGETS`` logit nodes.
    Returns ``(graph, groups, decoder)`` with groups as sets of node ids and decoder ``{id: vector}``.
    """
    rng = np.random.default_rng(seed)
    base = {g: rng.normal(size=N_TARGETS) for g in "ABCR"}
    if same_profile_b:
        base["B"] = base["A"]
    dec_base = {g: rng.normal(size=16) for g in "ABCDR"}
    plan = [("A", 3, "capital city Paris")] * 4 + [("B", 3, "French country")] * 3 + [("C", 4, "river Seine")] * 3
    plan += [("D", 4, "decoy capital"), ("R", 3, "noise one"), ("R", 3, "noise two")]
    feats, groups, decoder = [], {}, {}
    for k, (g, pos, label) in enumerate(plan):
        info = NodeInfo(Node("feature", 1 + k % 2, pos, k), label=f"{label} {k}", activation=1.0)
        feats.append((info, g))
    logits = [NodeInfo(Node("logit", 3, 5, 1000 + t)) for t in range(N_TARGETS)]
    nodes = [NodeInfo(Node("embed", -1, p), token_id=p) for p in range(6)] + [f for f, _ in feats] + logits
    n = len(nodes)
    adj = np.zeros((n, n))
    first_logit = n - N_TARGETS
    for j, (info, g) in enumerate(feats):
        col = 6 + j
        prof = base["A" if g == "D" else g] if g != "R" else rng.normal(size=N_TARGETS)
        adj[first_logit:, col] = prof * rng.uniform(0.5, 2.0) + 0.05 * rng.normal(size=N_TARGETS)
        adj[col, info.node.position] = 1.0  # fed by its position's embedding
        d = dec_base["A" if g == "D" else g] if g != "R" else rng.normal(size=16)
        decoder[info.id] = d + 0.05 * rng.normal(size=16)
        if g in "ABC":
            groups.setdefault(g, set()).add(info.id)
    graph = AttributionGraph(nodes=nodes, adjacency=torch.tensor(adj),
                             logit_indices=list(range(first_logit, n)),
                             logit_probabilities=torch.full((N_TARGETS,), 1.0 / N_TARGETS), n_layers=3,
                             prompt="p", prompt_tokens=[f"t{i}" for i in range(6)],
                             prompt_token_ids=list(range(6)))
    return graph, groups, decoder


def test_planted_groups_are_recovered_by_attribution_profile():
    graph, groups, _ = planted_graph(0)
    found = find_supernodes(graph, distance_threshold=0.3)
    assert {frozenset(s.node_ids) for s in found} == {frozenset(g) for g in groups.values()}
    assert [len(s.node_ids) for s in found] == [4, 3, 3]
    assert found[0].label == "capital / city / paris"


@pytest.mark.parametrize("method", ["average", "complete", "single"])
def test_wrong_position_never_joins_even_with_identical_profile(method):
    graph, groups, decoder = planted_graph(1)
    found = find_supernodes(graph, decoder_directions=decoder, distance_threshold=0.3, method=method)
    decoy = next(n.id for n in graph.nodes if n.label.startswith("decoy"))
    assert all(decoy not in s.node_ids for s in found)
    assert {frozenset(s.node_ids) for s in found} == {frozenset(g) for g in groups.values()}
    # with positions ignored the decoy joins A (same profile and decoder)
    loose = find_supernodes(graph, decoder_directions=decoder, distance_threshold=0.3, group_by="any")
    assert frozenset(groups["A"] | {decoy}) in {frozenset(s.node_ids) for s in loose}


def test_decoder_directions_separate_groups_with_equal_profiles():
    graph, groups, decoder = planted_graph(2, same_profile_b=True)
    merged = find_supernodes(graph, decoder_directions=decoder, alpha=0.0, distance_threshold=0.3)
    assert frozenset(groups["A"] | groups["B"]) in {frozenset(s.node_ids) for s in merged}
    split = find_supernodes(graph, decoder_directions=decoder, alpha=0.7, distance_threshold=0.3)
    assert {frozenset(s.node_ids) for s in split} == {frozenset(g) for g in groups.values()}


def test_distances_match_cosine_definition():
    graph, _, decoder = planted_graph(3)
    idx = [6, 7, 10]
    ids = [graph.nodes[i].id for i in idx]
    dec = np.stack([decoder[i] for i in ids])
    d = node_distances(graph, idx, dec, alpha=0.25)
    cols = graph.adjacency.numpy()[:, idx].T

    def cos(u, v):
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    for a in range(3):
        for b in range(3):
            exp = 0.0 if a == b else 0.25 * (1 - cos(dec[a], dec[b])) + 0.75 * (1 - cos(cols[a], cols[b]))
            assert d[a, b] == pytest.approx(exp, abs=1e-12)


def test_label_group_picks_most_common_words():
    assert label_group(["Paris capital city", "capital of France", "the capital"]) == "capital"
    assert label_group(["France country", "French country", "country France"]) == "country / france"
    assert label_group(["", ""]) == "group"
    assert label_group(["L3.F12 @ ' Paris'", "L4.F9 @ ' Paris'"]) == "paris"


def test_bad_inputs_raise():
    graph, _, _ = planted_graph(0)
    with pytest.raises(ValueError, match="group_by"):
        find_supernodes(graph, group_by="layer")
    with pytest.raises(ValueError, match="linkage"):
        find_supernodes(graph, method="ward")
    with pytest.raises(GraphError, match="decoder_directions"):
        find_supernodes(graph, decoder_directions=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="alpha"):
        node_distances(graph, [6, 7], np.zeros((2, 3)), alpha=2.0)


def test_supernodes_export_to_neuronpedia_qparams():
    graph, groups, _ = planted_graph(0)
    found = find_supernodes(graph)
    data = to_neuronpedia(graph, "planted", "m", node_threshold=1.0, edge_threshold=1.0, supernodes=found)
    validate_neuronpedia(data, json.loads(SCHEMA_PATH.read_text()))
    qs = data["qParams"]["supernodes"]
    assert [q[0] for q in qs] == [s.label for s in found]
    by_np = {n["node_id"]: n for n in data["nodes"]}
    for q, s in zip(qs, found):
        assert len(q) == len(s.node_ids) + 1
        assert {by_np[i]["ctx_idx"] for i in q[1:]} == {graph.nodes[graph.index(s.node_ids[0])].ctx_idx}
