"""Static PNG figures for reports.

Every function takes plain numpy arrays / pandas objects / dicts and an output path, draws with
matplotlib's Agg canvas (no pyplot state, no display needed), writes the PNG atomically
(temporary file + ``os.replace``) and returns the written :class:`pathlib.Path`.

Conventions
-----------
* Signed scores (patching effects, attributions) use a diverging colour map centred at 0 with
  symmetric limits ``[-max|x|, +max|x|]`` so white always means "no effect".
* NaN cells are drawn in light grey ("not computed").
* Bad input raises :class:`FigureInputError` (a ``ValueError``) with a message naming the argument.
* Numbers a figure prints as text (the overlap matrix's cells) are also stored in the PNG as a ``tEXt`` chunk
  :data:`VALUES_KEY` (JSON), so that a test can check them against the tables that show the same numbers
  (:func:`shown_values` reads them back).
* Node labels of :func:`circuit_drawing` are placed by collision avoidance (:func:`place_labels`): no two labels
  overlap, none leaves the axes (the legend sits outside them), none covers another node where a free spot exists.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch
from matplotlib.transforms import ScaledTranslation

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.io import atomic_write_bytes

__all__ = [
    "FigureInputError",
    "VALUES_KEY",
    "shown_values",
    "place_labels",
    "circuit_figure",
    "ROLE_ORDER",
    "patching_heatmap",
    "head_heatmap",
    "causal_tracing_figure",
    "circuit_drawing",
    "faithfulness_curves",
    "sae_metrics_per_layer",
    "overlap_matrix",
    "metric_bars",
]

#: Token roles in prompt order (see docs/ARCHITECTURE.md); unknown roles are appended after these.
ROLE_ORDER = ("bos", "subject_first", "subject_middle", "subject_last", "relation_first", "relation", "last")

COMPONENT_COLOURS = {
    "embed": "#7f7f7f",
    "resid_pre": "#bcbd22",
    "resid_mid": "#bcbd22",
    "resid_post": "#bcbd22",
    "attn_out": "#d62728",
    "head": "#ff7f0e",
    "mlp_out": "#2ca02c",
    "neuron": "#17becf",
    "feature": "#9467bd",
    "error": "#8c564b",
    "logit": "#1f77b4",
}
_NAN_COLOUR = "#d9d9d9"
_DPI = 120


class FigureInputError(CircuitDiscoveryError, ValueError):
    """A figure function got data of the wrong shape, type or range."""


# --------------------------------------------------------------------------------------------- helpers


#: the PNG ``tEXt`` key under which a figure stores the numbers it prints (JSON)
VALUES_KEY = "circuit_discovery:values"


def _save(fig: Figure, path: str | os.PathLike, *, dpi: int = _DPI, tight: bool = True,
          values: Any = None) -> Path:
    """Render ``fig`` to PNG bytes with the Agg canvas and write them atomically (``tight``: crop to the
    drawn area). ``values`` (JSON-able): the numbers the figure prints, stored under :data:`VALUES_KEY`."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    metadata = None if values is None else {VALUES_KEY: json.dumps(values, ensure_ascii=True)}
    with warnings.catch_warnings():  # token text in scripts the font lacks is drawn as boxes, silently
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata=metadata)
    return atomic_write_bytes(path, buf.getvalue())


def shown_values(path: str | os.PathLike) -> Any:
    """The numbers a PNG written here prints (its :data:`VALUES_KEY` chunk, parsed), or ``None`` if it has none.
    Reads the PNG's chunks directly (no image decoding)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise FigureInputError(f"{path} is not a PNG file")
    i = 8
    while i + 8 <= len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            if key.decode("latin-1") == VALUES_KEY:
                return json.loads(text.decode("latin-1"))
        if kind == b"IEND":
            break
        i += 12 + n
    return None


def _as_2d(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(getattr(x, "values", x), dtype=float)
    except (TypeError, ValueError) as exc:
        raise FigureInputError(f"{name} must be numeric, got {type(x).__name__}: {exc}") from exc
    if arr.ndim != 2:
        raise FigureInputError(f"{name} must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        raise FigureInputError(f"{name} is empty (shape {arr.shape})")
    return arr


def _symmetric_norm(*arrays: np.ndarray) -> Normalize:
    finite = [a[np.isfinite(a)] for a in arrays]
    m = max((float(np.abs(f).max()) for f in finite if f.size), default=0.0)
    if m == 0.0:
        m = 1.0
    return Normalize(vmin=-m, vmax=m)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=_NAN_COLOUR)


def _tick_step(n: int, max_ticks: int = 30) -> int:
    return max(1, math.ceil(n / max_ticks))


def _fmt_token(tok: Any) -> str:
    s = str(tok)
    return s.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


def _heatmap(
    ax,
    data: np.ndarray,
    cmap: str,
    norm: Normalize,
):
    return ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=_cmap(cmap), norm=norm,
                     interpolation="nearest", origin="lower")


# --------------------------------------------------------------------------------------------- heatmaps


def patching_heatmap(
    scores: Any,
    tokens: Sequence[str],
    title: str,
    path: str | os.PathLike,
    *,
    cmap: str = "RdBu_r",
    colorbar_label: str = "patching effect (normalised metric)",
    layer_labels: Sequence[str] | None = None,
) -> Path:
    """Activation-patching effect per (layer, token position).

    Args:
        scores: ``[n_layers, n_pos]`` effect of patching each layer at each position.
        tokens: ``n_pos`` token strings, used as x tick labels.
        title: figure title.
        path: PNG output path.
        cmap: diverging colour map; the colour scale is centred at 0 with symmetric limits.
        layer_labels: optional ``n_layers`` y tick labels (default ``0 .. n_layers-1``).
    """
    data = _as_2d(scores, "scores")
    n_layers, n_pos = data.shape
    tokens = [_fmt_token(t) for t in tokens]
    if len(tokens) != n_pos:
        raise FigureInputError(f"tokens has {len(tokens)} entries but scores has {n_pos} positions")
    if layer_labels is not None and len(layer_labels) != n_layers:
        raise FigureInputError(f"layer_labels has {len(layer_labels)} entries, scores has {n_layers} layers")
    fig = Figure(figsize=(max(5.0, 0.45 * n_pos + 2.5), max(3.5, 0.22 * n_layers + 2.0)))
    ax = fig.add_subplot()
    im = _heatmap(ax, data, cmap, _symmetric_norm(data))
    ax.set_xticks(range(n_pos), [f"{t}" for t in tokens], rotation=60, ha="right", fontsize=8)
    step = _tick_step(n_layers)
    ys = list(range(0, n_layers, step))
    ax.set_yticks(ys, [str(layer_labels[i]) if layer_labels is not None else str(i) for i in ys])
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=colorbar_label, fraction=0.046, pad=0.03)
    return _save(fig, path)


def head_heatmap(
    scores: Any,
    title: str,
    path: str | os.PathLike,
    *,
    cmap: str = "RdBu_r",
    colorbar_label: str = "effect",
    annotate_top: int = 5,
) -> Path:
    """Per-attention-head scores.

    Args:
        scores: ``[n_layers, n_heads]``.
        title: figure title.
        path: PNG output path.
        annotate_top: write the value into the ``annotate_top`` cells with largest ``|score|``.
    """
    data = _as_2d(scores, "scores")
    n_layers, n_heads = data.shape
    fig = Figure(figsize=(max(4.5, 0.4 * n_heads + 2.5), max(3.5, 0.25 * n_layers + 1.8)))
    ax = fig.add_subplot()
    norm = _symmetric_norm(data)
    im = _heatmap(ax, data, cmap, norm)
    ax.set_xticks(range(0, n_heads, _tick_step(n_heads)))
    ax.set_yticks(range(0, n_layers, _tick_step(n_layers)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if annotate_top > 0:
        flat = np.where(np.isfinite(data), np.abs(data), -np.inf).ravel()
        k = min(annotate_top, int(np.isfinite(flat).sum()))
        for idx in np.argsort(-flat, kind="stable")[:k]:
            layer, head = divmod(int(idx), n_heads)
            v = data[layer, head]
            colour = "white" if abs(norm(v) - 0.5) > 0.3 else "black"
            ax.text(head, layer, f"{v:.2g}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(im, ax=ax, label=colorbar_label, fraction=0.046, pad=0.03)
    return _save(fig, path)


def causal_tracing_figure(
    states: Any,
    mlp: Any,
    attn: Any,
    row_labels: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    subject_rows: Sequence[int] | None = None,
    colorbar_label: str = "indirect effect",
    layer_offset: int = 0,
) -> Path:
    """Causal-tracing triptych in the style of ROME (Meng et al. 2022), figure 1.

    Three heatmaps side by side -- restoring the hidden state (residual stream), the MLP output and
    the attention output -- each ``[n_rows, n_layers]`` where rows are token positions (or token
    classes such as "first subject token", "last subject token", "further tokens", "last token").

    Args:
        states, mlp, attn: ``[n_rows, n_layers]`` indirect effects (e.g. recovered answer
            probability, or the normalised recovered metric).
        row_labels: ``n_rows`` labels (tokens or classes).
        subject_rows: rows to mark with ``*`` as subject tokens.
        layer_offset: first layer number on the x axis.
    """
    panels = [("hidden state (residual)", "Purples", _as_2d(states, "states")),
              ("MLP output", "Greens", _as_2d(mlp, "mlp")),
              ("attention output", "Reds", _as_2d(attn, "attn"))]
    shape = panels[0][2].shape
    for name, _, arr in panels[1:]:
        if arr.shape != shape:
            raise FigureInputError(f"all three panels must share a shape; states is {shape}, {name} is {arr.shape}")
    n_rows, n_layers = shape
    if len(row_labels) != n_rows:
        raise FigureInputError(f"row_labels has {len(row_labels)} entries, the panels have {n_rows} rows")
    marks = set(subject_rows or ())
    bad = [r for r in marks if not 0 <= r < n_rows]
    if bad:
        raise FigureInputError(f"subject_rows {bad} out of range for {n_rows} rows")
    labels = [_fmt_token(lbl) + ("*" if i in marks else "") for i, lbl in enumerate(row_labels)]

    fig = Figure(figsize=(3 * max(3.2, 0.12 * n_layers + 2.2) + 1.5, max(2.8, 0.32 * n_rows + 1.6)),
                 layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for j, (ax, (name, cmap, arr)) in enumerate(zip(axes, panels)):
        finite = arr[np.isfinite(arr)]
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        if hi <= lo:
            hi = lo + 1.0
        im = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", cmap=_cmap(cmap),
                       norm=Normalize(lo, hi), interpolation="nearest")
        ax.set_title(f"Impact of restoring {name}", fontsize=10)
        step = _tick_step(n_layers, 12)
        xs = list(range(0, n_layers, step))
        ax.set_xticks(xs, [str(x + layer_offset) for x in xs])
        ax.set_xlabel("single restored layer")
        if j == 0:
            ax.set_yticks(range(n_rows), labels, fontsize=8)
        fig.colorbar(im, ax=ax, label=colorbar_label, shrink=0.85)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def overlap_matrix(
    names: Sequence[str],
    matrix: Any,
    path: str | os.PathLike,
    *,
    title: str = "Circuit overlap",
    colorbar_label: str = "overlap (Jaccard)",
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    fmt: str = ".2f",
) -> Path:
    """Annotated square matrix, e.g. pairwise node-set overlap between relation circuits.

    Args:
        names: ``n`` row/column labels.
        matrix: ``[n, n]`` values; each cell is annotated with its value (``fmt``).
    """
    data = _as_2d(matrix, "matrix")
    n = len(names)
    if data.shape != (n, n):
        raise FigureInputError(f"matrix must be {n}x{n} to match names, got {data.shape}")
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1.0
    norm = Normalize(lo, hi)
    size = max(4.0, 0.6 * n + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    cm = _cmap(cmap)
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, norm=norm, interpolation="nearest")
    labels = [_fmt_token(s) for s in names]
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title(title)
    cells: list[list[str]] = [[""] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            v = data[i, j]
            if not np.isfinite(v):
                t = ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="black")
            else:
                r, g, b, _ = cm(norm(v))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                t = ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color=colour)
            cells[i][j] = t.get_text()  # what the figure prints, read back from the drawn text
    fig.colorbar(im, ax=ax, label=colorbar_label, fraction=0.046, pad=0.04)
    return _save(fig, path, values={"kind": "matrix", "quantity": colorbar_label, "rows": [str(x) for x in names],
                                    "cols": [str(x) for x in names], "cells": cells})


# --------------------------------------------------------------------------------------------- curves and bars


def faithfulness_curves(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    *,
    title: str = "Faithfulness vs. circuit size",
    xlabel: str = "fraction of nodes kept (log scale)",
    ylabel: str = "faithfulness",
) -> Path:
    """Faithfulness ``f`` as a function of the kept fraction, one line per method/relation.

    Args:
        curves: ``{name: (fractions [n], f [n])}``. The x axis is logarithmic, so points with
            ``fraction <= 0`` are dropped; a name with no positive fraction raises.
    A dashed reference line marks ``f = 1`` (the full model) and a dotted one ``f = 0``.
    """
    if not curves:
        raise FigureInputError("curves is empty")
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for name, pair in curves.items():
        try:
            xs, ys = pair
        except (TypeError, ValueError) as exc:
            raise FigureInputError(f"curve {name!r} must be a (fractions, f) pair") from exc
        x = np.asarray(xs, dtype=float).ravel()
        y = np.asarray(ys, dtype=float).ravel()
        if x.shape != y.shape:
            raise FigureInputError(f"curve {name!r}: fractions has {x.size} points, f has {y.size}")
        keep = np.isfinite(x) & (x > 0)
        if not keep.any():
            raise FigureInputError(f"curve {name!r} has no positive fraction to draw on a log axis")
        order = np.argsort(x[keep], kind="stable")
        ax.plot(x[keep][order], y[keep][order], marker="o", markersize=3, linewidth=1.6, label=str(name))
    ax.set_xscale("log")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="full model (f = 1)")
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


#: The transcoder / SAE quality bar drawn as dashed lines by :func:`sae_metrics_per_layer`.
SAE_QUALITY_BAR = {"explained_variance": 0.8, "ce_loss_score": 0.85, "dead_fraction": 0.1, "l0": 64}


def sae_metrics_per_layer(
    metrics: Mapping[Any, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    names: Sequence[str] = ("explained_variance", "ce_loss_score", "dead_fraction", "l0"),
) -> Path:
    """One panel per metric (SAELens names such as ``l0``, ``explained_variance``, ``ce_loss_score``,
    ``dead_fraction``), x = layer; :data:`SAE_QUALITY_BAR` is drawn as a dashed line.

    Args:
        metrics: ``{layer: {metric_name: value}}``; a layer is an int or a hook name ``blocks.{l}.…``
            (e.g. ``sae.evaluate_dictionaries``'s ``layers``). A metric missing for a layer is drawn as a gap.
        names: the metrics to draw, one panel each.
    """
    if not metrics:
        raise FigureInputError("metrics is empty")
    if not names:
        raise FigureInputError("names is empty: pass the metrics to draw")
    layer_of = {}
    for key, row in metrics.items():
        layer_of[key] = _layer_number(key)
        if not isinstance(row, Mapping):
            raise FigureInputError(f"metrics[{key!r}] must be a mapping of metric name to value")
    keys = sorted(metrics, key=layer_of.__getitem__)
    x = [layer_of[k] for k in keys]
    fig = Figure(figsize=(3.2 * len(names), 3))
    FigureCanvasAgg(fig)  # tight_layout needs the canvas's renderer
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        ax.plot(x, [_to_float(metrics[k].get(name)) for k in keys], "o-")
        if name in SAE_QUALITY_BAR:
            ax.axhline(SAE_QUALITY_BAR[name], ls="--", color="gray", lw=1)
        ax.set_title(name)
        ax.set_xlabel("layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi=100, tight=False)


def _layer_number(key: Any) -> int:
    """A layer key: an int, a numeric string or a hook name ``blocks.{l}.…``."""
    if isinstance(key, str):
        m = re.match(r"blocks\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    try:
        return int(key)
    except (TypeError, ValueError) as exc:
        raise FigureInputError(f"metrics keys must be layer numbers or hook names blocks.{{l}}.…, got {key!r}") \
            from exc


def metric_bars(
    values: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str = "",
    ylabel: str = "value",
    errors: Mapping[str, Any] | None = None,
    reference: float | None = None,
) -> Path:
    """Bar chart of scalar metrics.

    Args:
        values: ``{label: value}`` for one series, or ``{group: {series: value}}`` for grouped bars
            (e.g. ``{relation: {"circuit": f, "random": f}}``).
        errors: same structure as ``values`` with half-widths (e.g. 95% CI) for error bars.
        reference: optional horizontal reference line (e.g. 1.0 for faithfulness).
    """
    if not values:
        raise FigureInputError("values is empty")
    groups = list(values)
    nested = all(isinstance(values[g], Mapping) for g in groups)
    if not nested and any(isinstance(values[g], Mapping) for g in groups):
        raise FigureInputError("values must be all scalars or all mappings, not a mix")
    series: list[str] = []
    if nested:
        for g in groups:
            for s in values[g]:
                if s not in series:
                    series.append(s)
    else:
        series = [""]

    def get(src: Mapping | None, g: str, s: str) -> float:
        if src is None or g not in src:
            return float("nan")
        v = src[g]
        if nested:
            return _to_float(v.get(s)) if isinstance(v, Mapping) else float("nan")
        return _to_float(v)

    fig = Figure(figsize=(max(5.0, 0.6 * len(groups) * max(1, len(series)) + 2.0), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, s in enumerate(series):
        ys = np.array([get(values, g, s) for g in groups])
        errs = np.array([get(errors, g, s) for g in groups]) if errors is not None else None
        if errs is not None and not np.isfinite(errs).any():
            errs = None
        offs = x - 0.4 + width * (k + 0.5)
        bars = ax.bar(offs, np.nan_to_num(ys), width=width * 0.92, yerr=errs, capsize=3,
                      label=s if nested else None)
        tops = ys + (np.nan_to_num(errs) if errs is not None else 0.0) * np.sign(np.nan_to_num(ys) + 1e-300)
        for rect, v, top in zip(bars, ys, np.nan_to_num(tops)):
            txt = "—" if not np.isfinite(v) else f"{v:.3g}"
            ax.annotate(txt, (rect.get_x() + rect.get_width() / 2, top),
                        xytext=(0, 2 if rect.get_height() >= 0 else -10), textcoords="offset points",
                        ha="center", fontsize=7)
    ax.set_xticks(x, [_fmt_token(g) for g in groups], rotation=30 if len(groups) > 4 else 0,
                  ha="right" if len(groups) > 4 else "center")
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if nested and len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _to_float(v: Any) -> float:
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------------- circuit


def role_columns(nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Ordered x-axis categories for ``nodes``: known roles in prompt order, then other roles,
    then integer positions as ``"P{pos}"``, then ``"all"`` for nodes with neither."""
    seen = {_column_of(n) for n in nodes}
    known = [r for r in ROLE_ORDER if r in seen]
    pos = sorted((c for c in seen if c.startswith("P") and c[1:].isdigit()), key=lambda c: int(c[1:]))
    other = sorted(c for c in seen if c not in known and c not in pos and c != "all")
    return known + other + pos + (["all"] if "all" in seen else [])


def _column_of(node: Mapping[str, Any]) -> str:
    role = node.get("role")
    if role:
        return str(role)
    pos = node.get("position")
    if isinstance(pos, (int, np.integer)) and not isinstance(pos, bool):
        return f"P{int(pos)}"
    return "all"


def _layer_of(node: Mapping[str, Any], lo: int, hi: int) -> float:
    layer = node.get("layer")
    if isinstance(layer, (int, float, np.integer, np.floating)) and not isinstance(layer, bool):
        return float(layer)
    comp = node.get("component")
    if comp == "embed":
        return float(lo - 1)
    return float(hi + 1)


def circuit_drawing(
    circuit: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    n_labels: int = 12,
    max_edges: int = 400,
    n_arrows: int = 40,
    label_placement: str = "avoid",
) -> Path:
    """Draw one circuit (an entry of ``circuits.json["circuits"]``) to ``path``; see :func:`circuit_figure`."""
    fig = circuit_figure(circuit, title=title, n_labels=n_labels, max_edges=max_edges, n_arrows=n_arrows,
                         label_placement=label_placement)
    return _save(fig, path)


def circuit_figure(
    circuit: Mapping[str, Any],
    *,
    title: str | None = None,
    n_labels: int = 12,
    max_edges: int = 400,
    n_arrows: int = 40,
    label_placement: str = "avoid",
) -> Figure:
    """The :class:`Figure` of one circuit (an entry of ``circuits.json["circuits"]``).

    Layer on the y axis (embeddings at the bottom, logits at the top), token role / position on
    the x axis; nodes in the same (role, layer) cell are spread side by side. Edge width is
    proportional to ``|weight|``, colour blue for positive and red for negative weights; node
    colour encodes the component and area ``|score|``; a node with no edge and a zero (or missing) score is not
    drawn. The ``n_labels`` nodes with the largest
    ``|score|`` are labelled (texts with gid ``"node-label"``), placed by :func:`place_labels`
    (``label_placement="avoid"``) or all at one fixed offset (``"fixed"``: may collide). Only the
    ``max_edges`` strongest edges are drawn, the ``n_arrows`` strongest with arrowheads. The legend
    (gid ``"legend"``) sits outside the axes, on the right.
    """
    if label_placement not in ("avoid", "fixed"):
        raise FigureInputError(f"label_placement must be 'avoid' or 'fixed', got {label_placement!r}")
    if not isinstance(circuit, Mapping):
        raise FigureInputError(f"circuit must be a mapping, got {type(circuit).__name__}")
    nodes = circuit.get("nodes")
    if not isinstance(nodes, Sequence) or isinstance(nodes, (str, bytes)):
        raise FigureInputError("circuit['nodes'] must be a list of node dicts")
    nodes = [n for n in nodes if isinstance(n, Mapping) and "id" in n]
    edges = [e for e in circuit.get("edges") or [] if isinstance(e, Mapping)]
    linked = {str(e.get("source")) for e in edges} | {str(e.get("target")) for e in edges}
    # a node with no edge and no score (e.g. an embedding the pruning keeps) carries nothing: not drawn
    nodes = [n for n in nodes if str(n["id"]) in linked or _to_float(n.get("score")) not in (0.0,)
             and np.isfinite(_to_float(n.get("score")))]
    name = title or f"Circuit: {circuit.get('name', circuit.get('relation', ''))}"

    fig = Figure(figsize=(9.0, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(name)
    if not nodes:
        ax.text(0.5, 0.5, "empty circuit", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig

    int_layers = [int(n["layer"]) for n in nodes if isinstance(n.get("layer"), (int, np.integer))]
    lo, hi = (min(int_layers), max(int_layers)) if int_layers else (0, 0)
    cols = role_columns(nodes)
    col_index = {c: i for i, c in enumerate(cols)}
    cells: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for n in nodes:
        cells.setdefault((_column_of(n), _layer_of(n, lo, hi)), []).append(n)
    pos: dict[str, tuple[float, float]] = {}
    for (col, layer), members in cells.items():
        members = sorted(members, key=lambda m: (str(m.get("component")), str(m.get("index")), str(m["id"])))
        k = len(members)
        for j, m in enumerate(members):
            dx = 0.0 if k == 1 else -0.35 + 0.7 * j / (k - 1)
            pos[str(m["id"])] = (col_index[col] + dx, layer)

    def absval(v: Any) -> float:
        f = _to_float(v)
        return abs(f) if np.isfinite(f) else 0.0

    edges = [e for e in edges if str(e.get("source")) in pos and str(e.get("target")) in pos]
    edges.sort(key=lambda e: -absval(e.get("weight")))
    edges = edges[:max_edges]
    wmax = max((absval(e.get("weight")) for e in edges), default=0.0) or 1.0
    # per edge, strongest first: (source xy, target xy, |w| / max |w|, colour)
    drawn = []
    for e in edges:
        w = _to_float(e.get("weight"))
        frac = absval(w) / wmax
        drawn.append((pos[str(e["source"])], pos[str(e["target"])], frac,
                      to_rgba("#2b6cb0" if not (w < 0) else "#c53030", 0.25 + 0.6 * frac)))
    if drawn:  # one LineCollection (fast for hundreds of edges), strongest drawn last (on top)
        ax.add_collection(LineCollection([[a, b] for a, b, _, _ in drawn[::-1]],
                                         linewidths=[0.4 + 4.0 * f for _, _, f, _ in drawn[::-1]],
                                         colors=[c for _, _, _, c in drawn[::-1]], zorder=1))
    for a, b, frac, colour in drawn[:n_arrows][::-1]:  # arrowheads on the strongest edges show the direction
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=6 + 6 * frac, linewidth=0,
                                     color=colour, shrinkA=5, shrinkB=5, zorder=2))

    smax = max((absval(n.get("score")) for n in nodes), default=0.0) or 1.0
    xs = [pos[str(n["id"])][0] for n in nodes]
    ys = [pos[str(n["id"])][1] for n in nodes]
    sizes = [30 + 300 * absval(n.get("score")) / smax for n in nodes]
    colours = [COMPONENT_COLOURS.get(str(n.get("component")), "#333333") for n in nodes]
    ax.scatter(xs, ys, s=sizes, c=colours, edgecolors="black", linewidths=0.6, zorder=3)

    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_xlim(-0.7, len(cols) - 0.3)
    all_layers = sorted({y for y in ys})
    ticks = [y for y in all_layers]
    if len(ticks) > 25:
        ticks = ticks[:: _tick_step(len(ticks), 25)]
    comps_at: dict[float, set[str]] = {}
    for n, y in zip(nodes, ys):
        comps_at.setdefault(y, set()).add(str(n.get("component")))
    labels = []
    for t in ticks:
        comps = comps_at.get(t, set())
        if comps == {"embed"} or t < lo:
            labels.append("embed")
        elif comps == {"logit"} or t > hi:
            labels.append("logit")
        else:
            labels.append(f"L{int(t)}")
    ax.set_yticks(ticks, labels)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.set_xlabel("token role / position")
    ax.set_ylabel("layer")
    ax.grid(True, alpha=0.15)

    present = [c for c in COMPONENT_COLOURS if any(n.get("component") == c for n in nodes)]
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor=COMPONENT_COLOURS[c],
                      markeredgecolor="black", label=c) for c in present]
    handles += [Line2D([], [], color="#2b6cb0", linewidth=2, label="positive edge"),
                Line2D([], [], color="#c53030", linewidth=2, label="negative edge")]
    legend = ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    legend.set_gid("legend")

    top = sorted(nodes, key=lambda n: -absval(n.get("score")))[:n_labels]
    items = [(pos[str(n["id"])], _fmt_token(n.get("label") or n["id"])) for n in top]
    if label_placement == "fixed":
        for (x, y), label in items:
            _label_text(ax, x, y, label, 6, 5, "left", "bottom", 7)
    else:
        markers = [(pos[str(n["id"])], math.sqrt(s) / 2) for n, s in zip(nodes, sizes)]
        place_labels(ax, items, markers=markers)
    return fig


#: candidate offsets of a label from its node, in points, nearest first: (dx, dy, ha, va)
_DIRECTIONS = ((1, 0.6, "left", "bottom"), (1, -0.6, "left", "top"), (-1, 0.6, "right", "bottom"),
               (-1, -0.6, "right", "top"), (0, 1, "center", "bottom"), (0, -1, "center", "top"),
               (1, 0, "left", "center"), (-1, 0, "right", "center"))
_RADII = (5.0, 10.0, 16.0, 24.0, 34.0, 46.0, 60.0)


def _label_text(ax, x: float, y: float, label: str, dx: float, dy: float, ha: str, va: str, fontsize: float):
    """A node label: a plain :class:`~matplotlib.text.Text` (gid ``"node-label"``) ``(dx, dy)`` points from the
    data point ``(x, y)``."""
    offset = ScaledTranslation(dx / 72.0, dy / 72.0, ax.figure.dpi_scale_trans)
    t = ax.text(x, y, label, transform=ax.transData + offset, ha=ha, va=va, fontsize=fontsize, zorder=4,
                clip_on=False, bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    t.set_gid("node-label")
    return t


def place_labels(ax, items: Sequence[tuple[tuple[float, float], str]],
                 markers: Sequence[tuple[tuple[float, float], float]] = (), *, fontsize: float = 7) -> list:
    """Place one text label per ``((x, y), text)`` item (data coordinates) by greedy collision avoidance, in
    the order given (most important first): each label takes the nearest candidate offset (:data:`_RADII` x
    :data:`_DIRECTIONS`) whose box (padding included) lies inside the axes, overlaps no label placed before nor the
    legend and, if such a spot exists, no node marker (``markers``: ``((x, y), radius in points)``) but its own.
    A far label gets a thin leader line (gid ``"label-leader"``); a label with no free spot inside the axes is left
    out. Returns the placed :class:`~matplotlib.text.Text` labels (gid ``"node-label"``)."""
    fig = ax.figure
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    axes_box = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    blocked = [legend.get_window_extent(renderer)] if legend is not None else []
    marker_boxes = []
    for (x, y), r in markers:
        cx, cy = ax.transData.transform((x, y))
        rp = r * to_px
        marker_boxes.append(((x, y), (cx - rp, cy - rp, cx + rp, cy + rp)))
    placed: list = []
    boxes: list[tuple[float, float, float, float]] = []

    def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for (x, y), label in items:
        # the label's box (padding included) relative to its anchor, measured once for ha="left", va="bottom"
        probe = _label_text(ax, x, y, label, 0, 0, "left", "bottom", fontsize)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
            probe.update_bbox_position_size(renderer)
            te = probe.get_window_extent(renderer)
            e = probe.get_bbox_patch().get_window_extent(renderer).union([te])
        probe.remove()
        nx, ny = ax.transData.transform((x, y))
        rel = (e.x0 - nx, e.y0 - ny, e.x1 - nx, e.y1 - ny)
        shift_x = {"left": 0.0, "center": -te.width / 2, "right": -te.width}
        shift_y = {"bottom": 0.0, "center": -te.height / 2, "top": -te.height}
        best = None
        for strict in (True, False):
            for r in _RADII:
                for dx, dy, ha, va in _DIRECTIONS:
                    ox, oy = nx + dx * r * to_px + shift_x[ha], ny + dy * r * to_px + shift_y[va]
                    box = (ox + rel[0] - 1, oy + rel[1] - 1, ox + rel[2] + 1, oy + rel[3] + 1)
                    ok = (box[0] >= axes_box.x0 and box[2] <= axes_box.x1 and box[1] >= axes_box.y0
                          and box[3] <= axes_box.y1
                          and not any(overlaps(box, b) for b in boxes)
                          and not any(overlaps(box, (b.x0, b.y0, b.x1, b.y1)) for b in blocked)
                          and not (strict and any(overlaps(box, mb) for xy, mb in marker_boxes if xy != (x, y))))
                    if ok:
                        best = (box, dx * r, dy * r, ha, va, r)
                        break
                if best:
                    break
            if best:
                break
        if best is None:
            continue
        box, ox, oy, ha, va, r = best
        t = _label_text(ax, x, y, label, ox, oy, ha, va, fontsize)
        if r >= _RADII[2]:  # a leader line from the node to the label's anchor
            leader = ax.annotate("", xy=(x, y), xytext=(ox, oy), textcoords="offset points", zorder=3.5,
                                 annotation_clip=False,
                                 arrowprops=dict(arrowstyle="-", lw=0.5, color="#555555", shrinkA=0, shrinkB=2))
            leader.set_gid("label-leader")
        placed.append(t)
        boxes.append(box)
    return placed
