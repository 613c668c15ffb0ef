"""Project-wide conventions, checked on the source itself: one error hierarchy, no swallowed broad exceptions,
no import cycle between modules, a model-free ``graph`` package."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import warnings
from pathlib import Path

import networkx as nx

import circuit_discovery
from circuit_discovery.errors import CircuitDiscoveryError

PKG = "circuit_discovery"
SRC = Path(circuit_discovery.__file__).resolve().parent

# Private control-flow signals, raised and caught inside one module; they never reach a caller, so they are not
# errors of this toolkit (deriving from CircuitDiscoveryError would let `except CircuitDiscoveryError` eat them).
CONTROL_FLOW_SIGNALS = {
    "circuit_discovery.pipeline.circuit_stage._Skip",  # "this null is not asked for", caught 4 lines below
    "circuit_discovery.sae.harvest._StopForward",  # stops the forward pass once the last hooked layer has run
    # a rank leaves a failed torchrun run (a SystemExit: the process ends; rank 0 has printed the one line)
    "circuit_discovery.pipeline.distributed.RankStopped",
    # contact with another rank was lost (caught in distributed.run_distributed, reported as one line)
    "circuit_discovery.pipeline.distributed._Lost",
}

# Process boundaries: a rank of a torchrun run catches whatever its work raised, to send it to the other ranks
# (which would otherwise wait for it until the collective's timeout) and stop every rank with one line; the
# traceback of a bug is logged on the rank where it happened.
PROCESS_BOUNDARY_EXCEPT: dict[str, int] = {"pipeline/distributed.py": 2}

# Known `except Exception` / bare `except:` outside the files of the conventions change, with the number of
# places; their owners remove them (then delete the entry here).
BROAD_EXCEPT_ALLOWED: dict[str, int] = {}


def _modules() -> list[str]:
    names = [PKG]
    for info in pkgutil.walk_packages(circuit_discovery.__path__, prefix=f"{PKG}."):
        names.append(info.name)
    return sorted(names)


def _source_files() -> dict[str, Path]:
    """``{module name: file}`` for every .py file under src/circuit_discovery (packages by their __init__)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = (PKG,) + path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


# ------------------------------------------------------------------------------------------ error hierarchy
def test_every_exception_class_derives_from_circuit_discovery_error():
    modules = _modules()
    assert len(modules) > 40 and f"{PKG}.graph.influence" in modules
    bad, signals = [], []
    for name in modules:
        mod = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            qual = f"{name}.{cls_name}"
            if qual in CONTROL_FLOW_SIGNALS:
                signals.append(qual)
            elif not issubclass(cls, CircuitDiscoveryError):
                bad.append(f"{qual}{tuple(b.__name__ for b in cls.__bases__)}")
    print("control-flow signals exempted:", ", ".join(signals) or "none")
    assert not bad, ("exception classes that do not derive from circuit_discovery.errors.CircuitDiscoveryError "
                     f"(keep the builtin base second, e.g. (CircuitDiscoveryError, ValueError)): {bad}")


def test_errors_keep_their_builtin_base():
    """Existing ``except ValueError`` callers keep catching the errors that moved under CircuitDiscoveryError."""
    from circuit_discovery.graph import GraphError
    from circuit_discovery.report.figures import FigureInputError
    from circuit_discovery.report.markdown import ReportInputError
    from circuit_discovery.report.viewer import ViewerInputError

    for cls in (GraphError, FigureInputError, ReportInputError, ViewerInputError):
        assert issubclass(cls, CircuitDiscoveryError) and issubclass(cls, ValueError), cls
    from circuit_discovery.graph.graph import GraphError as from_graph_module

    assert from_graph_module is GraphError


# ------------------------------------------------------------------------------------------ broad excepts
def _is_broad(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("Exception", "BaseException") for t in types)


def _reraises(handler: ast.ExceptHandler) -> bool:
    """Clean-up handlers (``except BaseException: undo(); raise``) swallow nothing."""
    last = handler.body[-1]
    return isinstance(last, ast.Raise) and last.exc is None


def broad_excepts() -> dict[str, list[int]]:
    """``{path relative to src/circuit_discovery: [line, ...]}`` of every bare ``except:``, ``except Exception``
    and ``except BaseException`` that does not end in a bare ``raise``."""
    found: dict[str, list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.ExceptHandler) or not _is_broad(node):
                continue
            is_base = node.type is not None and "BaseException" in ast.unparse(node.type)
            if is_base and _reraises(node):
                continue
            found.setdefault(path.relative_to(SRC).as_posix(), []).append(node.lineno)
    return found


def test_no_broad_except_in_library_code():
    found = broad_excepts()
    allowed = {f: lines for f, lines in found.items() if len(lines) <= BROAD_EXCEPT_ALLOWED.get(f, 0)}
    if allowed:
        msg = "allow-listed broad excepts, to be removed: " + "; ".join(
            f"{f}:{','.join(map(str, lines))}" for f, lines in sorted(allowed.items()))
        print(msg)
        warnings.warn(msg, stacklevel=1)
    fixed = sorted(set(BROAD_EXCEPT_ALLOWED) - set(found))
    if fixed:
        print("allow-list entries no longer needed (delete them from BROAD_EXCEPT_ALLOWED):", ", ".join(fixed))
    bad = {f: lines for f, lines in found.items()
           if f not in allowed and len(lines) > PROCESS_BOUNDARY_EXCEPT.get(f, 0)}
    assert not bad, ("catch the specific exceptions the guarded code raises and re-raise a typed error that says "
                     f"what to do, instead of `except Exception` / bare `except:` at: {bad}")


def test_broad_except_finder():
    def handlers(src):
        return [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ExceptHandler)]

    flagged = [_is_broad(h) and not ("BaseException" in ast.unparse(h.type or ast.Name("x")) and _reraises(h))
               for h in handlers("try: f()\nexcept: pass\ntry: f()\nexcept (OSError, Exception) as e: g(e)\n"
                                 "try: f()\nexcept BaseException: undo(); raise\n"
                                 "try: f()\nexcept BaseException: pass\ntry: f()\nexcept ValueError: pass\n")]
    assert flagged == [True, True, False, True, False]


# ------------------------------------------------------------------------------------------ import cycles
def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> nx.DiGraph:
    """Module-level import graph of circuit_discovery from the AST, imports inside functions included:
    ``a -> b`` when ``a`` imports ``b`` (the most specific module named: ``from pkg import sub`` is an edge to
    ``pkg.sub`` when that is a module, else to ``pkg``)."""
    files = _source_files()
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files and "." in t:  # `import circuit_discovery.x.y as z` -> nearest module
                    t = t.rsplit(".", 1)[0]
                if t in files and t != module:
                    g.add_edge(module, t)
    return g


def test_import_graph_sees_lazy_and_relative_imports():
    g = import_graph()
    assert g.has_edge(f"{PKG}.graph.prune", f"{PKG}.graph.influence")  # absolute
    assert g.has_edge(f"{PKG}.models.loading", f"{PKG}.models.hooked")  # relative, module level
    assert g.has_edge(f"{PKG}.models.loading", f"{PKG}.errors")  # `from ..errors import ...`
    assert not any(v.startswith(f"{PKG}.graph") for v in g.successors(f"{PKG}.graph.influence"))


def test_no_import_cycle_between_modules():
    g = import_graph()
    cycles = sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)
    detail = []
    for c in cycles:
        cyc = nx.find_cycle(g.subgraph(c))
        detail.append(f"{{{', '.join(c)}}}, e.g. " + " -> ".join([u for u, _ in cyc] + [cyc[0][0]]))
    assert not cycles, f"import cycles (strongly connected groups of modules): {detail}"


# ------------------------------------------------------------------------------------------ graph is model-free
MODEL_RUNNING = ("models", "attribution", "sae", "metrics", "validation", "pipeline", "api", "cli")


def _is_model_running(module: str) -> bool:
    return any(module == f"{PKG}.{p}" or module.startswith(f"{PKG}.{p}.") for p in MODEL_RUNNING)


def test_graph_package_imports_no_model_code():
    """``circuit_discovery.graph`` is the model-free graph data structure: no module of it imports, even lazily
    inside a function, the model or the packages that run it (the graph builders live in ``attribution``)."""
    g = import_graph()
    graph_modules = [m for m in g if m == f"{PKG}.graph" or m.startswith(f"{PKG}.graph.")]
    assert f"{PKG}.graph.refine" in graph_modules
    reached = set().union(*(nx.descendants(g, m) for m in graph_modules))
    bad = sorted(m for m in reached if _is_model_running(m) or m == PKG)
    assert not bad, f"graph modules reach model-running code through their imports: {bad}"


def test_importing_graph_loads_no_model_code():
    """At run time, ``import circuit_discovery.graph`` (and every graph module) loads nothing of the packages that
    run the model beyond what ``import circuit_discovery`` itself loads (its ``__init__`` exports ``load_model``)."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib\nimport circuit_discovery\nbefore = set(sys.modules)\n"
            "import circuit_discovery.graph as g\n"
            "for info in pkgutil.walk_packages(g.__path__, prefix='circuit_discovery.graph.'):\n"
            "    importlib.import_module(info.name)\n"
            "print('\\n'.join(sorted(m for m in set(sys.modules) - before if m.startswith('circuit_discovery'))))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = res.stdout.split()
    assert f"{PKG}.graph.refine" in loaded
    bad = [m for m in loaded if _is_model_running(m)]
    assert not bad, f"import circuit_discovery.graph loads model-running modules: {bad}"
