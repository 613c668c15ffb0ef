"""Pipeline glue for circuits and their validation: component circuits (EAP / EAP-IG) per relation, discovered
on one part of the facts and validated on the same and on held-out facts; plus the hypothesis contexts.

Everything returned is plain JSON (lists, dicts, floats) so the stage can be saved and resumed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.graph.circuit import Circuit, attach_validation
from circuit_discovery.graph.neuronpedia import to_neuronpedia, write_neuronpedia_json
from circuit_discovery.io import safe_name
from circuit_discovery.pipeline.config import RunConfig
from circuit_discovery.validation.curves import DegenerateMetricError, faithfulness

log = logging.getLogger(__name__)


def split_pairs(pairs, held_out_fraction: float = 0.4) -> tuple[list, list]:
    """Discovery and held-out pairs. ``pairs`` is what :func:`~.attribution_stage.relation_pairs` returns (a dict
    with the two splits, made from disjoint facts before pairing); a plain list is split in order (older callers)."""
    if isinstance(pairs, Mapping):
        return list(pairs.get("discovery", [])), list(pairs.get("held_out", []))
    pairs = list(pairs)
    n_held = int(math.floor(len(pairs) * held_out_fraction)) if len(pairs) >= 3 else 0
    return pairs[: len(pairs) - n_held], pairs[len(pairs) - n_held:]


def _circuit(model, relation: str, pairs: Sequence, cfg: RunConfig):
    from circuit_discovery.attribution.component_graph import component_circuit

    return component_circuit(model, pairs, name=relation, metric=cfg.metric, granularity=cfg.granularity,
                             method=cfg.component_method, n_steps=cfg.ig_steps, node_threshold=cfg.node_threshold,
                             edge_threshold=cfg.edge_threshold, batch_size=cfg.batch_size)


def circuit_for_relation(model, relation: str, pairs, cfg: RunConfig, graphs_dir=None) -> dict:
    """Discover one relation's component circuit on its discovery pairs and export each discovery prompt's graph
    (Neuronpedia JSON); also the circuits of two disjoint halves of the discovery facts (the within-relation
    reference of ``shared_mechanism``)."""
    disc, held = split_pairs(pairs)
    res = _circuit(model, relation, disc, cfg)
    ranked = res.ranked_nodes()
    refined = None
    if cfg.circuit_search == "refine":
        refined = refine(model, res, disc, cfg)
        res.circuit, ranked = refined.pop("circuit"), refined["order"]
    graph_files = [export_graph(g, relation, f"-{i}", cfg, graphs_dir)
                   for i, g in enumerate(res.graphs[: cfg.graphs_per_relation] if graphs_dir is not None else [])]
    circuit = res.circuit
    circuit.extra["graphs"] = graph_files
    circuit.extra["prompt_tokens"] = [model.tokenizer.decode([t]) for t in disc[0].clean_tokens]
    halves = None
    if len(disc) >= 4:
        halves = [[n.id for n in _circuit(model, relation, disc[i::2], cfg).circuit.nodes
                   if not n.id.startswith(("logit", "embed"))] for i in (0, 1)]
    info = dict(res.info, circuit_search=cfg.circuit_search)
    if refined is not None:
        info.update({f"refine_{k}": v for k, v in refined.items() if k != "order"})
    return {"circuit": circuit.to_dict(), "info": info, "ranked": ranked,
            "n_discovery": len(disc), "n_held_out": len(held), "halves": halves}


def refine(model, res, disc: Sequence, cfg: RunConfig) -> dict:
    """Greedy refinement of an EAP circuit by exact ablation on the discovery pairs
    (:func:`~circuit_discovery.graph.refine.refine_circuit`, objective |1 - f|, up to ``cfg.refine_budget`` of the
    non-inert nodes; the embeddings stay, as in pruning). Returns the refined circuit (the combined graph's nodes
    and edges among the kept nodes), the full ranking and the refinement's record."""
    import torch

    from circuit_discovery.graph.circuit import Circuit
    from circuit_discovery.graph.influence import compute_edge_influence, compute_node_influence
    from circuit_discovery.graph.prune import PruneResult
    from circuit_discovery.graph.refine import refine_circuit
    from circuit_discovery.validation.ablation import CircuitEvaluator

    ev = CircuitEvaluator(model, disc, metric=cfg.metric, ablation=cfg.ablation, granularity=cfg.granularity)
    relevant = set(ev.relevant_universe)
    ranked = [i for i in res.ranked_nodes() if not i.startswith("logit")]
    forced = [i for i in ranked if i.startswith("embed/") and i in relevant]
    rr = refine_circuit(ev, ranked, budget_fraction=cfg.refine_budget, forced=forced, objective="distance")
    g = res.combined
    keep_ids = set(rr.nodes) | {nd.id for nd in g.nodes if nd.kind in ("logit", "embedding")}
    node_mask = torch.tensor([nd.id in keep_ids for nd in g.nodes])
    infl = compute_node_influence(g.adjacency, g.logit_weights())
    pruned = g.adjacency.to(torch.float64).clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = compute_edge_influence(pruned, g.logit_weights())
    edge_mask = (pruned != 0) & node_mask[:, None] & node_mask[None, :]
    circuit = Circuit.from_graph(g, PruneResult(node_mask, edge_mask, infl, torch.zeros_like(infl), edge_scores),
                                 name=res.circuit.name, relation=res.circuit.relation, facts=res.circuit.facts)
    circuit.extra.update({k: v for k, v in res.circuit.extra.items() if k not in circuit.extra})
    circuit.extra["circuit_search"] = "refine"
    return {"circuit": circuit, "order": list(rr.order), "n_evaluations": int(rr.n_evaluations),
            "discovery_faithfulness": float(rr.final_faithfulness), "size": len(rr.nodes)}


def export_graph(graph, relation: str, suffix: str, cfg: RunConfig, graphs_dir, **kwargs) -> str:
    """Write one per-prompt graph as Neuronpedia JSON to ``graphs_dir/<relation><suffix>.json`` (pruned with the
    run's thresholds; ``kwargs`` go to :func:`to_neuronpedia`); returns its path relative to the run folder."""
    slug = f"{safe_name(relation)}{suffix}"
    data = to_neuronpedia(graph, slug=slug, scan=cfg.model or "gemma-3-270m", node_threshold=cfg.node_threshold,
                          edge_threshold=cfg.edge_threshold, **kwargs)
    path = graphs_dir / f"{slug}.json"
    write_neuronpedia_json(data, path)
    return f"graphs/{path.name}"


class _Skip(Exception):
    pass


def _forced(ids: Sequence[str]) -> list[str]:
    """The nodes pruning always keeps (embeddings): a random circuit keeps them too."""
    return [i for i in ids if i.startswith("embed/")]


def circuit_validation(ev, ids: Sequence[str], ranked: Sequence[str], cfg: RunConfig, seed: int,
                       forced: Sequence[str] | None = None, baselines: bool | Sequence[str] = True) -> dict:
    """Validation of the circuit ``ids`` with evaluator ``ev`` (component or feature circuits alike, on the prompts
    the evaluator holds): faithfulness with a bootstrap interval over prompts, the share of the non-inert nodes
    the circuit uses, the node-level faithfulness curve (CPR/CMD) over the non-inert nodes, f at small fractions
    of them, and the baselines (matched random circuits, random subsets of the top-ranked nodes, every
    last-token node: ``baselines`` True runs ``cfg.baselines``, a list runs those, False none). Faithfulness values
    are ``None`` where |m(N) - m(empty)| < ``cfg.min_metric_gap``.

    The matched baseline keeps the circuit's count per (component, layer, role), so an MLP or attention layer, alone
    in its stratum, is always drawn: it tests the choice of heads. The (component, role) baseline also moves nodes
    across layers: it tests the choice of layers as well."""
    universe = set(ev.universe)
    ids = [i for i in ids if i in universe]
    ranked = [i for i in ranked if i in universe]
    forced = _forced(ids) if forced is None else [i for i in forced if i in universe]
    relevant = ev.relevant_universe
    rel_set = set(relevant)
    fci = ev.faithfulness_with_ci(ids, seed=seed, min_gap=cfg.min_metric_gap)
    out = {"faithfulness": fci["faithfulness"], "ci": [fci["ci_low"], fci["ci_high"]],
           "per_prompt": fci["per_prompt"], "n_prompts": fci["n"], "degenerate": fci["degenerate"],
           "m_full": float(fci["m_full"]), "m_empty": float(fci["m_empty"]),
           "circuit_size": len([i for i in ids if i in rel_set]), "circuit_size_all": len(ids),
           "n_universe": len(relevant), "n_universe_all": len(universe), "n_inert": len(universe) - len(relevant)}
    out["node_share"] = out["circuit_size"] / max(len(relevant), 1)
    none = {"random_p": None, "random_z": None, "random_mean": None, "random_draws": 0, "random_null_zero_share": None,
            "random_min_p": None, "role_random_p": None, "role_random_mean": None, "topm_p": None, "topm_mean": None,
            "last_token_faithfulness": None}
    if fci["degenerate"]:
        out.update({"cpr": None, "cmd": None, "curve": None, "faithfulness_at": None, **none})
        return out
    mf, me = fci["m_full"], fci["m_empty"]
    curve = ev.curve(ranked, m_full=mf, m_empty=me)
    out["cpr"], out["cmd"] = float(curve.cpr), float(curve.cmd)
    out["curve"] = {"fractions": [float(x) for x in curve.fractions],
                    "faithfulness": [float(x) for x in curve.faithfulness]}
    out["faithfulness_at"] = {str(k): float(v) for k, v in ev.faithfulness_at(ranked, m_full=mf, m_empty=me).items()}
    out.update(none)
    which = set(cfg.baselines if baselines is True else (baselines or ()))
    if "matched" not in which:
        return out
    base = ev.matched_random_baseline(ids, forced=forced, n_samples=cfg.n_random, seed=seed, m_full=mf, m_empty=me)
    out.update({"random_p": float(base.p_value), "random_z": float(base.z),
                "random_mean": float(np.mean(base.null_faithfulness)), "random_draws": int(base.n_samples),
                "random_null_zero_share": float(base.null_zero_share), "random_min_p": float(base.min_p_attainable)})
    if "component_role" in which:
        role = ev.matched_random_baseline(ids, forced=forced, n_samples=cfg.n_random, seed=seed + 1, m_full=mf,
                                          m_empty=me, stratum="component_role")
        out.update({"role_random_p": float(role.p_value), "role_random_mean": float(np.mean(role.null_faithfulness))})
    try:
        if "top_m" not in which:
            raise _Skip("not asked for")
        topm = ev.topm_random_baseline(ids, ranked, forced=forced, n_samples=cfg.n_random, seed=seed + 2, m_full=mf,
                                       m_empty=me)
        out.update({"topm_p": float(topm.p_value), "topm_mean": float(np.mean(topm.null_faithfulness))})
    except (CircuitDiscoveryError, _Skip) as e:  # the ranking has fewer than 2 |C| nodes: no top-M null
        log.info("top-M baseline skipped: %s", e)
    try:
        if "last_token" not in which:
            raise _Skip("not asked for")
        last = ev.role_circuit("last", forced=forced)
        out["last_token_faithfulness"] = float(faithfulness(ev.metric_of([last])[0], mf, me))
        out["last_token_size"] = len(last)
    except (CircuitDiscoveryError, _Skip) as e:
        log.info("last-token baseline skipped: %s", e)
    return out


def is_validated(v: dict) -> bool:
    """The project's definition of a validated circuit: held-out f >= 0.7 with a bootstrap lower bound >= 0.5, the
    matched random baseline beaten at p < 0.01 (held out), and at most 10% of the non-inert nodes."""
    f, ci, p = v.get("faithfulness"), v.get("ci") or [None, None], v.get("random_p")
    return bool(f is not None and ci[0] is not None and p is not None and f >= 0.7 and ci[0] >= 0.5 and p < 0.01
                and v.get("node_share", 1.0) <= 0.10)


def validate_relation(model, pairs, found: dict, cfg: RunConfig) -> dict:
    """Validation of one relation's component circuit: on the held-out facts (the headline numbers) and, for
    reference, on the discovery facts it was found on (in-sample); per-prompt faithfulness at <= 5% of the
    non-inert nodes (held out) and the attention-knockout drops (hypothesis contexts)."""
    from circuit_discovery.validation.ablation import CircuitEvaluator
    from circuit_discovery.validation.knockouts import attention_knockout_halves

    disc, held = split_pairs(pairs)
    ids = [n["id"] for n in found["circuit"]["nodes"] if not n["id"].startswith("logit")]
    ranked = [i for i in found["ranked"] if not i.startswith("logit")]
    kw: dict[str, Any] = dict(metric=cfg.metric, ablation=cfg.ablation, granularity=cfg.granularity)
    ev = CircuitEvaluator(model, disc, **kw)
    out: dict[str, Any] = {
        "in_sample": circuit_validation(ev, ids, ranked, cfg, cfg.seed, baselines=False), "n_discovery": len(disc),
        "n_held_out": len(held), "ablation": cfg.ablation}
    out["universe"] = list(ev.relevant_universe)
    if held:
        hev = CircuitEvaluator(model, held, **kw)
        out["held_out"] = circuit_validation(hev, ids, ranked, cfg, cfg.seed)
        h = out["held_out"]
        k5 = max(1, math.ceil(0.05 * h["n_universe"]))
        top5 = [i for i in ranked if i in set(hev.relevant_universe)][:k5]
        out["faithfulness_at_5pct_per_prompt"] = [f for f in hev.faithfulness_per_prompt(top5) if f is not None] \
            if not h["degenerate"] else []
    else:
        out["held_out"] = None
        out["faithfulness_at_5pct_per_prompt"] = []
    out["validated"] = is_validated(out["held_out"] or {})
    out.update({k: v.tolist() for k, v in attention_knockout_halves(model, disc + held, cfg.metric).items()})
    return out


def cross_relation_faithfulness(model, found: dict, other: str, other_pairs: Sequence, cfg: RunConfig) -> dict:
    """Baseline: faithfulness of one relation's circuit (role-keyed, so it applies to any prompt with the same
    roles) on another relation's discovery facts, next to that relation's own faithfulness scale."""
    from circuit_discovery.validation.ablation import CircuitEvaluator

    disc, _ = split_pairs(other_pairs)
    ev = CircuitEvaluator(model, disc, metric=cfg.metric, ablation=cfg.ablation, granularity=cfg.granularity)
    universe = set(ev.universe)
    ids = [n["id"] for n in found["circuit"]["nodes"] if not n["id"].startswith("logit")]
    ids = [i for i in ids if i in universe]  # roles the other relation's prompts lack are dropped
    try:
        f = float(ev.faithfulness(ids))
    except DegenerateMetricError as e:  # clean and ablated metrics coincide: faithfulness undefined
        log.info("cross-relation faithfulness undefined on %s: %s", other, e)
        f = None
    return {"relation": other, "faithfulness": f, "n_nodes": len(ids), "n_facts": len(disc)}


def _held_out_entry(h: dict) -> dict:
    """The keys component and feature circuits share: held-out validation (``circuit_validation`` on held-out
    prompts) under its metrics.json names."""
    return {
        "degenerate": bool(h.get("degenerate", True)), "node_share": h.get("node_share"),
        "circuit_size": h.get("circuit_size"), "n_universe": h.get("n_universe"), "n_inert": h.get("n_inert"),
        "cpr": h.get("cpr"), "cmd": h.get("cmd"), "curve": h.get("curve"), "faithfulness_at": h.get("faithfulness_at"),
        "random_baseline_p": h.get("random_p"), "random_baseline_z": h.get("random_z"),
        "random_mean_faithfulness": h.get("random_mean"), "random_draws": h.get("random_draws", 0),
        "random_null_zero_share": h.get("random_null_zero_share"), "random_min_p": h.get("random_min_p"),
        "m_full": h.get("m_full"), "m_empty": h.get("m_empty"),
    }


def relation_metrics(v: dict) -> dict:
    """The flat per-relation entry of metrics.json from a validation result (held-out numbers lead)."""
    h = v.get("held_out") or {}
    ins = v.get("in_sample") or {}
    return {
        "faithfulness": ins.get("faithfulness"), "faithfulness_ci": ins.get("ci"),
        "held_out_faithfulness": h.get("faithfulness"), "held_out_ci": h.get("ci"),
        "held_out_per_prompt": h.get("per_prompt"), **_held_out_entry(h),
        "role_random_baseline_p": h.get("role_random_p"), "role_random_mean_faithfulness": h.get("role_random_mean"),
        "topm_baseline_p": h.get("topm_p"), "topm_mean_faithfulness": h.get("topm_mean"),
        "last_token_faithfulness": h.get("last_token_faithfulness"), "in_sample_cpr": ins.get("cpr"),
        "validated": bool(v.get("validated")), "n_discovery": v.get("n_discovery"), "n_held_out": v.get("n_held_out"),
        "ablation": v.get("ablation"),
    }


def component_circuit(found: dict, validation: dict | None) -> Circuit:
    """The :class:`Circuit` of one relation's component circuit (:func:`circuit_for_relation`'s result) with its
    validation (:func:`validate_relation`'s result, or ``None``) attached: what ``circuits.json`` holds and what
    the API returns."""
    circuit = Circuit.from_dict(found["circuit"])
    return attach_validation(circuit, None if validation is None else relation_metrics(validation))
