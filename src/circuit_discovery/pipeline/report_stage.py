"""Writes the run folder from the stage results: circuits.json, metrics.json, hypotheses.csv (already written by its
stage), figures/*.png, graphs/*.json (written by the circuits stage), index.html and report.md."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np

from ..graph import Circuit, write_circuits_json
from ..io import atomic_write_json
from ..report import figures as fig
from ..report.markdown import write_report
from ..report.viewer import write_viewer


def _rel(p: Path, out: Path) -> str:
    return str(p.relative_to(out))


def _fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_outputs(run, known: dict, attribution: dict, causal: dict, circuits: dict, validation: dict,
                  hypotheses: dict, dictionaries: dict | None = None, features: dict | None = None) -> dict:
    from .run import safe_name

    out, cfg = run.out_dir, run.cfg
    model_name = cfg.model or "gemma-3-270m"
    figs = out / "figures"
    val = validation["relations"]
    circ_objs: list[Circuit] = []
    for rel, c in circuits["relations"].items():
        circuit = Circuit.from_dict(c["circuit"])
        if rel in val:
            circuit.faithfulness = val[rel]["faithfulness"]
            circuit.extra["validation"] = {k: val[rel][k] for k in (
                "faithfulness", "node_share", "cpr", "cmd", "random_p", "held_out_faithfulness", "ablation")}
        circ_objs.append(circuit)
    fval = {r: c["validation"] for r, c in (features or {}).get("relations", {}).items()}
    feat_objs: list[Circuit] = []
    for rel, c in (features or {}).get("relations", {}).items():
        circuit = Circuit.from_dict(c["circuit"])
        circuit.name = f"{rel}/features"
        circuit.faithfulness = fval[rel]["faithfulness"]
        circuit.extra["kind"] = "feature"
        circuit.extra["validation"] = {k: fval[rel].get(k) for k in (
            "faithfulness", "node_share", "cpr", "cmd", "random_p", "held_out_faithfulness", "ablation")}
        feat_objs.append(circuit)
    write_circuits_json(circ_objs + feat_objs, out / "circuits.json", model=model_name)

    # ---------------------------------------------------------------- metrics.json
    metrics = {"model": model_name, "metric": cfg.metric, "ablation": cfg.ablation, "granularity": cfg.granularity,
               "known": {k: known[k] for k in ("k", "n", "n_known", "accuracy")},
               "relations": {}}
    for rel, v in val.items():
        info = circuits["relations"][rel]["info"]
        metrics["relations"][rel] = {
            "faithfulness": v["faithfulness"], "node_share": v["node_share"], "circuit_size": v["circuit_size"],
            "n_universe": v["n_universe"], "cpr": v["cpr"], "cmd": v["cmd"], "curve": v["curve"],
            "random_baseline_p": v["random_p"], "random_baseline_z": v["random_z"],
            "random_mean_faithfulness": v["random_mean"], "held_out_faithfulness": v["held_out_faithfulness"],
            "n_discovery": circuits["relations"][rel]["n_discovery"], "n_held_out": v["n_held_out"],
            "m_full": v["m_full"], "m_empty": v["m_empty"], "cross_relation": v.get("cross_relation"),
            **{f"graph_{k}": x for k, x in info.items()}}
    if features is not None:
        metrics["feature_circuits"] = {}
        for rel, v in fval.items():
            info = features["relations"][rel]["info"]
            metrics["feature_circuits"][rel] = {
                **{k: v.get(k) for k in ("faithfulness", "node_share", "circuit_size", "n_universe", "cpr", "cmd",
                                         "curve", "held_out_faithfulness", "n_held_out", "m_full", "m_empty",
                                         "feature_ablation_drop", "steering_flips")},
                "random_baseline_p": v["random_p"], "random_baseline_z": v["random_z"],
                "random_mean_faithfulness": v["random_mean"],
                "steering_flip_rate": _mean(v.get("steering_flips")),
                "random_steering_flip_rate": _mean(v.get("steering_random_flips")),
                "n_discovery": features["relations"][rel]["n_discovery"],
                **{f"graph_{k}": x for k, x in info.items() if k != "seconds"}}  # timings go to config.json
    if dictionaries is not None:
        metrics["dictionaries"] = {k: v for k, v in dictionaries.items() if k not in ("_seconds", "seconds")}
    atomic_write_json(out / "metrics.json", metrics)

    # ---------------------------------------------------------------- figures
    sections = {}
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
        tables = [np.array(full[k]["table"] if k != "states" else full["states_table"], dtype=float)
                  for k in ("states", "mlp", "attn")]
        p = fig.causal_tracing_figure(*tables, full["classes"], figs / "causal_tracing.png",
                                      title=f"Causal tracing (ROME), mean over {full['n_facts']} facts")
        causal_fig = _rel(p, out)
    for c in circ_objs:
        p = fig.circuit_drawing(c.to_dict(), figs / f"circuit_{safe_name(c.relation)}.png",
                                title=f"{c.relation}: pruned component circuit")
        sections.setdefault(c.relation, []).append({"path": _rel(p, out), "caption": (
            "The pruned circuit: layer on the vertical axis, token role on the horizontal; edge width and colour "
            "show the EAP edge score.")})
    if val:
        p = fig.faithfulness_curves({r: (v["curve"]["fractions"], v["curve"]["faithfulness"]) for r, v in val.items()},
                                    figs / "faithfulness_curves.png")
        curves_fig = _rel(p, out)
    else:
        curves_fig = None
    overlap_fig = None
    if len(circ_objs) >= 2:
        names = [c.relation for c in circ_objs]
        mat = np.array([[a.compare(b)["jaccard"] for b in circ_objs] for a in circ_objs])
        overlap_fig = _rel(fig.overlap_matrix(names, mat, figs / "circuit_overlap.png"), out)

    feature_section = None
    if features is not None:
        feature_section = _feature_section(out, figs, feat_objs, fval, features, dictionaries)

    # ---------------------------------------------------------------- viewer
    import json

    cj = json.loads((out / "circuits.json").read_text())
    write_viewer(out, cj, feature_details=(features or {}).get("feature_details") or None)

    # ---------------------------------------------------------------- report.md
    hyp_rows = hypotheses["rows"]
    verdicts: dict[str, dict] = {}
    for h in hyp_rows:
        for rel in str(h["relation"]).split("|"):
            verdicts.setdefault(rel, {})[h["hypothesis_id"]] = h["verdict"]
    rows = []
    for c in circ_objs:
        v = val.get(c.relation, {})
        acc = known["per_relation"].get(c.relation, {})
        top = sorted((n for n in c.nodes if n.component not in ("logit",)), key=lambda n: -abs(n.score or 0))[:5]
        rows.append({"name": c.relation, "n_facts": acc.get("n"), "n_known": acc.get("n_known"),
                     "circuit_size": v.get("circuit_size", len(c.nodes)), "faithfulness": v.get("faithfulness"),
                     "cpr": v.get("cpr"), "cmd": v.get("cmd"), "top_nodes": [n.label for n in top],
                     "verdicts": verdicts.get(c.relation, {})})
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
        sec_list.append({"name": c.relation, "metrics": {
            "facts (discovery / held out)": f"{circuits['relations'][c.relation]['n_discovery']} / {v.get('n_held_out')}",
            "nodes in circuit / all nodes": f"{v.get('circuit_size')} / {v.get('n_universe')} "
                                            f"({100 * v.get('node_share', float('nan')):.1f}%)",
            "faithfulness": v.get("faithfulness"), "held-out faithfulness": v.get("held_out_faithfulness"),
            "CPR": v.get("cpr"), "CMD": v.get("cmd"),
            "random-circuit baseline: mean f, p": f"{_fmt(v.get('random_mean'))}, {_fmt(v.get('random_p'), 3)}",
            "on another relation's facts: f": _cross(v.get("cross_relation")),
            "attribution score": c.attribution_score},
            "figures": sections.get(c.relation, []),
            "text": "Per-prompt graphs (Neuronpedia JSON): " + ", ".join(c.extra.get("graphs", []))})
    headline = _headline(val)
    notes = [f"Known-fact accuracy (every answer token ranked <= {known['k']}): "
             f"{known['n_known']}/{known['n']} = {known['accuracy']:.1%}.", headline,
             f"Faithfulness f = (m(C) - m(empty)) / (m(N) - m(empty)) with every component outside the circuit "
             f"ablated to its value on the {cfg.ablation} run; the metric is the {cfg.metric}.",
             *[f"Hypothesis {k} not run: {why}" for k, why in hypotheses.get("not_run", {}).items()]]
    extra_sections = []
    if causal_fig:
        extra_sections.append({"name": "Causal tracing (ROME)", "figures": [{"path": causal_fig, "caption": (
            "Average indirect effect on the answer probability of restoring a window of MLP / attention outputs "
            "at one token class into a run with noised subject embeddings.")}]})
    if curves_fig or overlap_fig:
        extra_sections.append({"name": "Across relations", "figures": [
            *([{"path": curves_fig, "caption": "Faithfulness curves (MIB): f against the fraction of ranked nodes "
                                                "kept."}] if curves_fig else []),
            *([{"path": overlap_fig, "caption": "Jaccard overlap of the circuits' nodes."}] if overlap_fig else [])]})
    if feature_section:
        extra_sections.append(feature_section)
    summary = {"title": "Factual-recall circuits", "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "model": model_name,
               "config": {"seed": cfg.seed, "quick": cfg.quick, "metric": cfg.metric, "max_facts": cfg.max_facts,
                          "granularity": cfg.granularity, "method": cfg.component_method, "ablation": cfg.ablation,
                          "node_threshold": cfg.node_threshold, "known_k": cfg.known_k},
               "relations": rows, "sections": extra_sections + sec_list,
               "hypotheses": [{k: h[k] for k in ("hypothesis_id", "relation", "statistic", "effect", "ci_low",
                                                 "ci_high", "p_value", "p_adjusted", "n", "verdict")} for h in hyp_rows],
               "timings": dict(run.timings), "notes": notes,
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
    from ..report.markdown import markdown_table
    from .run import safe_name

    figures = []
    layers = (dictionaries or {}).get("layers") or {}
    if layers:
        from ..sae.evaluate import plot_layer_metrics

        p = figs / "sae_metrics.png"
        plot_layer_metrics(layers, str(p), title="Transcoders per layer (held-out tokens)")
        figures.append({"path": _rel(p, out), "caption": (
            "SAELens metrics of each layer's transcoder on held-out tokens of the built-in corpus; dashed lines: "
            "the quality bar (EV >= 0.8, CE score >= 0.85, dead <= 0.1, L0 <= 64).")})
    for c in feat_objs:
        p = fig.circuit_drawing(c.to_dict(), figs / f"circuit_features_{safe_name(c.relation)}.png",
                                title=f"{c.relation}: pruned transcoder-feature circuit")
        figures.append({"path": _rel(p, out), "caption": (
            f"{c.relation}: feature circuit (transcoder features, error nodes and embeddings by layer and token "
            "role).")})
    if fval:
        p = fig.faithfulness_curves({r: (v["curve"]["fractions"], v["curve"]["faithfulness"]) for r, v in fval.items()},
                                    figs / "faithfulness_curves_features.png")
        figures.append({"path": _rel(p, out), "caption": "Faithfulness curves of the feature circuits."})
    rows = []
    for rel, v in fval.items():
        rows.append([rel, features["relations"][rel]["n_discovery"], f"{v['circuit_size']} / {v['n_universe']}",
                     _fmt(v["faithfulness"]), _fmt(v.get("held_out_faithfulness")), _fmt(v["cpr"]),
                     _fmt(v["random_p"], 3), _fmt(_mean(v.get("feature_ablation_drop"))),
                     _fmt(_mean(v.get("steering_flips"))), _fmt(_mean(v.get("steering_random_flips")))])
    table = markdown_table(["relation", "facts", "nodes / universe", "faithfulness", "held-out f", "CPR",
                            "random p", "necessity drop", "steering flip rate", "random flip rate"], rows)
    s = (dictionaries or {}).get("settings", {})
    text = ("Circuits over per-layer transcoder features (" + f"TopK k = {s.get('k')}, "
            f"{s.get('training_tokens')} training tokens per layer) built from attribution graphs with frozen "
            "attention and norms; faithfulness is measured in the transcoder-replaced model with features, error "
            "nodes and embeddings outside the circuit ablated. Necessity drop: mean per-prompt metric drop when the "
            "circuit's top features are ablated; steering flip rate: share of prompts whose answer flips to the "
            "counterfactual when the circuit's subject features take the counterfactual subject's values (random "
            "flip rate: the same with random subject features).\n\n" + table)
    return {"name": "Feature circuits (transcoders)", "figures": figures, "text": text}


def _headline(val: dict) -> str:
    if not val:
        return "No circuit was validated."
    ok = [r for r, v in val.items() if v["faithfulness"] >= 0.8 and v["node_share"] <= 0.10]
    short = {r: v for r, v in val.items() if r not in ok}
    s = f"{len(ok)} of {len(val)} circuits reach faithfulness >= 0.8 with <= 10% of the nodes."
    if short:
        s += " Short of it: " + "; ".join(f"{r} (f = {v['faithfulness']:.2f} at {100 * v['node_share']:.1f}% of nodes)"
                                           for r, v in short.items()) + "."
    return s
