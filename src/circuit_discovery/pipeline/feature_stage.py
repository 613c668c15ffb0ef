"""Pipeline glue for dictionaries and feature circuits.

* :func:`dictionaries` trains (or reuses from the cache) one transcoder per layer and evaluates them.
* :func:`feature_circuit_for_relation` builds a relation's feature circuit from transcoder attribution graphs
  and validates it in the transcoder-replaced model: faithfulness, curve (CPR/CMD), random baseline, held-out
  faithfulness, and the data of the ``features_matter`` hypothesis -- per-prompt metric drop when the circuit's
  top features are ablated (necessity) and whether steering the circuit's subject features to the
  counterfactual subject's values flips the answer, against steering as many random subject features
  (sufficiency).

Everything returned is plain JSON, so the stages can be saved and resumed.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .config import RunConfig

log = logging.getLogger(__name__)

SUBJECT_ROLES = ("subject_first", "subject_middle", "subject_last")


def dictionaries(model, cfg: RunConfig):
    """``(DictionarySet, json)``: the per-layer transcoders of the run."""
    from ..sae.dictionaries import train_transcoders

    ds = train_transcoders(model, cfg.sae_layers, training_tokens=cfg.sae_training_tokens, k=cfg.sae_k,
                           seed=cfg.seed + 42, cache_dir=None if cfg.cache_dir is None else f"{cfg.cache_dir}/saes",
                           corpus_cache_dir=cfg.cache_dir, n_sequences=cfg.sae_corpus_sequences,
                           text_files=cfg.sae_text_files, evaluate=cfg.sae_eval_tokens > 0,
                           eval_tokens=max(cfg.sae_eval_tokens, 1), progress=cfg.progress)
    return ds, ds.metrics_json()


def _feature_ids(ids: Sequence[str]) -> list[str]:
    return [i for i in ids if i.startswith("feature/")]


def feature_circuit_for_relation(model, tcs, relation: str, pairs: Sequence, cfg: RunConfig, seed: int,
                                 graphs_dir=None, validate: bool = True) -> dict:
    from ..graph import find_supernodes
    from ..graph.features import decoder_directions, feature_circuit
    from ..validation.features import FeatureCircuitEvaluator
    from .circuit_stage import circuit_validation, export_graph, split_pairs

    disc, held = split_pairs(pairs, cfg.held_out_fraction)
    disc = disc[: cfg.feature_facts]
    res = feature_circuit(model, tcs, disc, name=relation, max_feature_nodes=cfg.feature_nodes,
                          batch_size=cfg.batch_size, node_threshold=cfg.node_threshold,
                          edge_threshold=cfg.edge_threshold)
    circuit = res.circuit
    if len(circuit.edges) > cfg.feature_max_edges:  # dense feature circuits: keep the strongest edges in JSON
        circuit.extra["n_edges_pruned_graph"] = len(circuit.edges)
        circuit.edges = sorted(circuit.edges, key=lambda e: -abs(e.weight))[: cfg.feature_max_edges]
    graph_files = []
    for i, r in enumerate(res.graphs[: cfg.graphs_per_relation] if graphs_dir is not None else []):
        g = r.graph
        feats = [nd.id for nd in g.nodes if nd.node.component == "feature"]
        sn = find_supernodes(g, node_ids=feats, decoder_directions=decoder_directions(g, tcs)) if len(feats) > 1 else []
        graph_files.append(export_graph(g, relation, f"-features-{i}", cfg, graphs_dir, supernodes=sn,
                                        description=f"transcoder feature graph of {g.prompt!r}"))
    circuit.extra["graphs"] = graph_files
    circuit.extra["prompt_tokens"] = [model.tokenizer.decode([t]) for t in disc[0].clean_tokens]

    if not validate:
        return {"circuit": circuit.to_dict(), "info": dict(res.info), "validation": None,
                "n_discovery": len(disc), "n_held_out": len(held)}
    ids = [n.id for n in circuit.nodes if not n.id.startswith("logit")]
    ranked = [nd.id for nd in sorted((nd for nd in res.combined.nodes if nd.kind != "logit"),
                                     key=lambda nd: -abs(nd.score or 0.0))]
    ev = FeatureCircuitEvaluator(model, tcs, disc, metric=cfg.metric, ablation=_ablation(cfg))
    universe = set(ev.universe)
    ranked = [i for i in ranked if i in universe]
    ids = [i for i in ids if i in universe]
    val = circuit_validation(ev, ids, ranked, cfg.n_random, seed, _ablation(cfg))
    if held:
        hev = FeatureCircuitEvaluator(model, tcs, held, metric=cfg.metric, ablation=_ablation(cfg))
        held_universe = set(hev.universe)
        val["held_out_faithfulness"] = float(hev.faithfulness([i for i in ids if i in held_universe]))
        val["n_held_out"] = len(held)
    else:
        val["held_out_faithfulness"], val["n_held_out"] = None, 0
    val.update(features_matter_data(ev, ranked, cfg.steer_features, cfg.steer_random, seed))
    circuit.faithfulness = val["faithfulness"]
    return {"circuit": circuit.to_dict(), "info": dict(res.info),
            "validation": val, "n_discovery": len(disc), "n_held_out": len(held)}


def _ablation(cfg: RunConfig) -> str:
    return cfg.ablation if cfg.ablation in ("corrupted", "zero") else "corrupted"


def features_matter_data(ev, ranked: Sequence[str], k: int, n_random: int, seed: int) -> dict:
    """Per-prompt data of the ``features_matter`` hypothesis from a :class:`FeatureCircuitEvaluator`.

    necessity: ``m_p(N) - m_p(N minus the top-k circuit features)`` for each prompt (features ablated to their
    corrupted values). sufficiency: steer the top-k *subject* features of the circuit to their values under the
    counterfactual subject (everything else clean); a flip is a prompt whose metric turns negative (the
    counterfactual answer now beats the answer). Baseline: ``n_random`` draws of as many random subject features
    from the universe, steered the same way (one 0/1 outcome per prompt and draw).
    """
    universe = ev.universe
    top = _feature_ids(ranked)[:k]
    out: dict = {"necessity_features": top}
    if not top:
        return out
    full = set(universe)
    per = ev.metric_per_prompt([universe, sorted(full - set(top))]).numpy()
    out["feature_ablation_drop"] = (per[0] - per[1]).tolist()
    subj = [i for i in _feature_ids(ranked) if i.split("/")[-1] in SUBJECT_ROLES][:k]
    out["steer_features"] = subj
    if not subj:
        return out
    steered = ev.metric_per_prompt([sorted(full - set(subj))]).numpy()[0]
    out["steering_flips"] = [int(v < 0) for v in steered]
    pool = [i for i in _feature_ids(universe) if i.split("/")[-1] in SUBJECT_ROLES and i not in set(subj)]
    if len(pool) >= len(subj):
        rng = np.random.default_rng(seed)
        sets = [sorted(full - set(rng.choice(pool, size=len(subj), replace=False).tolist())) for _ in range(n_random)]
        rand = ev.metric_per_prompt(sets).numpy()
        out["steering_random_flips"] = [int(v < 0) for v in rand.reshape(-1)]
    return out


def feature_details(model, tcs, relations: dict, cfg: RunConfig) -> dict:
    """``{"feature/L{l}/I{f}": {"label", "contexts", "promoted", "density"}}`` for every feature in the relations'
    feature circuits: top-activating contexts over ``cfg.feature_context_tokens`` held-out tokens of the
    transcoders' corpus (one forward pass per batch for all layers) and the tokens each decoder direction
    promotes. Used by the viewer (node details) and kept in the stage file."""
    from ..sae.corpus import build_corpus, split_heldout
    from ..sae.labels import auto_label, feature_logit_effects, top_activating_contexts_multi

    by_layer: dict[int, set[int]] = {}
    for r in relations.values():
        for n in r["circuit"]["nodes"]:
            if n["component"] == "feature" and n.get("index") is not None and n["layer"] in tcs:
                by_layer.setdefault(int(n["layer"]), set()).add(int(n["index"]))
    if not by_layer or cfg.feature_context_tokens <= 0:
        return {}
    corpus = build_corpus(model, n_sequences=cfg.sae_corpus_sequences, cache_dir=cfg.cache_dir,
                          text_files=list(cfg.sae_text_files), progress=False, count_tokens=False)
    _, held = split_heldout(corpus.texts, 0.1, seed=0)
    hooks = {f"blocks.{l}.ln2.hook_normalized": tcs[l] for l in sorted(by_layer)}
    feats = {f"blocks.{l}.ln2.hook_normalized": sorted(fs) for l, fs in by_layer.items()}
    ctxs, fires, n_tok = top_activating_contexts_multi(model, hooks, held, feats, k=5,
                                                       max_tokens=cfg.feature_context_tokens)
    out = {}
    for l, fs in sorted(by_layer.items()):
        hook = f"blocks.{l}.ln2.hook_normalized"
        effects = feature_logit_effects(model, tcs[l], sorted(fs), top_n=5)
        for f in sorted(fs):
            prom = effects[f][0]
            out[f"feature/L{l}/I{f}"] = {
                "label": auto_label(ctxs[hook][f], prom), "contexts": [c["text"] for c in ctxs[hook][f]],
                "promoted": [t for t, _ in prom], "density": float(fires[hook][f]) / max(1, n_tok)}
    return out
