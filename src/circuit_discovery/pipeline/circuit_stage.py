"""Pipeline glue for circuits and their validation: component circuits (EAP / EAP-IG) per relation, discovered
on one part of the facts and validated on the same and on held-out facts; plus the hypothesis contexts.

Everything returned is plain JSON (lists, dicts, floats) so the stage can be saved and resumed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from ..graph.neuronpedia import to_neuronpedia, write_neuronpedia_json
from .config import RunConfig

log = logging.getLogger(__name__)


def split_pairs(pairs: Sequence, held_out_fraction: float) -> tuple[list, list]:
    """Discovery and held-out parts, in order (pairs come in dataset order, so this is deterministic)."""
    pairs = list(pairs)
    n_held = int(math.floor(len(pairs) * held_out_fraction)) if len(pairs) >= 3 else 0
    return pairs[: len(pairs) - n_held], pairs[len(pairs) - n_held:]


def circuit_for_relation(model, relation: str, pairs: Sequence, cfg: RunConfig, graphs_dir=None) -> dict:
    """Discover one relation's component circuit and export each discovery prompt's graph (Neuronpedia JSON)."""
    from ..graph.component import component_circuit

    disc, held = split_pairs(pairs, cfg.held_out_fraction)
    res = component_circuit(model, disc, name=relation, metric=cfg.metric, granularity=cfg.granularity,
                            method=cfg.component_method, n_steps=cfg.ig_steps, node_threshold=cfg.node_threshold,
                            edge_threshold=cfg.edge_threshold, batch_size=cfg.batch_size)
    graph_files = [export_graph(g, relation, f"-{i}", cfg, graphs_dir)
                   for i, g in enumerate(res.graphs[: cfg.graphs_per_relation] if graphs_dir is not None else [])]
    circuit = res.circuit
    circuit.extra["graphs"] = graph_files
    circuit.extra["prompt_tokens"] = [model.tokenizer.decode([t]) for t in disc[0].clean_tokens]
    return {"circuit": circuit.to_dict(), "info": res.info, "ranked": res.ranked_nodes(),
            "n_discovery": len(disc), "n_held_out": len(held)}


def export_graph(graph, relation: str, suffix: str, cfg: RunConfig, graphs_dir, **kwargs) -> str:
    """Write one per-prompt graph as Neuronpedia JSON to ``graphs_dir/<relation><suffix>.json`` (pruned with the
    run's thresholds; ``kwargs`` go to :func:`to_neuronpedia`); returns its path relative to the run folder."""
    from .run import safe_name

    slug = f"{safe_name(relation)}{suffix}"
    data = to_neuronpedia(graph, slug=slug, scan=cfg.model or "gemma-3-270m", node_threshold=cfg.node_threshold,
                          edge_threshold=cfg.edge_threshold, **kwargs)
    path = graphs_dir / f"{slug}.json"
    write_neuronpedia_json(data, path)
    return f"graphs/{path.name}"


def circuit_validation(ev, ids: Sequence[str], ranked: Sequence[str], n_random: int, seed: int, ablation: str) -> dict:
    """Faithfulness, MIB curve (CPR/CMD), references and random-circuit baseline of ``ids`` with evaluator ``ev``
    (component or feature circuits alike)."""
    from ..validation.curves import faithfulness

    n_universe = len(ev.universe)
    m_c, m_full, m_empty = ev.metric_of([list(ids), ev.universe, []])  # references evaluated once, shared below
    f = faithfulness(m_c, m_full, m_empty)
    curve = ev.curve(ranked)
    base = ev.random_baseline(ids, n_samples=n_random, seed=seed, m_full=m_full, m_empty=m_empty)
    return {"faithfulness": float(f), "circuit_size": len(ids), "n_universe": n_universe,
            "node_share": len(ids) / max(n_universe, 1), "m_full": float(m_full), "m_empty": float(m_empty),
            "cpr": float(curve.cpr), "cmd": float(curve.cmd),
            "curve": {"fractions": [float(x) for x in curve.fractions],
                      "faithfulness": [float(x) for x in curve.faithfulness]},
            "random_p": float(base.p_value), "random_z": float(base.z),
            "random_mean": float(np.mean(base.null_faithfulness)), "ablation": ablation}


def validate_relation(model, pairs: Sequence, found: dict, cfg: RunConfig, seed: int) -> dict:
    """Faithfulness (pruned circuit), curve with CPR/CMD, random-circuit baseline, held-out faithfulness,
    per-prompt faithfulness at <= 5% of nodes, and the attention-knockout drops (hypothesis contexts)."""
    from ..validation.ablation import CircuitEvaluator
    from ..validation.knockouts import attention_knockout_halves

    disc, held = split_pairs(pairs, cfg.held_out_fraction)
    ids = [n["id"] for n in found["circuit"]["nodes"]]
    ev = CircuitEvaluator(model, disc, metric=cfg.metric, ablation=cfg.ablation, granularity=cfg.granularity)
    comp_ids = ev._components_only(ids)
    ranked = ev._components_only(found["ranked"])
    out = circuit_validation(ev, comp_ids, ranked, cfg.n_random, seed, cfg.ablation)
    out["universe"] = list(ev.universe)
    if held:
        hev = CircuitEvaluator(model, held, metric=cfg.metric, ablation=cfg.ablation, granularity=cfg.granularity)
        out["held_out_faithfulness"] = float(hev.faithfulness(comp_ids))
        out["n_held_out"] = len(held)
    else:
        out["held_out_faithfulness"], out["n_held_out"] = None, 0
    k5 = max(1, int(0.05 * out["n_universe"]))
    # per prompt, discovery and held-out alike (a prompt whose clean and ablated metrics coincide has none)
    per_prompt = ev.faithfulness_per_prompt(ranked[:k5]) + (hev.faithfulness_per_prompt(ranked[:k5]) if held else [])
    out["faithfulness_at_5pct_per_prompt"] = [f for f in per_prompt if f is not None]
    out.update({k: v.tolist() for k, v in attention_knockout_halves(model, pairs, cfg.metric).items()})
    return out


def cross_relation_faithfulness(model, found: dict, other: str, other_pairs: Sequence, cfg: RunConfig) -> dict:
    """Baseline: faithfulness of one relation's circuit (role-keyed, so it applies to any prompt with the same
    roles) on another relation's discovery facts, next to that relation's own faithfulness scale."""
    from ..validation.ablation import CircuitEvaluator

    disc, _ = split_pairs(other_pairs, cfg.held_out_fraction)
    ev = CircuitEvaluator(model, disc, metric=cfg.metric, ablation=cfg.ablation, granularity=cfg.granularity)
    universe = set(ev.universe)
    ids = [n["id"] for n in found["circuit"]["nodes"] if not n["id"].startswith("logit")]
    ids = [i for i in ids if i in universe]  # roles the other relation's prompts lack are dropped
    try:
        f = float(ev.faithfulness(ids))
    except Exception as e:  # clean and ablated metrics coincide: faithfulness undefined
        log.info("cross-relation faithfulness undefined on %s: %s", other, e)
        f = None
    return {"relation": other, "faithfulness": f, "n_nodes": len(ids), "n_facts": len(disc)}
