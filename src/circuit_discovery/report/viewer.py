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

Run-folder data. :func:`write_viewer` reads, when present in ``out_dir``, the per-prompt graph files each
circuit links (``graphs/*.json``, Neuronpedia format; embedded in compact form so the viewer draws them
without network access: every node, the strongest :data:`MAX_GRAPH_LINKS` links by ``|weight|`` and the
stored supernodes), ``known_facts.json`` (subjects, to give each prompt position its role),
``metrics.json`` (validation numbers shown next to each circuit's title) and, when ``feature_details`` is
not given, ``stages/feature_circuits.json``'s ``feature_details``. Missing files are skipped; unreadable
JSON raises :class:`ViewerInputError`.
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
from circuit_discovery.token_roles import token_roles as span_roles

__all__ = ["ViewerInputError", "write_viewer", "render_viewer", "embed_json", "compact_graph", "token_roles",
           "MAX_GRAPH_LINKS"]

_TEMPLATE_NAME = "viewer.html"
_DATA_PLACEHOLDER = "__CIRCUIT_DATA__"
_HASH_PLACEHOLDER = "__SCRIPT_HASH__"
_SCRIPT_RE = re.compile(r'<script id="viewer-js">(.*?)</script>', re.S)
MAX_GRAPH_LINKS = 2000
"""Links kept per embedded per-prompt graph (the strongest by ``|weight|``; the viewer states how many)."""
_TRUST_KEYS = ("faithfulness", "faithfulness_ci", "held_out_faithfulness", "held_out_ci", "held_out_faithfulness_live",
               "held_out_ci_live", "random_baseline_p", "topm_baseline_p", "node_share", "cpr", "cmd", "degenerate",
               "validated", "n_discovery", "n_held_out", "circuit_size", "n_universe", "ablation",
               "dictionary_quality")
_NODE_FIELDS = ("id", "component", "layer", "position", "feature", "label", "activation", "influence", "token_prob",
                "is_target_logit")
_FEATURE_TYPES = {"embedding": "embed", "attention head": "head", "mlp output": "mlp_out", "logit": "logit",
                  "cross layer transcoder": "feature", "transcoder": "feature", "per layer transcoder": "feature",
                  "mlp reconstruction error": "error", "error": "error", "mlp neuron": "neuron"}


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


def token_roles(tokens: Sequence[str], prompt: str, subject: str) -> list[str] | None:
    """Role of each position of ``tokens`` (the roles of docs/ARCHITECTURE.md: ``bos``, ``subject_first``/
    ``subject_middle``/``subject_last``, ``relation_first``, ``relation``, ``last``), from the subject's character
    span in ``prompt``, assigned by :func:`circuit_discovery.token_roles.token_roles` (the pair builder's rule).
    None when the tokens do not spell the prompt or the subject is not in it."""
    toks = [str(t) for t in tokens]
    has_bos = bool(toks) and toks[0] in ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
    body = toks[1:] if has_bos else toks
    start = prompt.find(subject) if subject else -1
    if not body or start < 0 or "".join(body) != prompt:
        return None
    end = start + len(subject)
    hit, offset = [], 0
    for i, t in enumerate(body):
        a, b = offset, offset + len(t)
        offset = b
        if b > a and a < end and b > start and prompt[max(a, start):min(b, end)].strip():
            hit.append(i + int(has_bos))
    if not hit:
        return None
    return span_roles(len(toks), (hit[0], hit[-1] + 1), has_bos)


def _sig(x: Any, digits: int = 4) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def compact_graph(graph: Mapping[str, Any], max_links: int = MAX_GRAPH_LINKS,
                  subjects: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The embedded form of one Neuronpedia graph JSON: its prompt and tokens, every node as a list in the
    order of ``node_fields`` (id, component, layer, position, feature index, label, activation, influence,
    logit token probability, is-target-logit), the strongest
    ``max_links`` links by ``|weight|`` as ``[source index, target index, weight]`` (weights to 4 significant
    digits), ``n_links`` (the file's total), the stored supernodes (``qParams.supernodes``) and, when the
    prompt's subject is in ``subjects``, each position's role."""
    if not isinstance(graph, Mapping) or not isinstance(graph.get("nodes"), list):
        raise ViewerInputError("a graph file must be a Neuronpedia graph dict with a 'nodes' list; "
                               "rewrite it with `frc report`")
    meta: Mapping[str, Any] = graph["metadata"] if isinstance(graph.get("metadata"), Mapping) else {}
    nodes: list[list[Any]] = []
    index: dict[str, int] = {}
    for n in graph["nodes"]:
        if not isinstance(n, Mapping) or "node_id" not in n:
            raise ViewerInputError("every graph node needs a 'node_id'; rewrite the graph with `frc report`")
        nid = str(n["node_id"])
        index[nid] = len(nodes)
        ft = str(n.get("feature_type", ""))
        layer = str(n.get("layer"))
        nodes.append([
            nid, _FEATURE_TYPES.get(ft, ft or "node"),
            -1 if layer == "E" else (int(layer) if layer.lstrip("-").isdigit() else None),
            n.get("ctx_idx") if isinstance(n.get("ctx_idx"), int) else None,
            n.get("feature") if isinstance(n.get("feature"), int) else None,
            str(n.get("clerp") or nid), _sig(n.get("activation")), _sig(n.get("influence")),
            _sig(n.get("token_prob")), bool(n.get("is_target_logit", False)),
        ])
    links = []
    for ln in graph.get("links") or []:
        if not isinstance(ln, Mapping):
            continue
        a, b, w = index.get(str(ln.get("source"))), index.get(str(ln.get("target"))), _sig(ln.get("weight"))
        if a is not None and b is not None and w is not None:
            links.append([a, b, w])
    n_links = len(graph.get("links") or [])
    links.sort(key=lambda x: -abs(x[2]))
    q: Mapping[str, Any] = graph["qParams"] if isinstance(graph.get("qParams"), Mapping) else {}
    supernodes = []
    for sn in q.get("supernodes") or []:
        if isinstance(sn, list) and sn and all(isinstance(x, str) for x in sn):
            members = [m for m in sn[1:] if m in index]
            if members:
                supernodes.append([sn[0]] + members)
    tokens = [str(t) for t in meta.get("prompt_tokens") or []]
    prompt = str(meta.get("prompt") or "")
    subject = (subjects or {}).get(prompt)
    out: dict[str, Any] = {
        "slug": str(meta.get("slug") or ""), "prompt": prompt, "tokens": tokens,
        "description": str(meta["info"].get("description") or "") if isinstance(meta.get("info"), Mapping) else "",
        "node_fields": list(_NODE_FIELDS), "nodes": nodes, "links": links[:max_links], "n_links": n_links,
        "supernodes": supernodes,
        "roles": token_roles(tokens, prompt, subject) if subject else None,
    }
    return out


def _read_json_file(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ViewerInputError(f"{path} is not valid JSON ({exc}); rewrite it with `frc report`") from exc
    except OSError as exc:
        raise ViewerInputError(f"{path} cannot be read ({exc}); rewrite it with `frc report`") from exc


def _subjects(out_dir: Path, circuits: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    subjects: dict[str, str] = {}
    kf = out_dir / "known_facts.json"
    if kf.is_file():
        data = _read_json_file(kf)
        for f in (data.get("facts") if isinstance(data, Mapping) else None) or []:
            if isinstance(f, Mapping) and isinstance(f.get("prompt"), str) and isinstance(f.get("subject"), str):
                subjects.setdefault(f["prompt"], f["subject"])
    for c in circuits:
        for f in c.get("facts") or []:
            if isinstance(f, Mapping) and isinstance(f.get("prompt"), str) and isinstance(f.get("subject"), str):
                subjects[f["prompt"]] = f["subject"]
    return subjects


def _trust(c: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The validation numbers shown next to a circuit's title: ``metrics.json``'s entry for the circuit's
    relation (``relations`` or ``feature_circuits``), overridden by the circuit's own ``validation``."""
    feature = c.get("kind") == "feature" or c.get("granularity") == "feature"
    table = metrics.get("feature_circuits" if feature else "relations")
    entry = table.get(str(c.get("relation"))) if isinstance(table, Mapping) else None
    out = {k: entry[k] for k in _TRUST_KEYS if isinstance(entry, Mapping) and k in entry}
    val = c.get("validation")
    if isinstance(val, Mapping):
        out.update({k: v for k, v in val.items() if k in _TRUST_KEYS})
    return out


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
    metrics = _read_json_file(out_dir / "metrics.json") if (out_dir / "metrics.json").is_file() else {}
    metrics = metrics if isinstance(metrics, Mapping) else {}
    if feature_details is None and (out_dir / "stages" / "feature_circuits.json").is_file():
        stage = _read_json_file(out_dir / "stages" / "feature_circuits.json")
        fd = stage.get("feature_details") if isinstance(stage, Mapping) else None
        feature_details = fd if isinstance(fd, Mapping) else None
    subjects = _subjects(out_dir, circuits)
    prompt_graphs: dict[str, Any] = {}
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
        for r in seen:
            f = out_dir / r
            if r not in prompt_graphs and ".." not in PurePosixPath(r).parts and f.is_file():
                prompt_graphs[r] = compact_graph(_read_json_file(f), subjects=subjects)
        c["trust"] = _trust(c, metrics)
        tokens = c.get("prompt_tokens")
        facts = [f for f in c.get("facts") or [] if isinstance(f, Mapping)]
        if isinstance(tokens, list) and facts and isinstance(facts[0].get("prompt"), str):
            subj = subjects.get(facts[0]["prompt"])
            c["prompt_roles"] = token_roles(tokens, facts[0]["prompt"], subj) if subj else None
        out_circuits.append(c)
    payload = {
        "model": circuits_json.get("model"),
        "metric": metrics.get("metric"),
        "circuits": out_circuits,
        "feature_details": dict(feature_details or {}),
        "prompt_graphs": prompt_graphs,
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
