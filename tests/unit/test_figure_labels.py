"""Labels in the PNG figures do not collide: no two node labels overlap, none runs into the legend or leaves the
figure; and a figure's printed numbers can be read back from its PNG.

Oracle: matplotlib's own text bounding boxes (``Text.get_window_extent`` with the figure's renderer), compared
as rectangles here; the same check run on the fixed-offset placement (the placement before collision
avoidance) finds overlaps, so the check can fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from circuit_discovery.report import figures as F


def _crowded() -> dict:
    """A circuit as the default run has them at its last token: four heads in each of layers 15-17 (one
    column, next to the logit and the legend) with long labels, and embeddings in five other roles."""
    roles = ["bos", "subject_first", "subject_last", "relation_first", "relation"]
    nodes = [{"id": f"embed/L-1/{r}", "component": "embed", "layer": -1, "role": r, "label": f"Emb @ '{r}'",
              "score": 0.5} for r in roles]
    for layer in (15, 16, 17):
        for h in range(4):
            nodes.append({"id": f"head/L{layer}/I{h}/last", "component": "head", "layer": layer, "role": "last",
                          "index": h, "label": f"L{layer}.H{h} @ ' the city of'", "score": 5.0 - h - 0.1 * layer})
    nodes.append({"id": "mlp_out/L12/last", "component": "mlp_out", "layer": 12, "role": "last",
                  "label": "L12 MLP @ ' of'", "score": 1.7})
    nodes.append({"id": "logit/L18/last", "component": "logit", "layer": 18, "role": "last", "label": "Logit",
                  "score": 0.0})
    edges = [{"source": n["id"], "target": "logit/L18/last", "weight": 1.0 - 0.05 * i}
             for i, n in enumerate(nodes[:-1])]
    return {"name": "crowded", "nodes": nodes, "edges": edges}


def _collisions(fig) -> tuple[int, int, int, int]:
    """(labels, overlapping label pairs, labels overlapping the legend, labels outside the figure)."""
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_gid() == "node-label"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    legend = ax.get_legend().get_window_extent(renderer)
    fig_box = fig.bbox
    pairs = sum(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    on_legend = sum(b.overlaps(legend) for b in boxes)
    outside = sum(not (b.x0 >= fig_box.x0 and b.x1 <= fig_box.x1 and b.y0 >= fig_box.y0 and b.y1 <= fig_box.y1)
                  for b in boxes)
    return len(labels), int(pairs), int(on_legend), int(outside)


def test_crowded_labels_do_not_collide():
    n, pairs, on_legend, outside = _collisions(F.circuit_figure(_crowded(), n_labels=12))
    assert n >= 11  # at most one label of the twelve finds no free spot
    assert (pairs, on_legend, outside) == (0, 0, 0)


def test_the_check_fails_on_fixed_offset_labels():
    n, pairs, on_legend, _ = _collisions(F.circuit_figure(_crowded(), n_labels=12, label_placement="fixed"))
    assert n == 12 and pairs > 0 and on_legend > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_circuits_labels_do_not_collide(seed):
    rng = np.random.default_rng(seed)
    roles = list(F.ROLE_ORDER)
    nodes = [{"id": f"head/L{int(rng.integers(0, 18))}/I{i}/{roles[int(rng.integers(0, 7))]}", "component": "head",
              "layer": 0, "role": "last", "index": i, "label": "L? " + "x" * int(rng.integers(3, 25)),
              "score": float(rng.normal())} for i in range(40)]
    for n in nodes:
        n["layer"], n["role"] = int(n["id"].split("/")[1][1:]), n["id"].split("/")[-1]
    _, pairs, on_legend, outside = _collisions(F.circuit_figure({"name": "r", "nodes": nodes, "edges": []},
                                                                n_labels=20))
    assert (pairs, on_legend, outside) == (0, 0, 0)


def test_labels_survive_saving(tmp_path):
    path = F.circuit_drawing(_crowded(), tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(F.FigureInputError):
        F.circuit_figure(_crowded(), label_placement="random")


def test_overlap_matrix_stores_the_numbers_it_prints(tmp_path):
    m = np.array([[1.0, 0.4567], [0.4567, np.nan]])
    path = F.overlap_matrix(["a", "b|c"], m, tmp_path / "o.png")
    got = F.shown_values(path)
    assert got["rows"] == got["cols"] == ["a", "b|c"]
    assert got["cells"] == [["1.00", "0.46"], ["0.46", "—"]]  # format(v, ".2f") by hand; NaN drawn as a dash
    assert F.shown_values(F.metric_bars({"a": 1.0}, tmp_path / "b.png")) is None
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(F.FigureInputError):
        F.shown_values(tmp_path / "x.png")


def _n_markers(fig) -> int:
    """Node markers drawn: the points of the axes' PathCollections (ax.scatter)."""
    from matplotlib.collections import PathCollection

    return sum(len(c.get_offsets()) for c in fig.axes[0].collections if isinstance(c, PathCollection))


def test_unconnected_zero_score_nodes_are_not_drawn():
    c = _crowded()
    c["nodes"].append({"id": "embed/L-1/last", "component": "embed", "layer": -1, "role": "last", "label": "Emb",
                       "score": 0.0})
    fig = F.circuit_figure(c)
    drawn = _n_markers(fig)
    assert drawn == len(c["nodes"]) - 1
    c["edges"].append({"source": "embed/L-1/last", "target": "logit/L18/last", "weight": 0.1})  # connected: drawn
    fig = F.circuit_figure(c)
    drawn = _n_markers(fig)
    assert drawn == len(c["nodes"])
