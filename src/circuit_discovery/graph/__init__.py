"""Attribution graphs, influence pruning, circuits, Neuronpedia export and supernodes.

Model-independent: everything here works on plain tensors and node descriptions produced by
``circuit_discovery.attribution`` (or any other source).
"""
from circuit_discovery.graph.circuit import (
    Circuit,
    CircuitEdge,
    CircuitNode,
    attribution_share,
    combine_graphs,
    read_circuits_json,
    write_circuits_json,
)
from circuit_discovery.graph.graph import FEATURE_TYPES, AttributionGraph, GraphError, NodeInfo, node_kind, role_key
from circuit_discovery.graph.neuronpedia import (
    default_schema_path,
    load_graph_schema,
    neuronpedia_node,
    to_neuronpedia,
    validate_neuronpedia,
    write_neuronpedia_json,
)
from circuit_discovery.graph.prune import (
    PruneResult,
    compute_edge_influence,
    compute_influence,
    compute_node_influence,
    cumulative_scores,
    find_threshold,
    normalize_matrix,
    prune_graph,
)
from circuit_discovery.graph.supernodes import Supernode, find_supernodes, label_group, node_distances, supernodes_to_qparams

__all__ = [
    "AttributionGraph", "Circuit", "CircuitEdge", "CircuitNode", "FEATURE_TYPES", "GraphError", "NodeInfo",
    "PruneResult", "Supernode", "attribution_share", "combine_graphs", "compute_edge_influence",
    "compute_influence", "compute_node_influence", "cumulative_scores", "default_schema_path",
    "find_supernodes", "find_threshold", "label_group", "load_graph_schema", "neuronpedia_node",
    "node_distances", "node_kind", "normalize_matrix", "prune_graph", "read_circuits_json", "role_key",
    "supernodes_to_qparams", "to_neuronpedia", "validate_neuronpedia", "write_circuits_json",
    "write_neuronpedia_json",
]
