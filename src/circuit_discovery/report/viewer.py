"""The offline, single-file HTML circuit viewer (``index.html``).

The page is one self-contained file (inline CSS and vanilla JavaScript, no CDN, works from
``file://``). The circuits are embedded as JSON in ``<script type="application/json" id="data">``.

Security model: prompts, labels and contexts are untrusted text.

* In the embedded JSON every ``<``, ``>`` and ``&`` is written as ``\\u003c``/``\\u003e``/``\\u0026``
  (valid JSON escapes), so neither ``</script>`` nor ``<!--`` can appear inside the data block
  and nothing can break out of it; U+2028/U+2029 are escaped as well.
* The JavaScript inserts data only through ``textContent``, ``setAttribute`` of non-URL attributes
  and ``new Option(text)``; links to graph files are emitted only for relative paths (no scheme).
* A Content-Security-Policy ``<meta>`` allows exactly the viewer's own script (by SHA-256 hash) and
  nothing else, so even an injected ``<script>`` or ``onerror=`` handler would not run.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.io import atomic_write_text

__all__ = ["ViewerInputError", "write_viewer", "render_viewer", "embed_json"]

_TEMPLATE_NAME = "viewer.html"
_DATA_PLACEHOLDER = "__CIRCUIT_DATA__"
_HASH_PLACEHOLDER = "__SCRIPT_HASH__"
_SCRIPT_RE = re.compile(r'<script id="viewer-js">(.*?)</script>', re.S)


class ViewerInputError(CircuitDiscoveryError, ValueError):
    """The circuits dict given to the viewer does not follow the circuits.json format."""


def _template() -> str:
    return resources.files("circuit_discovery.report").joinpath("assets", _TEMPLATE_NAME).read_text("utf-8")


def _jsonable(obj: Any) -> Any:
    """Recursively convert to JSON-safe values: numpy scalars/arrays -> Python, NaN/inf -> None,
    tuples/sets -> lists, Paths -> POSIX strings, mapping keys -> str."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, os.PathLike):
        return Path(obj).as_posix()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    raise ViewerInputError(f"cannot embed a value of type {type(obj).__name__} in the viewer")


def embed_json(payload: Any) -> str:
    """Serialise ``payload`` as JSON that is safe to place verbatim inside an HTML ``<script>``
    element: ``<``, ``>``, ``&``, U+2028 and U+2029 become ``\\uXXXX`` escapes."""
    text = json.dumps(_jsonable(payload), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _rel(p: Any, out_dir: Path) -> str:
    s = os.fspath(p) if isinstance(p, os.PathLike) else str(p)
    if os.path.isabs(s):
        with contextlib.suppress(ValueError):
            s = os.path.relpath(s, out_dir)
    return PurePosixPath(Path(s).as_posix()).as_posix()


def _validate(circuits_json: Any) -> list[Mapping[str, Any]]:
    if not isinstance(circuits_json, Mapping):
        raise ViewerInputError(f"circuits_json must be a mapping, got {type(circuits_json).__name__}")
    circuits = circuits_json.get("circuits")
    if not isinstance(circuits, Sequence) or isinstance(circuits, (str, bytes)):
        raise ViewerInputError("circuits_json['circuits'] must be a list of circuit dicts")
    for i, c in enumerate(circuits):
        if not isinstance(c, Mapping):
            raise ViewerInputError(f"circuits[{i}] must be a mapping, got {type(c).__name__}")
        nodes = c.get("nodes", [])
        if not isinstance(nodes, Sequence) or isinstance(nodes, (str, bytes)):
            raise ViewerInputError(f"circuits[{i}]['nodes'] must be a list")
        ids = set()
        for j, n in enumerate(nodes):
            if not isinstance(n, Mapping) or "id" not in n:
                raise ViewerInputError(f"circuits[{i}]['nodes'][{j}] must be a dict with an 'id'")
            if str(n["id"]) in ids:
                raise ViewerInputError(f"circuits[{i}] has duplicate node id {n['id']!r}")
            ids.add(str(n["id"]))
        edges = c.get("edges", [])
        if not isinstance(edges, Sequence) or isinstance(edges, (str, bytes)):
            raise ViewerInputError(f"circuits[{i}]['edges'] must be a list")
        for j, e in enumerate(edges):
            if not isinstance(e, Mapping) or "source" not in e or "target" not in e:
                raise ViewerInputError(f"circuits[{i}]['edges'][{j}] must be a dict with 'source' and 'target'")
    return list(circuits)


def render_viewer(
    circuits_json: Mapping[str, Any],
    graphs: Mapping[str, Sequence[Any]] | None = None,
    feature_details: Mapping[str, Mapping[str, Any]] | None = None,
    out_dir: str | os.PathLike = ".",
) -> str:
    """Return the viewer page as a string (see :func:`write_viewer`)."""
    circuits = _validate(circuits_json)
    out_dir = Path(out_dir)
    if graphs is not None and not isinstance(graphs, Mapping):
        raise ViewerInputError("graphs must map a circuit name to a list of graph JSON paths")
    if feature_details is not None and not isinstance(feature_details, Mapping):
        raise ViewerInputError("feature_details must map a node id (or 'feature/L{l}/I{i}') to a dict")
    out_circuits = []
    for c in circuits:
        c = dict(c)
        name = str(c.get("name", c.get("relation", "")))
        paths = list(c.get("graphs") or [])
        if graphs and name in graphs:
            paths += list(graphs[name])
        seen: list[str] = []
        for p in paths:
            r = _rel(p, out_dir)
            if r not in seen:
                seen.append(r)
        c["graphs"] = seen
        out_circuits.append(c)
    payload = {
        "model": circuits_json.get("model"),
        "circuits": out_circuits,
        "feature_details": dict(feature_details or {}),
    }
    page = _template()
    m = _SCRIPT_RE.search(page)
    if m is None:  # pragma: no cover - the template ships with the package
        raise RuntimeError("viewer template has no <script id=\"viewer-js\"> block")
    digest = base64.b64encode(hashlib.sha256(m.group(1).encode("utf-8")).digest()).decode("ascii")
    head, tail = page.split(_DATA_PLACEHOLDER, 1)
    head = head.replace(_HASH_PLACEHOLDER, f"sha256-{digest}", 1)
    return head + embed_json(payload) + tail


def write_viewer(
    out_dir: str | os.PathLike,
    circuits_json: Mapping[str, Any],
    graphs: Mapping[str, Sequence[Any]] | None = None,
    feature_details: Mapping[str, Mapping[str, Any]] | None = None,
    filename: str = "index.html",
) -> Path:
    """Write the offline viewer to ``out_dir/filename`` atomically and return its path.

    Args:
        out_dir: run folder; graph paths are made relative to it.
        circuits_json: the ``circuits.json`` dict (``{"model": ..., "circuits": [...]}``, see
            docs/ARCHITECTURE.md). Nodes may carry ``"contexts"`` (list of str, top-activating
            contexts) and any extra scalar fields, which the details panel lists.
        graphs: optional ``{circuit name: [graph JSON path, ...]}`` added to each circuit's
            ``"graphs"`` list (absolute paths are rewritten relative to ``out_dir``).
        feature_details: optional ``{node id or "feature/L{layer}/I{index}": {...}}`` with e.g.
            ``"description"``, ``"contexts"``, ``"top_logits"``; shown for matching nodes.
    """
    html = render_viewer(circuits_json, graphs=graphs, feature_details=feature_details, out_dir=out_dir)
    return atomic_write_text(Path(out_dir) / filename, html)
