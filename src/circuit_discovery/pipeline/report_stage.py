"""Writes the run folder from the stage results: circuits.json, metrics.json, hypotheses.csv (already written by its
stage), figures/*.png, graphs/*.json (written by the circuits stage), index.html and report.md.

:func:`write_outputs` runs the phases in order: :func:`circuit_objects` (then ``circuits.json``),
:func:`write_metrics`, :func:`write_figures`, the viewer and :func:`write_markdown`.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circuit_discovery.graph.circuit import write_circuits_json
from circuit_discovery.io import atomic_write_json, safe_name
from circuit_discovery.pipeline.circuit_stage import component_circuit, relation_metrics
from circuit_discovery.pipeline.config import RunConfig
from circuit_discovery.pipeline.feature_stage import feature_circuit, feature_metrics
from circuit_discovery.report import figures as fig
from circuit_discovery.report.markdown import write_report
from circuit_discovery.report.viewer import write_viewer

__all__ = ["write_outputs", "circuit_objects", "write_metrics", "write_figures", "write_markdown",
           "relation_metrics", "feature_metrics"]


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
    ``notes``. ``timings`` (seconds per stage) goes into report.md."""
    out = Path(out_dir)
    val = validation["relations"]
    circ_objs, feat_objs = circuit_objects(circuits, validation, features)
    cj = {"model": _model_name(cfg), "circuits": [c.to_dict() for c in circ_objs + feat_objs]}
    write_circuits_json(circ_objs + feat_objs, out / "circuits.json", model=_model_name(cfg))
    write_metrics(out, cfg, known, circuits, validation, dictionaries, features)
    figures = write_figures(out, attribution, causal, circ_objs, val)
    if features is not None:
        fval = {r: c["validation"] for r, c in features["relations"].items()}
        figures.feature_section = _feature_section(out, out / "figures", feat_objs, fval, features, dictionaries)
    write_viewer(out, cj, feature_details=(features or {}).get("feature_details") or None)
    return write_markdown(out, cfg, timings, known, attribution, hypotheses, val, circ_objs, figures)


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
        metrics["dictionaries"] = {k: v for k, v in dictionaries.items() if k not in ("_seconds", "seconds")}
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


def write_figures(out: Path, attribution: dict, causal: dict, circ_objs: list, val: dict) -> Figures:
    """Draw the patching heatmaps, the causal-tracing figure, the component circuits, the held-out faithfulness
    curves and the circuits' overlap into ``out/figures``."""
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
        p = fig.circuit_drawing(c.to_dict(), figs / f"circuit_{safe_name(c.relation)}.png",
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
        names = [c.relation for c in circ_objs]
        mat = np.array([[a.compare(b)["jaccard"] for b in circ_objs] for a in circ_objs])
        overlap_fig = _rel(fig.overlap_matrix(names, mat, figs / "circuit_overlap.png"), out)
    return Figures(sections, causal_fig, curves_fig, overlap_fig)


def write_markdown(out: Path, cfg: RunConfig, timings: dict, known: dict, attribution: dict, hypotheses: dict,
                   val: dict, circ_objs: list, figures: Figures) -> dict:
    """Write ``report.md`` (and ``known_facts.json``); returns the summary's ``relations`` and ``notes``."""
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
    for c in circ_objs:
        m = relation_metrics(val[c.relation]) if c.relation in val else {}
        acc = known["per_relation"].get(c.relation, {})
        top = sorted((n for n in c.nodes if n.component not in ("logit",)), key=lambda n: -abs(n.score or 0))[:5]
        rows.append({"name": c.relation, "n_facts": acc.get("n"), "n_known": acc.get("n_known"),
                     "n_split": f"{m.get('n_discovery')} / {m.get('n_held_out')}",
                     "held_out_f": _f_ci(m.get("held_out_faithfulness"), m.get("held_out_ci"), m.get("degenerate")),
                     "random_p": _p_draws(m.get("random_baseline_p"), m.get("random_draws")),
                     "node_share": _share(m), "validated": "yes" if m.get("validated") else "**no**",
                     "faithfulness": m.get("faithfulness"), "cpr": m.get("cpr"),
                     "top_nodes": [n.label for n in top], "verdicts": verdicts.get(c.relation, {})})
    done = {c.relation for c in circ_objs}
    for rel, acc in known["per_relation"].items():
        if rel not in done:
            why = attribution.get("skipped", {}).get(rel) or ("no known facts" if not acc.get("n_known")
                                                               else "no usable subject-swap pair")
            rows.append({"name": rel, "n_facts": acc.get("n"), "n_known": acc.get("n_known"),
                         "top_nodes": [f"(skipped: {why})"]})
    sec_list = []
    for c in circ_objs:
        v = val.get(c.relation, {})
        m = relation_metrics(v) if v else {}
        h = v.get("held_out") or {}
        warn = _warning(m)
        sec_list.append({"name": c.relation, "text": ((f"**Warning: {warn}**\n\n" if warn else "") +
                                                      "Per-prompt graphs (Neuronpedia JSON): "
                                                      + ", ".join(c.extra.get("graphs", []))), "metrics": {
            **({"prompt template (how it was found)": "; ".join(known["templates"][c.relation])}
               if known.get("templates", {}).get(c.relation) else {}),
            "facts (discovery / held out)": f"{m.get('n_discovery')} / {m.get('n_held_out')}",
            "held-out faithfulness [95% bootstrap CI over prompts]": _f_ci(m.get("held_out_faithfulness"),
                                                                           m.get("held_out_ci"), m.get("degenerate")),
            "in-sample faithfulness (discovery facts)": m.get("faithfulness"),
            "circuit nodes / non-inert nodes (held out)": (
                f"{h.get('circuit_size')} / {h.get('n_universe')} ({_pct(m.get('node_share'))}; "
                f"{h.get('n_inert')} inert nodes left out)"),
            "held-out f at 1 / 2 / 5 / 10 / 20% of the non-inert nodes": _at(h.get("faithfulness_at")),
            "node-level held-out CPR / CMD": f"{_fmt(h.get('cpr'))} / {_fmt(h.get('cmd'))}",
            "matched random circuits: mean f, p (draws), exact zeros": (
                f"{_fmt(h.get('random_mean'))}, {_p_draws(h.get('random_p'), h.get('random_draws'))}, "
                f"{_fmt(h.get('random_null_zero_share'))}"),
            **({"random circuits matched on (component, role) only, other layers allowed: mean f, p": (
                f"{_fmt(h.get('role_random_mean'))}, {_fmt(h.get('role_random_p'), 3)}")}
               if h.get("role_random_p") is not None else {}),
            "random subsets of the top-ranked nodes: mean f, p": (
                f"{_fmt(h.get('topm_mean'))}, {_fmt(h.get('topm_p'), 3)}"),
            "every last-token node (+ embeddings): f": h.get("last_token_faithfulness"),
            "on another relation's facts: f": _cross(v.get("cross_relation")),
            "validated": "yes" if m.get("validated") else "no",
            "attribution score": c.attribution_score},
            "figures": sections.get(c.relation, [])})
    headline = _headline(val)
    notes = [f"Known-fact accuracy (every answer token ranked <= {known['k']}): "
             f"{known['n_known']}/{known['n']} = {known['accuracy']:.1%}.", headline,
             *[f"Hypothesis {k} not run: {why}" for k, why in hypotheses.get("not_run", {}).items()],
             "Hypothesis p-values are adjusted with Benjamini-Hochberg within each family (column family); n is "
             "the number of independent units (prompts, facts or relations), never resamples."]
    extra_sections = []
    if causal_fig:
        extra_sections.append({"name": "Causal tracing (ROME)", "figures": [{"path": causal_fig, "caption": (
            "Average indirect effect on the answer probability of restoring a window of MLP / attention outputs "
            "at one token class into a run with noised subject embeddings.")}]})
    if curves_fig or overlap_fig:
        extra_sections.append({"name": "Across relations", "figures": [
            *([{"path": curves_fig, "caption": "Node-level held-out faithfulness curves: f on the held-out facts "
                                                "against the fraction of the non-inert nodes kept, in the order of "
                                                "the discovery ranking."}] if curves_fig else []),
            *([{"path": overlap_fig, "caption": "Jaccard overlap of the circuits' nodes."}] if overlap_fig else [])]})
    if feature_section:
        extra_sections.append(feature_section)
    summary = {"title": "Factual-recall circuits", "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "model": _model_name(cfg),
               "config": {"seed": cfg.seed, "quick": cfg.quick, "metric": cfg.metric, "max_facts": cfg.max_facts,
                          "held_out_facts": cfg.held_out_facts, "n_random": cfg.n_random,
                          "granularity": cfg.granularity, "method": cfg.component_method, "ablation": cfg.ablation,
                          "node_threshold": cfg.node_threshold, "known_k": cfg.known_k},
               "relations": rows, "definitions": DEFINITIONS, "sections": extra_sections + sec_list,
               "hypotheses": [{k: h[k] for k in ("hypothesis_id", "relation", "statistic", "effect", "ci_low",
                                                 "ci_high", "p_value", "p_adjusted", "n", "verdict")}
                              for h in hyp_rows],
               "timings": dict(timings), "notes": notes,
               "files": ["circuits.json", "metrics.json", "hypotheses.csv", "config.json", "known_facts.json",
                         "index.html"]}
    atomic_write_json(out / "known_facts.json", {k: v for k, v in known.items() if k != "_seconds"})
    write_report(out, summary)
    return {k: summary[k] for k in ("relations", "notes")}


def _cross(c):
    return "—" if not c else f"{_fmt(c.get('faithfulness'))} ({c['relation']})"


def _mean(x):
    return None if not x else float(np.mean(x))


def _feature_section(out: Path, figs: Path, feat_objs, fval: dict, features: dict, dictionaries: dict | None) -> dict:
    """The report section on transcoder feature circuits: a table per relation and the figures."""
    from circuit_discovery.report.markdown import markdown_table

    figures = []
    layers = (dictionaries or {}).get("layers") or {}
    if layers:
        p = fig.sae_metrics_per_layer(layers, figs / "sae_metrics.png", title="Transcoders per layer (held-out tokens)")
        figures.append({"path": _rel(p, out), "caption": (
            "SAELens metrics of each layer's transcoder on held-out tokens of the built-in corpus; dashed lines: "
            "the quality bar (EV >= 0.8, CE score >= 0.85, dead <= 0.1, L0 <= 64).")})
    for c in feat_objs:
        p = fig.circuit_drawing(c.to_dict(), figs / f"circuit_features_{safe_name(c.relation)}.png",
                                title=f"{c.relation}: pruned transcoder-feature circuit")
        figures.append({"path": _rel(p, out), "caption": (
            f"{c.relation}: feature circuit (transcoder features, error nodes and embeddings by layer and token "
            "role).")})
    held_curves = {r: (v["held_out"]["curve"]["fractions"], v["held_out"]["curve"]["faithfulness"])
                   for r, v in fval.items() if (v.get("held_out") or {}).get("curve")}
    if held_curves:
        p = fig.faithfulness_curves(held_curves, figs / "faithfulness_curves_features.png")
        figures.append({"path": _rel(p, out), "caption": "Held-out faithfulness curves of the feature circuits "
                                                          "(replacement model, non-inert nodes)."})
    rows = []
    for rel, v in fval.items():
        m = feature_metrics(v, features["relations"][rel])
        rows.append([rel, f"{m['n_discovery']} / {m['n_held_out']}", _share(m),
                     _f_ci(m["held_out_faithfulness"], m["held_out_ci"], m["degenerate"]),
                     _f_ci(m["held_out_faithfulness_live"], m["held_out_ci_live"], m["degenerate"]),
                     _fmt(m["faithfulness"]), _p_draws(m["random_baseline_p"], m["random_draws"]),
                     _fmt(_mean(m["replacement_score"])), _fmt(_mean(m["completeness_score"])),
                     _fmt(_mean(m["error_influence_share"])),
                     _fmt(m["baseline_embeddings_and_errors"]), _fmt(m["baseline_features_only"]),
                     _fmt(_mean(m["feature_ablation_drop"])), _fmt(_mean(m["random_feature_ablation_drop"])),
                     _fmt(_mean(m["steering_flips"])), _fmt(_mean(m["steering_random_flip_rate"]))])
    table = markdown_table(["relation", "facts (disc. / held out)", "nodes (% of non-inert)",
                            "held-out f, replacement [CI]", "held-out f, live errors [CI]", "in-sample f",
                            "matched random p (draws)", "replacement score", "completeness score",
                            "error share of influence", "f: embeddings + all errors", "f: features only",
                            "necessity drop", "random-feature drop", "steering flip rate", "random flip rate"], rows)
    s = (dictionaries or {}).get("settings", {})
    text = ("Circuits over per-layer transcoder features (" + f"TopK k = {s.get('k')}, "
            f"{s.get('training_tokens')} training tokens per layer) built from attribution graphs with frozen "
            "attention and norms. An error node at (layer, position) is the MLP's output minus the transcoder's "
            "b_dec and the graph's feature nodes there (so it also holds the features the graph did not visit); the "
            "graph and the evaluator use this same definition. Faithfulness is measured twice on held-out facts: in "
            "the replacement model (error nodes in the circuit frozen at their clean values) and with live errors "
            "(the real MLP runs and each ablated feature adds its decoder-direction change, as circuit-tracer's "
            "interventions do). Replacement and completeness scores: circuit-tracer's graph scores (1 = no error "
            "influence), mean over the discovery graphs. Baselines: f of the embeddings and every error node alone, "
            "and of every feature with the errors ablated (replacement model, discovery facts). Necessity drop: mean "
            "held-out per-prompt metric drop when the circuit's top features are ablated (live errors), against the "
            "drop from as many random active features matched per (layer, role); steering flip rate: share of "
            "held-out prompts whose answer flips to the counterfactual when the circuit's subject features take "
            "the counterfactual subject's values, against random subject features.\n\n" + table)
    return {"name": "Feature circuits (transcoders)", "figures": figures, "text": text}


DEFINITIONS = [
    "f = (m(C) - m(empty)) / (m(N) - m(empty)): m is the logit difference (answer minus counterfactual answer) "
    "averaged over prompts, with every component outside the circuit C set to its value on the corrupted prompt (the "
    "counterfactual subject); f = 1 recovers the whole model, f = 0 nothing, f = 0.5 'no preference'.",
    "Held-out f: on facts split off before any pairing (their counterfactual subjects come from the held-out split "
    "only); the interval is a 95% percentile bootstrap over held-out prompts. In-sample f: on the discovery facts.",
    "Non-inert nodes: nodes whose output differs between the clean and the corrupted run on at least one prompt. "
    "BOS, positions before the subject and embeddings of unchanged tokens are inert (ablating them changes "
    "nothing) and are left out of node shares, curves and random draws.",
    "Matched random p: share of random circuits (same embedding nodes, the same number of nodes per (component, "
    "layer, token role)) with f >= the circuit's, +1-corrected; smallest possible p = 1 / (draws + 1).",
    "Validated: held-out f >= 0.7 with CI lower bound >= 0.5, matched random p < 0.01 and <= 10% of the "
    "non-inert nodes. CPR is node-level and held out (MIB's trapezoid over its ten fractions), not MIB's "
    "edge-level score.",
]


def _f_ci(f, ci, degenerate=False) -> str:
    if degenerate:
        return "degenerate"
    if f is None:
        return "—"
    lo, hi = (ci or [None, None])[:2]
    return f"{f:.2f} [{_fmt(lo)}, {_fmt(hi)}]"


def _p_draws(p, draws) -> str:
    return "—" if p is None else f"{p:.3f} ({draws})"


def _share(m: dict) -> str:
    s = m.get("node_share")
    return "—" if s is None else f"{m.get('circuit_size')} ({100 * s:.1f}%)"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _at(at) -> str:
    if not at:
        return "—"
    return " / ".join(_fmt(at.get(k)) for k in sorted(at, key=float))


def _warning(m: dict) -> str | None:
    """Why a circuit's numbers should not be trusted, or None."""
    if not m:
        return None
    if m.get("degenerate"):
        return ("the held-out metric difference |m(N) - m(empty)| is below the minimum gap: the model does not "
                "separate the answers on these facts, so faithfulness is undefined")
    why = []
    f, ci, p = m.get("held_out_faithfulness"), m.get("held_out_ci") or [None, None], m.get("random_baseline_p")
    if f is None:
        why.append("no held-out faithfulness")
    else:
        if f < 0.7 or ci[0] is None or ci[0] < 0.5:
            why.append(f"held-out f {f:.2f} (CI low {_fmt(ci[0])}) is below 0.7 / 0.5")
        if p is None or p >= 0.01:
            why.append(f"it does not beat matched random circuits at p < 0.01 (p = {_fmt(p, 3)})")
    if (m.get("node_share") or 0) > 0.10:
        why.append(f"it uses {100 * m['node_share']:.1f}% of the non-inert nodes (> 10%)")
    return ("this circuit is not validated: " + "; ".join(why)) if why else None


def _headline(val: dict) -> str:
    if not val:
        return "No circuit was validated."
    ms = {r: relation_metrics(v) for r, v in val.items()}
    ok = [r for r, m in ms.items() if m["validated"]]
    s = (f"{len(ok)} of {len(val)} relations have a validated circuit (held-out f >= 0.7 with CI lower bound >= 0.5, "
         f"matched random p < 0.01, <= 10% of the non-inert nodes)")
    s += (": " + ", ".join(ok) + ".") if ok else "."
    deg = [r for r, m in ms.items() if m["degenerate"]]
    if deg:
        s += f" Degenerate (no metric difference to explain): {', '.join(deg)}."
    return s
