"""Reports of a run: PNG figures, ``report.md`` and the offline ``index.html`` viewer.

This package reads results only (plain dicts, numpy arrays, JSON files); it never imports the model
or any torch code.
"""
from circuit_discovery.report.figures import (
    FigureInputError,
    causal_tracing_figure,
    circuit_drawing,
    faithfulness_curves,
    head_heatmap,
    metric_bars,
    overlap_matrix,
    patching_heatmap,
    sae_metrics_per_layer,
)
from circuit_discovery.report.markdown import ReportInputError, write_report
from circuit_discovery.report.viewer import ViewerInputError, write_viewer

__all__ = [
    "FigureInputError",
    "ReportInputError",
    "ViewerInputError",
    "causal_tracing_figure",
    "circuit_drawing",
    "faithfulness_curves",
    "head_heatmap",
    "metric_bars",
    "overlap_matrix",
    "patching_heatmap",
    "sae_metrics_per_layer",
    "write_report",
    "write_viewer",
]
