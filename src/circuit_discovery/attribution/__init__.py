"""Attribution: nodes, ``Scores``, exact activation patching, attribution patching, integrated gradients and
causal tracing. Every method returns :class:`Scores` over :class:`Node` objects."""
from ._common import PairInputs, embedding_std
from .attribution_patching import attribution_patching
from .causal_tracing import CausalTrace, causal_tracing, default_window, plot_causal_trace, token_classes
from .integrated_gradients import (approximation_parameters, integrated_gradients, integrated_gradients_fn,
                                   layer_integrated_gradients)
from .nodes import COMPONENT_HOOKS, COMPONENTS, Node
from .patching import Patch, activation_patching, node_patches, patch_runs, window_layers
from .scores import Scores

__all__ = [
    "COMPONENTS", "COMPONENT_HOOKS", "CausalTrace", "Node", "PairInputs", "Patch", "Scores",
    "activation_patching", "approximation_parameters", "attribution_patching", "causal_tracing", "default_window",
    "embedding_std", "integrated_gradients", "integrated_gradients_fn", "layer_integrated_gradients",
    "node_patches", "patch_runs", "plot_causal_trace", "token_classes", "window_layers",
]
