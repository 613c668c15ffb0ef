"""Attribution: ``Scores``, exact activation patching, attribution patching, integrated gradients and causal
tracing, and the attribution graphs that run the model: component graphs by EAP / EAP-IG (:mod:`.component_graph`)
and transcoder feature graphs (:mod:`.feature_graph`, circuit-tracer's approach). Every method returns
:class:`Scores` over :class:`~circuit_discovery.nodes.Node` objects, or an
:class:`~circuit_discovery.graph.AttributionGraph`. :mod:`.inputs` holds the clean/corrupted inputs and run
plumbing that the graph builders and the validation package share.

The function ``feature_graph`` is not re-exported here: it would shadow its module,
``circuit_discovery.attribution.feature_graph`` (import it from there).
"""
from circuit_discovery.attribution.attribution_patching import attribution_patching
from circuit_discovery.attribution.causal_tracing import CausalTrace, causal_tracing, default_window, token_classes
from circuit_discovery.attribution.component_graph import (
    ComponentCircuitResult,
    component_circuit,
    component_edge_scores,
    component_graphs,
)
from circuit_discovery.attribution.feature_graph import (
    FeatureCircuitResult,
    FeatureGraphResult,
    feature_circuit,
    graph_scores,
)
from circuit_discovery.attribution.inputs import (
    PairInputs,
    cached_run,
    check_pairs,
    embedding_std,
    noise_hook,
    subject_embedding_std,
)
from circuit_discovery.attribution.integrated_gradients import (
    approximation_parameters,
    integrated_gradients,
    integrated_gradients_fn,
    layer_integrated_gradients,
)
from circuit_discovery.attribution.patching import Patch, activation_patching, node_patches, patch_runs, window_layers
from circuit_discovery.attribution.scores import Scores
from circuit_discovery.nodes import COMPONENT_HOOKS, COMPONENTS, Node

__all__ = [
    "COMPONENTS", "COMPONENT_HOOKS", "CausalTrace", "ComponentCircuitResult", "FeatureCircuitResult",
    "FeatureGraphResult", "Node", "PairInputs", "Patch", "Scores", "activation_patching", "approximation_parameters",
    "attribution_patching", "cached_run", "causal_tracing", "check_pairs", "component_circuit",
    "component_edge_scores", "component_graphs", "default_window", "embedding_std", "feature_circuit", "graph_scores",
    "integrated_gradients", "integrated_gradients_fn", "layer_integrated_gradients", "node_patches", "noise_hook",
    "patch_runs", "subject_embedding_std", "token_classes", "window_layers",
]
