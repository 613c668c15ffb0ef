"""The human-readable ``report.md`` of one run.

:func:`write_report` takes a plain, JSON-like ``summary`` dict so that the report depends on no
other stage's classes. Recognised keys (all optional except that the summary must be a mapping;
unknown keys are ignored, absent sections are omitted):

``title``        str, report heading (default "Factual-recall circuits")
``model``        str, or a dict (``name``/``model_name`` plus any scalar config such as ``n_layers``)
``created``      str timestamp
``run_dir``/``config``  str / dict of scalar settings, shown as a small table
``summary``      list of str: the findings, printed first under "Summary"
``relations``    list of row dicts (one per circuit, :data:`RELATION_COLUMNS`): ``name``, ``n_split`` (facts
                 used: discovery / held out), ``held_out_f``, ``random_p``, ``node_share``, ``validated``,
                 ``faithfulness``, ``cpr``, ``top_nodes`` (list of str or node dicts with ``label``/``id``),
                 ``verdicts`` (dict hypothesis -> verdict, list, or str)
``glossary``     list of ``{"term", "meaning", "unit", "observation"}``: every number the report shows, printed
                 as the table "Glossary" at the end (:data:`GLOSSARY_HEADER`)
``sections``     list of dicts (or dict name -> dict) per relation: ``name``/``relation``, ``text``,
                 ``metrics`` (dict), ``figures`` (list of path strings or ``{"path", "caption"}``;
                 absolute paths are rewritten relative to ``out_dir``)
``hypotheses``   list of row dicts (``id``, ``statement``, ``statistic``, ``p_value``, ``p_adjusted``,
                 ``effect_size``, ``verdict``, ...); columns are the union of scalar keys
``timings``      dict stage -> seconds, shown as given (seconds and minutes) with their sum
``definitions``  list of str printed under the relations table (what each column means)
``notes``        list of str
``files``        list of relative paths (or dict name -> path) of other outputs to link

Missing values (``None``, NaN, absent) are shown as an em dash "—"; table cells escape ``|``.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.io import atomic_write_text

__all__ = ["ReportInputError", "write_report", "format_value", "escape_cell", "markdown_table", "glossary_table",
           "format_seconds", "RELATION_COLUMNS", "GLOSSARY_HEADER"]

MISSING = "—"

RELATION_COLUMNS = [
    ("name", "circuit"),
    ("n_split", "facts used (discovery / held out)"),
    ("held_out_f", "held-out f [95% CI]"),
    ("random_p", "matched random p (draws)"),
    ("node_share", "nodes (% of non-inert)"),
    ("validated", "validated"),
    ("faithfulness", "in-sample f"),
    ("cpr", "held-out CPR"),
    ("top_nodes", "top nodes"),
    ("verdicts", "verdicts"),
]
#: the header of the glossary table (:func:`glossary_table`)
GLOSSARY_HEADER = ("term", "meaning", "unit", "unit of observation")
HYPOTHESIS_PREFERRED = [
    "hypothesis_id", "id", "name", "relation", "statement", "hypothesis", "test", "n", "statistic", "effect",
    "effect_size", "ci_low", "ci_high", "p_value", "p_adjusted", "q_value", "alpha", "verdict",
]


class ReportInputError(CircuitDiscoveryError, ValueError):
    """The summary passed to :func:`write_report` is not usable."""


def format_value(v: Any, digits: int = 3) -> str:
    """Format one value for a table: floats with ``digits`` significant digits, ints as is,
    ``None``/NaN as "—", bools as yes/no, lists joined with ", "."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalar
        with contextlib.suppress(TypeError, ValueError):
            v = v.item()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return MISSING if math.isnan(v) else ("∞" if v > 0 else "-∞")
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    if isinstance(v, str):
        return v if v.strip() else MISSING
    if isinstance(v, Mapping):
        if not v:
            return MISSING
        return "; ".join(f"{k}: {format_value(x, digits)}" for k, x in v.items())
    if isinstance(v, Sequence):
        if not v:
            return MISSING
        return ", ".join(format_value(x, digits) for x in v)
    return str(v)


def escape_cell(text: str) -> str:
    """Make ``text`` safe inside one GitHub-flavoured markdown table cell."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")
            .replace("\r", " "))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; every cell goes through :func:`format_value` and
    :func:`escape_cell`. ``align`` holds ``"l"``/``"r"`` per column (default: left)."""
    align = list(align or ["l"] * len(header))
    if len(align) != len(header):
        raise ReportInputError(f"align has {len(align)} entries for {len(header)} columns")
    lines = ["| " + " | ".join(escape_cell(str(h)) for h in header) + " |",
             "|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ReportInputError(f"table row has {len(row)} cells, header has {len(header)}")
        lines.append("| " + " | ".join(escape_cell(format_value(c)) for c in row) + " |")
    return "\n".join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or hasattr(v, "dtype")


def _top_nodes(v: Any, k: int = 5) -> Any:
    if isinstance(v, Sequence) and not isinstance(v, str):
        out = []
        for n in list(v)[:k]:
            if isinstance(n, Mapping):
                out.append(str(n.get("label") or n.get("id") or MISSING))
            else:
                out.append(str(n))
        return out
    return v


def _verdicts(v: Any) -> Any:
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {format_value(x)}" for k, x in v.items()) or None
    return v


def _rel_path(p: Any, out_dir: Path) -> str:
    p = os.fspath(p)
    if os.path.isabs(p):
        with contextlib.suppress(ValueError):  # different drive on Windows
            p = os.path.relpath(p, out_dir)
    return PurePosixPath(Path(p).as_posix()).as_posix()


def _link_target(path: str) -> str:
    return f"<{path}>" if any(c in path for c in " ()<>") else path


def _model_section(model: Any) -> list[str]:
    if isinstance(model, Mapping):
        name = model.get("name") or model.get("model_name")
        lines = [f"**Model:** `{name}`" if name else "**Model**", ""]
        rows = [(k, v) for k, v in model.items() if k not in ("name", "model_name")
                and (v is None or isinstance(v, (str, int, float, bool)))]
        if rows:
            lines += [markdown_table(["setting", "value"], rows), ""]
        return lines
    return [f"**Model:** `{model}`", ""]


def _sections(raw: Any) -> list[Mapping[str, Any]]:
    if isinstance(raw, Mapping):
        return [dict(v, name=v.get("name", k)) if isinstance(v, Mapping) else {"name": k, "text": str(v)}
                for k, v in raw.items()]
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        return [s for s in raw if isinstance(s, Mapping)]
    return []


def format_seconds(s: Any) -> str:
    """``s`` seconds as "3056.4 s (50 min 56 s)": the seconds with one decimal (as config.json stores them,
    to 0.1 s), then minutes and seconds (or hours and minutes) rounded to whole seconds; "—" if not a number."""
    try:
        s = float(s)
    except (TypeError, ValueError):
        return MISSING
    if not math.isfinite(s):
        return MISSING
    if s < 60:
        return f"{s:.1f} s"
    whole = int(round(s))
    m, sec = divmod(whole, 60)
    if m < 60:
        return f"{s:.1f} s ({m} min {sec} s)"
    h, m = divmod(m, 60)
    return f"{s:.1f} s ({h} h {m} min {sec} s)"


def glossary_table(glossary: Sequence[Mapping[str, Any]]) -> str:
    """The glossary as a table with :data:`GLOSSARY_HEADER`: one row per ``{"term", "meaning", "unit",
    "observation"}`` mapping; a term given twice raises :class:`ReportInputError`."""
    seen: set[str] = set()
    rows = []
    for g in glossary:
        if not isinstance(g, Mapping) or not g.get("term"):
            raise ReportInputError(f"each glossary entry must be a mapping with a 'term', got {g!r}")
        term = str(g["term"])
        if term in seen:
            raise ReportInputError(f"glossary term {term!r} is defined twice; define each term once")
        seen.add(term)
        rows.append([term, g.get("meaning"), g.get("unit"), g.get("observation")])
    return markdown_table(list(GLOSSARY_HEADER), rows)


def write_report(out_dir: str | os.PathLike, summary: Mapping[str, Any], filename: str = "report.md") -> Path:
    """Render ``summary`` (see the module docstring) to ``out_dir/filename`` atomically.

    Returns the path of the written file.
    """
    if not isinstance(summary, Mapping):
        raise ReportInputError(f"summary must be a mapping, got {type(summary).__name__}")
    out_dir = Path(out_dir)
    lines: list[str] = [f"# {summary.get('title') or 'Factual-recall circuits'}", ""]
    if summary.get("created"):
        lines += [f"_Generated {summary['created']}_", ""]
    if summary.get("model") is not None:
        lines += _model_section(summary["model"])
    findings = summary.get("summary")
    if findings:
        lines += ["## Summary", ""] + [f"- {x}" for x in ([findings] if isinstance(findings, str) else findings)] + [""]
    config = summary.get("config")
    if isinstance(config, Mapping) and config:
        rows = [(k, v) for k, v in config.items() if v is None or isinstance(v, (str, int, float, bool))]
        if rows:
            lines += ["## Configuration", "", markdown_table(["setting", "value"], rows), ""]

    relations = summary.get("relations")
    if isinstance(relations, Sequence) and not isinstance(relations, str) and relations:
        rel_rows: list[list[Any]] = []
        for r in relations:
            if not isinstance(r, Mapping):
                raise ReportInputError(f"each relations row must be a mapping, got {type(r).__name__}")
            row = []
            for key, _ in RELATION_COLUMNS:
                v = r.get(key, r.get("relation") if key == "name" else None)
                if key == "top_nodes":
                    v = _top_nodes(v)
                elif key == "verdicts":
                    v = _verdicts(v)
                row.append(v)
            rel_rows.append(row)
        align = ["l", "r", "r", "r", "r", "l", "r", "r", "l", "l"]
        lines += ["## Relations", "", markdown_table([h for _, h in RELATION_COLUMNS], rel_rows, align), ""]
        definitions = summary.get("definitions")
        if definitions:
            lines += [f"- {d}" for d in ([definitions] if isinstance(definitions, str) else definitions)] + [""]
        if summary.get("glossary"):
            lines += ["Every column and quantity is defined, with its unit, in the [Glossary](#glossary) at the end.",
                      ""]

    for sec in _sections(summary.get("sections")):
        name = sec.get("name") or sec.get("relation") or "relation"
        lines += [f"## {name}", ""]
        if sec.get("text"):
            lines += [str(sec["text"]), ""]
        metrics = sec.get("metrics")
        if isinstance(metrics, Mapping) and metrics:
            lines += [markdown_table(["quantity", "value"], [(k, v) for k, v in metrics.items()], ["l", "r"]), ""]
        for fig in sec.get("figures") or []:
            if isinstance(fig, Mapping):
                if not fig.get("path"):
                    continue
                path, caption = fig["path"], fig.get("caption") or ""
            else:
                path, caption = fig, ""
            rel = _rel_path(path, out_dir)
            alt = (caption or Path(rel).stem).replace("[", "(").replace("]", ")").replace("\n", " ")
            lines.append(f"![{alt}]({_link_target(rel)})")
            if caption:
                lines += ["", f"*{caption}*"]
            lines.append("")

    hyps = summary.get("hypotheses")
    if isinstance(hyps, Sequence) and not isinstance(hyps, str) and hyps:
        rows_h = [h for h in hyps if isinstance(h, Mapping)]
        keys: list[str] = []
        for h in rows_h:
            for k, v in h.items():
                if k not in keys and (v is None or isinstance(v, (str, int, float, bool)) or _is_number(v)):
                    keys.append(k)
        cols = [k for k in HYPOTHESIS_PREFERRED if k in keys] + [k for k in keys if k not in HYPOTHESIS_PREFERRED]
        align = ["r" if any(_is_number(h.get(c)) for h in rows_h) else "l" for c in cols]
        lines += ["## Hypotheses", "", markdown_table(cols, [[h.get(c) for c in cols] for h in rows_h], align), ""]

    timings = summary.get("timings")
    if isinstance(timings, Mapping) and timings:
        rows_t = [(k, format_seconds(v)) for k, v in timings.items()]
        secs = [float(v) for v in timings.values() if _is_number(v) and math.isfinite(float(v))]
        if secs:
            rows_t.append(("**sum of the stages above**", format_seconds(sum(secs))))
        lines += ["## Timings", "", markdown_table(["stage", "time"], rows_t, ["l", "r"]), ""]

    files = summary.get("files")
    if files:
        items = files.items() if isinstance(files, Mapping) else ((Path(str(f)).name, f) for f in files)
        lines += ["## Files", ""]
        for name, p in items:
            rel = _rel_path(p, out_dir)
            lines.append(f"- [{escape_cell(str(name))}]({_link_target(rel)})")
        lines.append("")

    notes = summary.get("notes")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ([notes] if isinstance(notes, str) else notes)] + [""]

    glossary = summary.get("glossary")
    if glossary:
        lines += ["## Glossary", "", glossary_table(glossary), ""]

    return atomic_write_text(out_dir / filename, "\n".join(lines).rstrip() + "\n")
