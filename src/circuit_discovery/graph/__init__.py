"""The model-free graph data structure: attribution graphs, influence, pruning, circuits, Neuronpedia export,
supernodes and greedy circuit refinement (:mod:`.refine`, given a metric or an evaluator).

Nothing here runs a model or imports ``circuit_discovery.models``: everything works on plain tensors and
:class:`~circuit_discovery.nodes.Node` descriptions. The graphs are built by the attribution methods that run the
model, :mod:`circuit_discovery.attribution.component_graph` (EAP / EAP-IG component graphs) and
:mod:`circuit_discovery.attribution.feature_graph` (transcoder feature graphs), or from any other source
(:meth:`AttributionGraph.from_edges`).
"""
from circuit_discovery.graph.circuit import (
    Circuit,
    CircuitEdge,
    CircuitNode,
    CircuitValidation,
    attach_validation,
    attribution_share,
    combine_graphs,
    read_circuits_json,
    write_circuits_json,
)
from circuit_discovery.graph.graph import FEATURE_TYPES, AttributionGraph, GraphError, NodeInfo, node_kind, role_key
from circuit_discovery.graph.influence import (
    compute_edge_influence,
    compute_influence,
    compute_node_influence,
    normalize_matrix,
)
from circuit_discovery.graph.neuronpedia import (
    default_schema_path,
    load_graph_schema,
    neuronpedia_node,
    to_neuronpedia,
    validate_neuronpedia,
    write_neuronpedia_json,
)
from circuit_discovery.graph.prune import PruneResult, cumulative_scores, find_threshold, prune_graph
from circuit_discovery.graph.supernodes import (
    Supernode,
    find_supernodes,
    label_group,
    node_distances,
    supernodes_to_qparams,
)

__all__ = [
    "AttributionGraph", "Circuit", "CircuitEdge", "CircuitNode", "CircuitValidation", "FEATURE_TYPES", "GraphError",
    "NodeInfo", "PruneResult", "Supernode", "attach_validation", "attribution_share", "combine_graphs",
    "compute_edge_influence", "compute_influence", "compute_node_influence", "cumulative_scores", "default_schema_path",
    "find_supernodes", "find_threshold", "label_group", "load_graph_schema", "neuronpedia_node",
    "node_distances", "node_kind", "normalize_matrix", "prune_graph", "read_circuits_json", "role_key",
    "supernodes_to_qparams", "to_neuronpedia", "validate_neuronpedia", "write_circuits_json",
    "write_neuronpedia_json",
]
