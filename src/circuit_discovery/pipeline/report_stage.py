"""Writes the run folder from the stage results: circuits.json, metrics.json, hypotheses.csv (already written by its
stage), figures/*.png, graphs/*.json (written by the circuits stage), index.html and report.md.

:func:`write_outputs` runs the phases in order: :func:`circuit_objects` (then ``circuits.json``),
:func:`write_metrics`, :func:`write_figures`, the viewer and :func:`write_markdown`.

One source per number: every value report.md shows comes from the metrics entry of its circuit
(:func:`relation_metrics`, :func:`feature_metrics`: what ``metrics.json`` holds), from :func:`circuit_overlap` (the
Jaccard matrix that ``circuit_overlap.png`` draws and the overlap table lists), or from the stages' own ``_seconds``
(:func:`stage_timings`: the timings ``config.json`` stores). Whether a circuit counts as a finding is decided by
:func:`circuit_finding` alone (the report and the command-line summary call it).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circuit_discovery.graph.circuit import write_circuits_json
from circuit_discovery.io import atomic_write_json, safe_name
from circuit_discovery.pipeline.circuit_stage import component_circuit, relation_metrics
from circuit_discovery.pipeline.config import RunConfig
from circuit_discovery.pipeline.feature_stage import QUALITY_BAR, feature_circuit, feature_metrics
from circuit_discovery.report import figures as fig
from circuit_discovery.report.glossary import GLOSSARY
from circuit_discovery.report.markdown import markdown_table, write_report
from circuit_discovery.report.viewer import write_viewer
from circuit_discovery.token_roles import TokenRoleError, token_roles

__all__ = ["write_outputs", "circuit_objects", "write_metrics", "write_figures", "write_markdown",
           "relation_metrics", "feature_metrics", "circuit_finding", "Finding", "FINDING_CODES",
           "dictionary_quality",
           "DICTIONARY_QUALITY_BAR", "circuit_overlap", "stage_timings", "role_tokens", "node_name", "GLOSSARY"]


def _rel(p: Path, out: Path) -> str:
    return str(p.relative_to(out))


def _fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _model_name(cfg: RunConfig) -> str:
    return cfg.model or "gemma-3-270m"


def write_outputs(out_dir: str | Path, cfg: RunConfig, timings: dict, known: dict, attribution: dict, causal: dict,
                  circuits: dict, validation: dict, hypotheses: dict, dictionaries: dict | None = None,
                  features: dict | None = None) -> dict:
    """Write the run folder ``out_dir`` from the stage results; returns the summary's ``relations`` and
    ``notes``. ``timings`` (seconds per stage; the dict config.json is written from) gets the saved ``_seconds`` of
    every stage this process did not run (:func:`stage_timings`), and report.md shows those same values."""
    out = Path(out_dir)
    val = validation["relations"]
    stage_timings(timings, {"known": known, "attribution": attribution, "causal_tracing": causal,
                            "circuits": circuits, "validation": validation, "dictionaries": dictionaries,
                            "feature_circuits": features, "hypotheses": hypotheses})
    circ_objs, feat_objs = circuit_objects(circuits, validation, features)
    cj = {"model": _model_name(cfg), "circuits": [c.to_dict() for c in circ_objs + feat_objs]}
    write_circuits_json(circ_objs + feat_objs, out / "circuits.json", model=_model_name(cfg))
    write_metrics(out, cfg, known, circuits, validation, dictionaries, features)
    names = node_names(circ_objs + feat_objs, known)
    figures = write_figures(out, attribution, causal, circ_objs, val, names)
    if features is not None:
        fval = {r: c["validation"] for r, c in features["relations"].items()}
        figures.feature_section = _feature_section(out, out / "figures", feat_objs, fval, features, dictionaries,
                                                   names)
    write_viewer(out, cj, feature_details=(features or {}).get("feature_details") or None)
    return write_markdown(out, cfg, timings, known, attribution, hypotheses, val, circ_objs, figures,
                          features=features, dictionaries=dictionaries, names=names)


def circuit_objects(circuits: dict, validation: dict, features: dict | None = None) -> tuple[list, list]:
    """``(component circuits, feature circuits)``: the :class:`Circuit` objects of ``circuits.json`` from the
    circuits, validation and feature-circuits stages (:func:`component_circuit`, :func:`feature_circuit`: the
    functions the API uses too)."""
    val = validation["relations"]
    circ_objs = [component_circuit(c, val.get(rel)) for rel, c in circuits["relations"].items()]
    feat_objs = [feature_circuit(rel, c) for rel, c in (features or {}).get("relations", {}).items()]
    return circ_objs, feat_objs


def write_metrics(out: Path, cfg: RunConfig, known: dict, circuits: dict, validation: dict,
                  dictionaries: dict | None = None, features: dict | None = None) -> dict:
    """Write ``metrics.json``: per relation the validation numbers of its component circuit
    (:func:`relation_metrics`) and of its feature circuit (:func:`feature_metrics`), plus the dictionaries."""
    val = validation["relations"]
    fval = {r: c["validation"] for r, c in (features or {}).get("relations", {}).items()}
    metrics: dict[str, Any] = {
        "model": _model_name(cfg), "metric": cfg.metric, "ablation": cfg.ablation, "granularity": cfg.granularity,
        "known": {k: known[k] for k in ("k", "n", "n_known", "accuracy")},
        "relations": {}}
    for rel, v in val.items():
        info = circuits["relations"][rel]["info"]
        metrics["relations"][rel] = {**relation_metrics(v), "cross_relation": v.get("cross_relation"),
                                     **{f"graph_{k}": x for k, x in info.items()}}
    if features is not None:
        metrics["feature_circuits"] = {rel: {**feature_metrics(v, features["relations"][rel]),
                                             **{f"graph_{k}": x for k, x in features["relations"][rel]["info"].items()
                                                if k not in ("seconds", "graph_scores")}}
                                       for rel, v in fval.items()}
    if dictionaries is not None:
        # what this run trained and how long it took depend on the cache, not on the results: config.json has them
        metrics["dictionaries"] = {k: v for k, v in dictionaries.items()
                                   if k not in ("_seconds", "seconds", "trained_layers")}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


@dataclass
class Figures:
    """The report's figures (paths relative to the run folder): per relation ``sections`` entries
    (``{"path", "caption"}``), the figures across relations, and the feature-circuit section."""

    sections: dict[str, list] = field(default_factory=dict)
    causal: str | None = None
    curves: str | None = None
    overlap: str | None = None
    feature_section: dict | None = None
    overlap_text: str | None = None


def write_figures(out: Path, attribution: dict, causal: dict, circ_objs: list, val: dict,
                  names: Mapping[str, Mapping[str, str]] | None = None) -> Figures:
    """Draw the patching heatmaps, the causal-tracing figure, the component circuits (nodes labelled with
    ``names[circuit][node id]`` where given, see :func:`node_names`), the held-out faithfulness curves and the
    circuits' overlap (:func:`circuit_overlap`) into ``out/figures``."""
    figs = out / "figures"
    sections: dict[str, list[dict[str, str]]] = {}
    for rel, r in attribution["relations"].items():
        p = fig.patching_heatmap(np.array(r["role_scores"]), r["roles"],
                                 f"{rel}: denoising resid_pre ({r['n_prompts']} prompt(s))",
                                 figs / f"patching_{safe_name(rel)}.png",
                                 colorbar_label="restored share of logit difference")
        sections.setdefault(rel, []).append({"path": _rel(p, out), "caption": (
            "Activation patching: share of the clean-minus-corrupted logit difference restored by patching the "
            "clean resid_pre at each (layer, token role) into the corrupted run.")})
    full = causal.get("full")
    causal_fig = None
    if full:
        states, mlp, attn = (np.array(full[k]["table"] if k != "states" else full["states_table"], dtype=float)
                             for k in ("states", "mlp", "attn"))
        p = fig.causal_tracing_figure(states, mlp, attn, full["classes"], figs / "causal_tracing.png",
                                      title=f"Causal tracing (ROME), mean over {full['n_facts']} facts")
        causal_fig = _rel(p, out)
    for c in circ_objs:
        p = fig.circuit_drawing(_labelled(c.to_dict(), (names or {}).get(c.name)),
                                figs / f"circuit_{safe_name(c.relation)}.png",
                                title=f"{c.relation}: pruned component circuit")
        sections.setdefault(c.relation, []).append({"path": _rel(p, out), "caption": (
            "The pruned circuit: layer on the vertical axis, token role on the horizontal; edge width and colour "
            "show the EAP edge score.")})
    held_curves = {r: (h["curve"]["fractions"], h["curve"]["faithfulness"]) for r, h in
                   ((r, v.get("held_out") or {}) for r, v in val.items()) if h.get("curve")}
    if held_curves:
        p = fig.faithfulness_curves(held_curves, figs / "faithfulness_curves.png")
        curves_fig = _rel(p, out)
    else:
        curves_fig = None
    overlap_fig = None
    if len(circ_objs) >= 2:
        rels, mat = circuit_overlap(circ_objs, val)
        overlap_fig = _rel(fig.overlap_matrix(rels, mat, figs / "circuit_overlap.png",
                                              title="Circuit overlap (non-inert nodes)"), out)
        overlap_text = _overlap_section(rels, mat)
    else:
        overlap_text = None
    return Figures(sections, causal_fig, curves_fig, overlap_fig, overlap_text=overlap_text)


def write_markdown(out: Path, cfg: RunConfig, timings: dict, known: dict, attribution: dict, hypotheses: dict,
                   val: dict, circ_objs: list, figures: Figures, *, features: dict | None = None,
                   dictionaries: dict | None = None, names: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """Write ``report.md`` (and ``known_facts.json``); returns the summary's ``relations`` and ``notes``.

    Every table column and every row of a per-circuit table is a term of :data:`GLOSSARY`
    (:mod:`circuit_discovery.report.glossary`); the findings are
    decided by :func:`circuit_finding`; the timings are ``timings`` without ``report`` and ``total`` (not known
    while the report is written)."""
    names = names or {}
    sections = figures.sections
    causal_fig, curves_fig, overlap_fig = figures.causal, figures.curves, figures.overlap
    feature_section = figures.feature_section
    hyp_rows = hypotheses["rows"]
    verdicts: dict[str, dict] = {}
    for h in hyp_rows:
        for rel in str(h["relation"]).split("|"):
            d = verdicts.setdefault(rel, {})
            key = h["hypothesis_id"] if h["hypothesis_id"] not in d else f"{h['hypothesis_id']} ({h['statistic']})"
            d[key] = h["verdict"]
    rows = []
    comp_status: dict[str, Finding] = {}
    for c in circ_objs:
        m = relation_metrics(val[c.relation]) if c.relation in val else {}
        comp_status[c.name] = circuit_finding(m, "component")
        rows.append({"name": c.name, "n_split": _split(m),
                     "held_out_f": _f_ci(m.get("held_out_faithfulness"), m.get("held_out_ci"), m.get("degenerate")),
                     "random_p": _p_draws(m.get("random_baseline_p"), m.get("random_draws")),
                     "node_share": _share(m), "validated": "yes" if m.get("validated") else "**no**",
                     "faithfulness": _fmt(m.get("faithfulness")), "cpr": _fmt(m.get("cpr")),
                     "top_nodes": _top(c, names.get(c.name, {}), 5, scores=False),
                     "verdicts": verdicts.get(c.relation, {})})
    done = {c.relation for c in circ_objs}
    skipped = []
    for rel, acc in known["per_relation"].items():
        if rel not in done:
            why = attribution.get("skipped", {}).get(rel) or ("no known facts" if not acc.get("n_known")
                                                               else "no usable subject-swap pair")
            skipped.append(f"{rel}: no circuit ({why}).")
    feat_status = _feature_status(features, dictionaries)
    sec_list = []
    for c in circ_objs:
        v = val.get(c.relation, {})
        m = relation_metrics(v) if v else {}
        h = v.get("held_out") or {}
        text = [_warning_line(c.name, comp_status[c.name])]
        fname = f"{c.relation}/features"
        if fname in feat_status:
            st = feat_status[fname]
            text.append((_warning_line(fname, st, with_advice=False) or
                         f"The feature circuit `{fname}` is a finding (table in \"Feature circuits\").")
                        + (" What to do: see \"Feature circuits\"." if st.advice else ""))
        text.append("Per-prompt graphs (Neuronpedia JSON): " + ", ".join(c.extra.get("graphs", [])))
        prompt = (c.extra.get("prompt_tokens") or [])
        metrics: dict[str, Any] = {
            **({"prompt template": "; ".join(known["templates"][c.relation])}
               if known.get("templates", {}).get(c.relation) else {}),
            **({"representative prompt": "".join(prompt)} if prompt else {}),
            "facts used (discovery / held out)": _split(m),
            "held-out f [95% CI]": _f_ci(m.get("held_out_faithfulness"), m.get("held_out_ci"), m.get("degenerate")),
            "in-sample f": _fmt(m.get("faithfulness")),
            "logit difference m(N) / m(empty) (held out)": f"{_fmt(h.get('m_full'))} / {_fmt(h.get('m_empty'))}",
            "nodes (% of non-inert)": _share(m),
            "non-inert nodes (held out)": h.get("n_universe"),
            "inert nodes left out": h.get("n_inert"),
            "held-out f at 1 / 2 / 5 / 10 / 20% of the non-inert nodes": _at(h.get("faithfulness_at")),
            "held-out CPR": _fmt(m.get("cpr")),
            "held-out CMD": _fmt(h.get("cmd")),
            "matched random p (draws)": _p_draws(m.get("random_baseline_p"), m.get("random_draws")),
            "matched random mean f": _fmt(h.get("random_mean")),
            "matched random exact zeros": _fmt(h.get("random_null_zero_share")),
            **({"(component, role) random: mean f, p": (
                f"{_fmt(h.get('role_random_mean'))}, {_fmt(h.get('role_random_p'), 3)}")}
               if h.get("role_random_p") is not None else {}),
            "top-ranked random subsets: mean f, p": f"{_fmt(h.get('topm_mean'))}, {_fmt(h.get('topm_p'), 3)}",
            "last-token f": _fmt(h.get("last_token_faithfulness")),
            "cross-relation f": _cross(v.get("cross_relation")),
            "validated": "yes" if m.get("validated") else "**no**",
            "attribution score": _fmt(c.attribution_score),
            "top nodes (score)": _top(c, names.get(c.name, {}), 10, scores=True)}
        sec_list.append({"name": c.relation, "text": "\n\n".join(t for t in text if t), "metrics": metrics,
                         "figures": sections.get(c.relation, [])})
    n_comp = sum(st.finding for st in comp_status.values())
    n_feat = sum(st.finding for st in feat_status.values())
    found = [n for n, st in {**comp_status, **feat_status}.items() if st.finding]
    summary_lines = [
        f"Findings: {n_comp} of {len(comp_status)} component circuits"
        + (f" and {n_feat} of {len(feat_status)} feature circuits" if feat_status else "")
        + " pass their checks" + (": " + ", ".join(found) + "." if found else "."),
        "A circuit is a finding only if it is validated (held-out f >= 0.7 with CI lower bound >= 0.5, matched "
        "random p < 0.01, <= 10% of the non-inert nodes) and, for feature circuits, every layer's transcoder meets "
        "the dictionary quality bar; every other circuit carries a warning below and is not counted.",
        *skipped]
    deg = [n for n, st in comp_status.items() if "degenerate" in st.codes]
    if deg:
        summary_lines.append(f"Degenerate (no metric difference to explain): {', '.join(deg)}.")
    notes = [f"Known-fact accuracy (every answer token ranked <= {known['k']}): "
             f"{known['n_known']}/{known['n']} = {known['accuracy']:.1%}.",
             *[f"Hypothesis {k} not run: {why}" for k, why in hypotheses.get("not_run", {}).items()],
             "Hypothesis p-values are adjusted with Benjamini-Hochberg within each family (hypotheses.csv column "
             "family); n is the number of independent units (prompts, facts or relations), never resamples.",
             "Timings: each stage's compute time when it ran, as saved with the stage (stages/*.json) and in "
             "config.json; config.json's `total` is the wall time of the command that wrote this folder last."]
    extra_sections: list[dict] = [_known_section(known)]
    if causal_fig:
        extra_sections.append({"name": "Causal tracing (ROME)", "figures": [{"path": causal_fig, "caption": (
            "Average indirect effect on the answer probability of restoring a window of MLP / attention outputs "
            "at one token class into a run with noised subject embeddings.")}]})
    if curves_fig or overlap_fig:
        extra_sections.append({"name": "Across relations", "text": figures.overlap_text or None, "figures": [
            *([{"path": curves_fig, "caption": "Node-level held-out faithfulness curves: f on the held-out facts "
                                                "against the fraction of the non-inert nodes kept, in the order of "
                                                "the discovery ranking."}] if curves_fig else []),
            *([{"path": overlap_fig, "caption": OVERLAP_CAPTION}] if overlap_fig else [])]})
    if feature_section:
        extra_sections.append(feature_section)
    summary = {"title": "Factual-recall circuits", "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "model": _model_name(cfg), "summary": summary_lines,
               "config": {"seed": cfg.seed, "quick": cfg.quick, "metric": cfg.metric, "max_facts": cfg.max_facts,
                          "held_out_facts": cfg.held_out_facts, "n_random": cfg.n_random,
                          "granularity": cfg.granularity, "method": cfg.component_method,
                          "circuit_search": cfg.circuit_search, "ablation": cfg.ablation,
                          "node_threshold": cfg.node_threshold, "known_k": cfg.known_k},
               "relations": rows, "glossary": GLOSSARY, "sections": extra_sections + sec_list,
               "hypotheses": [{k: h[k] for k in ("hypothesis_id", "relation", "statistic", "effect", "ci_low",
                                                 "ci_high", "p_value", "p_adjusted", "n", "verdict")}
                              for h in hyp_rows],
               "timings": {k: v for k, v in timings.items() if k not in ("report", "total", "this_command")},
               "notes": notes,
               "files": ["circuits.json", "metrics.json", "hypotheses.csv", "config.json", "known_facts.json",
                         "index.html"]}
    atomic_write_json(out / "known_facts.json", {k: v for k, v in known.items() if k != "_seconds"})
    write_report(out, summary)
    return {k: summary[k] for k in ("relations", "notes")}


# --------------------------------------------------------------------------- one source per number

def stage_timings(timings: dict, stages: Mapping[str, Mapping[str, Any] | None]) -> dict:
    """Fill ``timings`` (in place; also returned) with the saved ``_seconds`` of each stage result in ``stages``
    that this process did not time itself, as a resumed stage does: the one set of timings that report.md shows
    and config.json stores. Stages run by this process keep their measured time."""
    for name, data in stages.items():
        if isinstance(data, Mapping) and isinstance(data.get("_seconds"), (int, float)):
            timings.setdefault(name, float(data["_seconds"]))
    return timings


def circuit_overlap(circ_objs: Sequence, val: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], np.ndarray]:
    """``(circuit names, [n, n] Jaccard matrix)`` of the component circuits' node sets, each set being the circuit's
    nodes inside its relation's non-inert universe (``validation["universe"]``: what node shares, random draws and
    the ``shared_mechanism`` hypothesis count); without a universe, every node but the logit. The logit node, which
    every circuit has, and inert embeddings would otherwise raise every pair's overlap. ``circuit_overlap.png`` and
    report.md's overlap table both read this matrix."""
    sets = []
    for c in circ_objs:
        ids = {n.id for n in c.nodes if n.component != "logit"}
        uni = (val.get(c.relation) or {}).get("universe")
        sets.append(ids & set(uni) if uni else ids)
    n = len(sets)
    mat = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            union = sets[i] | sets[j]
            mat[i, j] = len(sets[i] & sets[j]) / len(union) if union else 1.0
    return [c.name for c in circ_objs], mat


#: what ``circuit_overlap.png`` shows (its caption in report.md)
OVERLAP_CAPTION = ("Jaccard overlap |A ∩ B| / |A ∪ B| of the component circuits' non-inert nodes (logit node and "
                   "inert nodes left out); the same matrix as the overlap table above.")


def _overlap_section(names: list[str], mat: np.ndarray) -> str:
    """The overlap table: per circuit its most-overlapping circuit, that Jaccard and the mean over the others
    (all read from ``mat``, the matrix the figure draws)."""
    rows = []
    n = len(names)
    for i, a in enumerate(names):
        others = [j for j in range(n) if j != i]
        if not others:
            continue
        best = max(others, key=lambda j: (mat[i, j], -j))
        rows.append([a, names[best], f"{mat[i, best]:.2f}", f"{float(np.mean([mat[i, j] for j in others])):.2f}"])
    between = [mat[i, j] for i in range(n) for j in range(n) if i < j]
    text = (f"Mean Jaccard over the {len(between)} pairs of component circuits: {float(np.mean(between)):.2f}. "
            "The shared_mechanism hypothesis (hypotheses.csv) compares split-half circuits against a stratified "
            "null; its effect is a share, not this Jaccard.\n\n" if between else "")
    return text + markdown_table(["circuit", "most-overlapping circuit", "Jaccard",
                                  "mean Jaccard with the other circuits"], rows, ["l", "l", "r", "r"])


# --------------------------------------------------------------------------- findings

#: The dictionary (transcoder / SAE) quality bar as (comparison, threshold) per SAELens metric name: the
#: feature stage's ``QUALITY_BAR`` (EV >= 0.8, CE-loss score >= 0.85, dead share <= 0.1, L0 <= 64).
DICTIONARY_QUALITY_BAR: dict[str, tuple[str, float]] = {
    k: (">=" if k in ("explained_variance", "ce_loss_score") else "<=", float(v)) for k, v in QUALITY_BAR.items()}

_DICTIONARY_ADVICE = ("treat this feature circuit as a description of the transcoder replacement model, not of the "
                      "model: train the transcoders on more tokens (`frc train-sae --training-tokens N`, "
                      "docs/sae.md) or use pretrained ones until every layer meets the bar, then rebuild the "
                      "feature circuits (`frc circuits`)")


def _meets(value: Any, op: str, bar: float) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(float(value)):
        return False
    return float(value) >= bar if op == ">=" else float(value) <= bar


def dictionary_quality(validation: Mapping[str, Any] | None, dictionaries: Mapping[str, Any] | None
                       ) -> dict | None:
    """The quality of the dictionaries a feature circuit rests on: ``validation["dictionary_quality"]`` when the
    feature-circuit validation carries it, else ``dictionaries["dictionary_quality"]`` (the dictionaries stage's),
    else computed from ``dictionaries["layers"]`` (metrics.json's
    ``dictionaries``: every layer, since the replacement model replaces every MLP) against
    :data:`DICTIONARY_QUALITY_BAR`. ``{"meets_bar", "bar", "layers_below_bar", "source", "advice"}``, or ``None``
    when neither is available."""
    for given in ((validation or {}).get("dictionary_quality"), (dictionaries or {}).get("dictionary_quality")):
        if isinstance(given, Mapping):
            return dict(given)
    layers = (dictionaries or {}).get("layers")
    if not isinstance(layers, Mapping) or not layers:
        return None
    below = [_layer_number(key) for key, row in layers.items() if not _row_meets(row)]
    return {"meets_bar": not below,
            "bar": {k: f"{op} {bar:g}" for k, (op, bar) in DICTIONARY_QUALITY_BAR.items()},
            "layers_below_bar": sorted(below, key=lambda x: (isinstance(x, str), str(x).zfill(4))),
            "source": "metrics.json dictionaries.layers (computed by the report)",
            "advice": None if not below else _DICTIONARY_ADVICE}


def _row_meets(row: Any) -> bool:
    """A layer's metrics meet every bar (a layer without metrics does not: its quality is unknown)."""
    return isinstance(row, Mapping) and all(_meets(row.get(k), op, bar)
                                            for k, (op, bar) in DICTIONARY_QUALITY_BAR.items())


def _layer_number(key: Any) -> int | str:
    head = str(key).split(".")
    if len(head) > 1 and head[0] == "blocks" and head[1].isdigit():
        return int(head[1])
    return int(key) if str(key).isdigit() else str(key)


#: The checks :func:`circuit_finding` makes, as the codes of :attr:`Finding.codes`: what each failed check means.
FINDING_CODES: dict[str, str] = {
    "no_validation": "the circuit has no validation entry",
    "degenerate": "the held-out metric difference |m(N) - m(empty)| is below the minimum gap (f undefined)",
    "held_out_faithfulness": "held-out f is missing, or below 0.7 / its CI lower bound below 0.5",
    "random_baseline": "the circuit does not beat matched random circuits at p < 0.01",
    "circuit_size": "the circuit uses more than 10% of the non-inert nodes",
    "dictionary_quality_unknown": "a feature circuit's dictionaries have no quality metrics",
    "dictionary_quality": "a feature circuit's transcoders are below the dictionary quality bar at some layer",
    "not_validated": "the circuit passes every other check but is not marked validated",
}


@dataclass(frozen=True)
class Finding:
    """Whether a circuit counts as a finding (``finding``), why not (``reasons``, plain sentences), what to do
    about dictionaries below the bar (``advice``) and the failed checks (``codes``: one key of
    :data:`FINDING_CODES` per entry of ``reasons``, in the same order)."""

    finding: bool
    reasons: tuple[str, ...] = ()
    advice: str | None = None
    codes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.reasons):
            raise ValueError(f"a Finding needs one code per reason, got {len(self.codes)} code(s) for "
                             f"{len(self.reasons)} reason(s)")
        unknown = [c for c in self.codes if c not in FINDING_CODES]
        if unknown:
            raise ValueError(f"unknown finding code(s) {unknown}; the codes are {list(FINDING_CODES)}")

    def warning(self) -> str | None:
        """The plain warning a circuit that is not a finding carries, or ``None``."""
        if self.finding:
            return None
        return "; ".join(self.reasons) + (f". What to do: {self.advice}" if self.advice else "")


def circuit_finding(metrics: Mapping[str, Any] | None, kind: str = "component",
                    dictionaries: Mapping[str, Any] | None = None) -> Finding:
    """The one decision whether a circuit is a finding, from its metrics.json entry (``metrics["relations"][r]`` for
    ``kind="component"``, ``metrics["feature_circuits"][r]`` for ``kind="feature"``): it must be validated
    (held-out f >= 0.7 with CI lower bound >= 0.5, matched random p < 0.01, <= 10% of the non-inert nodes, not
    degenerate), and a feature circuit must rest on dictionaries that meet the bar (its entry's
    ``dictionary_quality``, else computed from ``dictionaries`` = metrics.json's ``dictionaries``, see
    :func:`dictionary_quality`; unknown quality is not a finding). Each failed check adds its sentence to
    ``reasons`` and its key of :data:`FINDING_CODES` to ``codes``."""
    if kind not in ("component", "feature"):
        raise ValueError(f"kind must be 'component' or 'feature', got {kind!r}")
    m = metrics or {}
    failed: list[tuple[str, str]] = []  # (code, reason) per failed check

    def fail(code: str, reason: str) -> None:
        failed.append((code, reason))

    if not m:
        fail("no_validation", "it was not validated (no validation entry)")
    elif m.get("degenerate"):
        fail("degenerate", "degenerate: the held-out metric difference |m(N) - m(empty)| is below the minimum gap, "
                           "so the model does not separate the answers on these facts and faithfulness is undefined")
    else:
        f, ci, p = m.get("held_out_faithfulness"), m.get("held_out_ci") or [None, None], m.get("random_baseline_p")
        if f is None:
            fail("held_out_faithfulness", "no held-out faithfulness")
        else:
            if f < 0.7 or ci[0] is None or ci[0] < 0.5:
                fail("held_out_faithfulness", f"held-out f {f:.3f} (CI low {_fmt(ci[0], 3)}) is below 0.7 / 0.5")
            if p is None or p >= 0.01:
                fail("random_baseline", f"it does not beat matched random circuits at p < 0.01 (p = {_fmt(p, 3)})")
        if (m.get("node_share") or 0) > 0.10:
            fail("circuit_size", f"it uses {100 * m['node_share']:.1f}% of the non-inert nodes (> 10%)")
    advice = None
    if kind == "feature":
        dq = dictionary_quality(m, dictionaries)
        if dq is None:
            fail("dictionary_quality_unknown", "the quality of its dictionaries is unknown (no dictionary metrics)")
            advice = _DICTIONARY_ADVICE
        elif not dq.get("meets_bar"):
            below = dq.get("layers_below_bar") or []
            fail("dictionary_quality", f"its transcoders are below the dictionary quality bar at {len(below)} "
                                       f"layer(s) ({_ranges([_layer_number(x) for x in below])})")
            advice = str(dq.get("advice") or _DICTIONARY_ADVICE)
    if m and not failed and not m.get("validated"):
        fail("not_validated", "it is not marked validated")
    return Finding(not failed, tuple(r for _, r in failed), advice, tuple(c for c, _ in failed))


def _ranges(xs: Sequence[Any]) -> str:
    """Layer numbers as ranges: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    ints = sorted(x for x in xs if isinstance(x, int))
    parts: list[str] = []
    for x in ints:
        if parts and parts[-1].split("-")[-1] == str(x - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{x}"
        else:
            parts.append(str(x))
    return ", ".join(parts + [str(x) for x in xs if not isinstance(x, int)])


def _warning_line(name: str, status: Finding, with_advice: bool = True) -> str | None:
    if status.finding:
        return None
    w = status.warning() if with_advice else "; ".join(status.reasons)
    return f"> **Warning — {name}: not a finding.** {w}."


def _feature_status(features: dict | None, dictionaries: dict | None) -> dict[str, Finding]:
    out = {}
    for rel, c in (features or {}).get("relations", {}).items():
        v = c.get("validation")
        m = None if v is None else {**feature_metrics(v, c), "dictionary_quality": v.get("dictionary_quality")}
        out[f"{rel}/features"] = circuit_finding(m, "feature", dictionaries)
    return out


# --------------------------------------------------------------------------- node names with their tokens

def role_tokens(prompt_tokens: Sequence[str], prompt: str | None = None, subject: str | None = None
                ) -> dict[str, list[tuple[int, str]]]:
    """The prompt's ``(position, token)`` pairs per token role (``bos``, ``subject_first``, ``subject_middle``,
    ``subject_last``, ``relation_first``, ``relation``, ``last``; :func:`circuit_discovery.token_roles.token_roles`),
    found by aligning ``prompt_tokens`` with ``prompt`` and locating ``subject`` in it. Without the subject (or when
    the tokens do not spell the prompt) only ``bos`` and ``last`` are known."""
    toks = [str(t) for t in prompt_tokens]
    if not toks:
        return {}
    out: dict[str, list[tuple[int, str]]] = {"last": [(len(toks) - 1, toks[-1])]}
    first = next((i for i in range(min(2, len(toks))) if prompt is not None and "".join(toks[i:]) == prompt), None)
    if first == 1:
        out["bos"] = [(0, toks[0])]
    if first is None or not subject or prompt is None or subject not in prompt:
        return out
    start = prompt.index(subject)
    end = start + len(subject)
    pos, hit = 0, []
    for i, t in enumerate(toks[first:], start=first):
        a, b = pos, pos + len(t)
        if b > a and a < end and b > start and prompt[max(a, start):min(b, end)].strip():
            hit.append(i)
        pos = b
    if not hit:
        return out
    try:
        roles = token_roles(len(toks), (hit[0], hit[-1] + 1), has_bos=first == 1)
    except TokenRoleError:
        return out
    by_role: dict[str, list[tuple[int, str]]] = {}
    for i, (t, r) in enumerate(zip(toks, roles)):
        by_role.setdefault(r, []).append((i, t))
    return by_role


def _token_text(pos_tokens: Sequence[tuple[int, str]]) -> str:
    """Contiguous runs of tokens, each quoted, joined by " … ": ``'The capital of' … ' called'``."""
    runs: list[list[tuple[int, str]]] = []
    for i, t in sorted(pos_tokens):
        if runs and runs[-1][-1][0] == i - 1:
            runs[-1].append((i, t))
        else:
            runs.append([(i, t)])
    return " … ".join(repr("".join(t for _, t in run)) for run in runs)


_SHORT = {"resid_pre": "Resid", "resid_mid": "ResidMid", "resid_post": "ResidPost", "attn_out": "Attn",
          "mlp_out": "MLP", "error": "Err"}


def node_name(node: Mapping[str, Any], tokens_by_role: Mapping[str, Sequence[tuple[int, str]]],
              with_role: bool = True) -> str:
    """A node's display name with the prompt tokens of its position or role: ``L12.H2 @ ' of' (last)``,
    ``Emb @ ' Louvre' (subject_last)``, ``L3 MLP @ 'The' … ' called' (relation)``; a feature keeps its
    promoted tokens (``→ ...``) from its label. ``with_role=False`` leaves out the role (figures draw it as the
    column)."""
    comp, layer, idx = str(node.get("component")), node.get("layer"), node.get("index")
    if comp == "embed":
        base = "Emb"
    elif comp == "logit":  # the metric: the answer's logit minus the counterfactual answer's
        return "Logit difference (answer - counterfactual)"
    elif comp in ("head", "neuron"):
        base = f"L{layer}.{'H' if comp == 'head' else 'N'}{idx}"
    elif comp == "feature":
        base = f"L{layer} F{idx}"
    else:
        base = f"L{layer} {_SHORT.get(comp, comp)}"
    role, pos = node.get("role"), node.get("position")
    toks = list(tokens_by_role.get(str(role), [])) if role else []
    text = base
    if toks:
        text += f" @ {_token_text(toks)}"
    elif isinstance(pos, int) and not isinstance(pos, bool):
        text += f" @ position {pos}"
    elif role and tokens_by_role and with_role:
        return f"{base} ({role}, absent from the representative prompt)"
    if role and with_role:
        text += f" ({role})"
    label = str(node.get("label") or "")
    if comp == "feature" and " → " in label:
        text += " → " + label.split(" → ", 1)[1]
    return text


def node_names(circuits: Sequence, known: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{circuit name: {node id: display name}}`` (:func:`node_name`, role left out) for every circuit, from the
    circuit's representative prompt (``prompt_tokens``, its first fact) and that fact's subject in the known
    stage's facts."""
    by_relation: dict[str, list[Mapping[str, Any]]] = {}
    for f in known.get("facts", []):
        if isinstance(f, Mapping) and f.get("prompt") and f.get("subject"):
            by_relation.setdefault(str(f.get("relation")), []).append(f)
    out: dict[str, dict[str, str]] = {}
    for c in circuits:
        prompt = c.facts[0].get("prompt") if c.facts else None
        # the pair's prompt may end with answer tokens moved into it (multi-token answers): match by prefix
        cands = [f for f in by_relation.get(c.relation, []) if prompt and prompt.startswith(f["prompt"])]
        subject = max(cands, key=lambda f: len(f["prompt"]))["subject"] if cands else None
        rt = role_tokens(c.extra.get("prompt_tokens") or [], prompt, subject)
        out[c.name] = {n.id: node_name(dataclasses.asdict(n), rt) for n in c.nodes}
    return out


def _labelled(circuit: dict, names: Mapping[str, str] | None) -> dict:
    """``circuit`` (a circuits.json entry) with node labels replaced by ``names`` (role left out)."""
    if not names:
        return circuit
    nodes = []
    for n in circuit.get("nodes", []):
        nm = names.get(n.get("id"))
        nodes.append({**n, "label": nm.rsplit(" (", 1)[0] if nm and nm.endswith(")") and " → " not in nm else nm}
                     if nm else n)
    return {**circuit, "nodes": nodes}


def _top(c, names: Mapping[str, str], k: int, scores: bool) -> list[str]:
    """The ``k`` nodes of circuit ``c`` with the largest |score| (logit and score-0 nodes left out), by name."""
    nodes = sorted((n for n in c.nodes if n.component != "logit" and n.score), key=lambda n: -abs(n.score or 0))[:k]
    return [(names.get(n.id) or n.label or n.id) + (f" [{n.score:.3g}]" if scores else "") for n in nodes]


# --------------------------------------------------------------------------- sections


def _known_section(known: dict) -> dict:
    rows = [[rel, acc.get("n"), acc.get("n_known"), _pct(acc.get("accuracy"))]
            for rel, acc in known["per_relation"].items()]
    return {"name": "Known facts", "text": (
        f"A fact is known when every answer token ranks <= {known['k']} on its prompt; circuits use known facts only "
        "(\"facts used\" in the tables below).\n\n" + markdown_table(
            ["relation", "facts in the dataset", "known facts", "known share"], rows, ["l", "r", "r", "r"]))}


def _cross(c):
    return "—" if not c else f"{_fmt(c.get('faithfulness'))} ({c['relation']})"


def _mean(x):
    return None if not x else float(np.mean(x))


def _feature_section(out: Path, figs: Path, feat_objs, fval: dict, features: dict, dictionaries: dict | None,
                     names: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """The report section on transcoder feature circuits: a table per circuit, the warnings, the dictionaries'
    quality per layer and the figures."""
    names = names or {}
    figures = []
    layers = (dictionaries or {}).get("layers") or {}
    if layers:
        p = fig.sae_metrics_per_layer(layers, figs / "sae_metrics.png", title="Transcoders per layer (held-out tokens)")
        figures.append({"path": _rel(p, out), "caption": (
            "SAELens metrics of each layer's transcoder on held-out tokens of the built-in corpus; dashed lines: "
            "the quality bar (EV >= 0.8, CE-loss score >= 0.85, dead share <= 0.1, L0 <= 64).")})
    by_rel = {c.relation: c for c in feat_objs}
    for c in feat_objs:
        p = fig.circuit_drawing(_labelled(c.to_dict(), names.get(c.name)),
                                figs / f"circuit_features_{safe_name(c.relation)}.png",
                                title=f"{c.name}: pruned transcoder-feature circuit")
        figures.append({"path": _rel(p, out), "caption": (
            f"{c.name}: feature circuit (transcoder features, error nodes and embeddings by layer and token "
            "role).")})
    held_curves = {r: (v["held_out"]["curve"]["fractions"], v["held_out"]["curve"]["faithfulness"])
                   for r, v in fval.items() if (v.get("held_out") or {}).get("curve")}
    if held_curves:
        p = fig.faithfulness_curves(held_curves, figs / "faithfulness_curves_features.png")
        figures.append({"path": _rel(p, out), "caption": "Held-out faithfulness curves of the feature circuits "
                                                          "(replacement model, non-inert nodes)."})
    status = _feature_status(features, dictionaries)
    rows, warnings = [], []
    for rel, v in fval.items():
        m = feature_metrics(v, features["relations"][rel])
        name = f"{rel}/features"
        dq = dictionary_quality(v, dictionaries)
        rows.append([name, _split(m), _share(m),
                     _f_ci(m["held_out_faithfulness"], m["held_out_ci"], m["degenerate"]),
                     _f_ci(m["held_out_faithfulness_live"], m["held_out_ci_live"], m["degenerate"]),
                     _fmt(m["faithfulness"]), _p_draws(m["random_baseline_p"], m["random_draws"]),
                     "—" if dq is None else ("yes" if dq.get("meets_bar") else "**no**"),
                     "yes" if status[name].finding else "**no**",
                     _fmt(_mean(m["replacement_score"])), _fmt(_mean(m["completeness_score"])),
                     _fmt(_mean(m["error_influence_share"])),
                     _fmt(m["baseline_embeddings_and_errors"]), _fmt(m["baseline_features_only"]),
                     _fmt(_mean(m["feature_ablation_drop"])), _fmt(_mean(m["random_feature_ablation_drop"])),
                     _fmt(_mean(m["steering_flips"])), _fmt(_mean(m["steering_random_flip_rate"])),
                     _top(by_rel[rel], names.get(name, {}), 3, scores=False) if rel in by_rel else None])
        line = _warning_line(name, status[name], with_advice=False)
        if line:
            warnings.append(line)
    advice = sorted({st.advice for st in status.values() if st.advice})
    if advice:
        warnings.append("> **What to do about the dictionaries:** " + " / ".join(advice) + ".")
    table = markdown_table(["circuit", "facts used (discovery / held out)", "nodes (% of non-inert)",
                            "held-out f [95% CI]", "held-out f, live errors [95% CI]", "in-sample f",
                            "matched random p (draws)", "dictionaries meet the bar", "finding", "replacement score",
                            "completeness score", "error share of influence", "f: embeddings + all errors",
                            "f: features only", "necessity drop", "random-feature drop", "steering flip rate",
                            "random flip rate", "top nodes"], rows)
    s = (dictionaries or {}).get("settings", {})
    text = ("Circuits over per-layer transcoder features (" + f"TopK k = {s.get('k')}, "
            f"{s.get('training_tokens')} training tokens per layer) built from attribution graphs with frozen "
            "attention and norms. An error node at (layer, position) is the MLP's output minus the transcoder's "
            "b_dec and the graph's feature nodes there (so it also holds the features the graph did not visit); the "
            "graph and the evaluator use this same definition. Faithfulness is measured twice on held-out facts: in "
            "the replacement model (error nodes in the circuit frozen at their clean values; the column held-out f) "
            "and with live errors (the real MLP runs and each ablated feature adds its decoder-direction change, as "
            "circuit-tracer's interventions do). The glossary defines every column.\n\n" + table)
    if warnings:
        text += "\n\n" + "\n\n".join(warnings)
    if layers:
        text += "\n\n" + _dictionary_table(layers)
    return {"name": "Feature circuits (transcoders)", "figures": figures, "text": text}


def _dictionary_table(layers: Mapping[str, Any]) -> str:
    rows = []
    for key, row in sorted(layers.items(), key=lambda kv: str(_layer_number(kv[0])).zfill(4)):
        ok = _row_meets(row)
        row = row if isinstance(row, Mapping) else {}
        rows.append([_layer_number(key), _fmt(row.get("explained_variance")), _fmt(row.get("ce_loss_score")),
                     _fmt(row.get("dead_fraction")), _fmt(row.get("l0"), 1), "yes" if ok else "**no**"])
    return ("Dictionary quality per layer (the bar: EV >= 0.8, CE-loss score >= 0.85, dead share <= 0.1, "
            "L0 <= 64):\n\n" + markdown_table(["layer", "EV", "CE-loss score", "dead share", "L0", "meets the bar"],
                                              rows, ["r", "r", "r", "r", "r", "l"]))


def _split(m: Mapping[str, Any]) -> str:
    return f"{_or_dash(m.get('n_discovery'))} / {_or_dash(m.get('n_held_out'))}"


def _or_dash(x: Any) -> str:
    return "—" if x is None else str(x)


def _f_ci(f, ci, degenerate=False) -> str:
    if degenerate:
        return "degenerate"
    if f is None:
        return "—"
    lo, hi = (ci or [None, None])[:2]
    return f"{f:.2f} [{_fmt(lo)}, {_fmt(hi)}]"


def _p_draws(p, draws) -> str:
    """p with 3 significant digits (the smallest p of 100 draws, 1/101, shows as 0.0099, below the 0.01 bar) and
    its number of draws."""
    return "—" if p is None else f"{p:.3g} ({draws})"


def _share(m: Mapping[str, Any]) -> str:
    s = m.get("node_share")
    return "—" if s is None else f"{m.get('circuit_size')} ({100 * s:.1f}%)"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _at(at) -> str:
    if not at:
        return "—"
    return " / ".join(_fmt(at.get(k)) for k in sorted(at, key=float))
