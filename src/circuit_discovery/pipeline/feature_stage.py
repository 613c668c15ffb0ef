"""Pipeline glue for dictionaries and feature circuits.

* :func:`dictionaries` trains (or reuses from the cache) one transcoder per layer and evaluates them.
* :func:`feature_circuit_for_relation` builds a relation's feature circuit from transcoder attribution graphs
  and validates it both in the transcoder-replaced model (frozen errors) and in the real model (live MLPs plus
  feature deltas): faithfulness, curve (CPR/CMD over the whole relevant universe), random baseline,
  error/feature-only baselines, circuit-tracer's replacement and completeness scores per graph, held-out
  faithfulness, and the per-prompt data of the ``features_matter`` hypothesis on held-out prompts -- metric drop
  when the circuit's top features are ablated against matched random features (necessity) and whether steering
  the circuit's subject features to the counterfactual subject's values flips the answer, against steering
  matched random subject features (sufficiency).

Everything returned is plain JSON, so the stages can be saved and resumed.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from circuit_discovery.graph.circuit import Circuit, attach_validation
from circuit_discovery.pipeline.circuit_stage import _held_out_entry, is_validated, split_pairs
from circuit_discovery.pipeline.config import RunConfig

log = logging.getLogger(__name__)

SUBJECT_ROLES = ("subject_first", "subject_middle", "subject_last")


def dictionaries(model, cfg: RunConfig):
    """``(DictionarySet, json)``: the per-layer transcoders of the run."""
    from circuit_discovery.sae.dictionaries import train_transcoders

    ds = train_transcoders(model, cfg.sae_layers, training_tokens=cfg.sae_training_tokens, k=cfg.sae_k,
                           seed=cfg.sae_seed, cache_dir=None if cfg.cache_dir is None else f"{cfg.cache_dir}/saes",
                           corpus_cache_dir=cfg.cache_dir, n_sequences=cfg.sae_corpus_sequences,
                           text_files=cfg.sae_text_files, evaluate=cfg.sae_eval_tokens > 0,
                           eval_tokens=max(cfg.sae_eval_tokens, 1), progress=cfg.progress)
    return ds, ds.metrics_json()


def _feature_ids(ids: Sequence[str]) -> list[str]:
    return [i for i in ids if i.startswith("feature/")]


def _faithfulness_or_none(mc: float, mf: float, me: float, min_gap: float = 0.0) -> float | None:
    """``f`` or ``None`` where ``|m(N) - m(∅)| < min_gap`` (degenerate)."""
    from circuit_discovery.validation.curves import DegenerateMetricError, faithfulness

    if abs(mf - me) < min_gap:
        return None
    try:
        return float(faithfulness(mc, mf, me))
    except DegenerateMetricError:
        return None


def feature_circuit_for_relation(model, tcs, relation: str, pairs, cfg: RunConfig, graphs_dir=None,
                                 validate: bool = True) -> dict:
    """Build and validate one relation's feature circuit.

    ``pairs``: the relation's pairs (a plain list is split in order, 40% held out) or ``{"discovery": [...],
    "held_out": [...]}``. Validation (``validation`` dict):

    * replacement-model numbers (``errors="frozen"``) from :func:`circuit_stage.circuit_validation` --
      ``faithfulness`` (= ``faithfulness_replacement``), curve/CPR/CMD over the whole relevant universe,
      random baseline -- and ``faithfulness_live``: the same circuit judged in the real model (live MLPs plus
      feature deltas, :class:`FeatureCircuitEvaluator` ``errors="live"``). The discovery evaluator's feature
      nodes are the graphs' visited features, so its error nodes are the graphs' error nodes;
    * ``baselines``: ``{name: {"faithfulness_replacement", "faithfulness_live", "n_nodes"}}`` for
      ``embeddings_and_errors``, ``features_only`` and ``circuit_without_errors``;
    * per graph (discovery prompt): ``replacement_score``, ``completeness_score``, ``error_influence_share``
      (circuit-tracer's scores, :func:`attribution.feature_graph.graph_scores`), and the circuit's
      ``circuit_error_nodes``, ``circuit_feature_nodes`` and ``circuit_error_score_share`` (share of the circuit's
      node scores on error nodes);
    * held out: ``held_out_faithfulness`` (replacement) and ``held_out_faithfulness_live``, with feature nodes =
      the discovery universe's features, and the ``features_matter`` data (:func:`features_matter_data`, live
      errors, held-out prompts only).
    """
    from circuit_discovery.attribution.feature_graph import decoder_directions, feature_circuit
    from circuit_discovery.graph import find_supernodes
    from circuit_discovery.pipeline.circuit_stage import circuit_validation, export_graph
    from circuit_discovery.validation.features import FeatureCircuitEvaluator

    seed = cfg.seed
    disc, held = split_pairs(pairs)
    disc = disc[: cfg.feature_facts]
    res = feature_circuit(model, tcs, disc, name=relation, max_feature_nodes=cfg.feature_nodes,
                          batch_size=cfg.batch_size, node_threshold=cfg.node_threshold,
                          edge_threshold=cfg.edge_threshold)
    circuit = res.circuit
    node_scores = {n.id: float(n.score or 0.0) for n in circuit.nodes}
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
    abl = _ablation(cfg)
    ev = FeatureCircuitEvaluator.from_graphs(model, tcs, disc, res.graphs, metric=cfg.metric, ablation=abl)
    universe = set(ev.universe)
    ranked = [i for i in ranked if i in universe]
    ids = [i for i in ids if i in universe]
    # in-sample, replacement model (frozen errors); the baselines run on the held-out prompts only
    val = circuit_validation(ev, ids, ranked, cfg, seed, baselines=False)
    val["ablation"] = abl
    val["faithfulness_replacement"] = val["faithfulness"]
    live = ev.with_errors("live")
    no_err = [i for i in ids if not i.startswith("error/")]
    sets = {"circuit_without_errors": no_err, **ev.baseline_node_sets()}
    names = list(sets)
    m_frozen = ev.metric_of([ids, ev.universe, []] + [sets[k] for k in names])
    m_live = live.metric_of([ids, ev.universe, []] + [sets[k] for k in names])
    live_ci = live.faithfulness_with_ci(ids, seed=seed, min_gap=cfg.min_metric_gap)
    val["faithfulness_live"], val["ci_live"] = live_ci["faithfulness"], [live_ci["ci_low"], live_ci["ci_high"]]
    gap = cfg.min_metric_gap
    val["baselines"] = {
        k: {"faithfulness_replacement": _faithfulness_or_none(m_frozen[3 + j], m_frozen[1], m_frozen[2], gap),
            "faithfulness_live": _faithfulness_or_none(m_live[3 + j], m_live[1], m_live[2], gap),
            "n_nodes": len(sets[k])} for j, k in enumerate(names)}
    scores = res.info.get("graph_scores") or [r.scores() for r in res.graphs]
    for key in ("replacement_score", "completeness_score", "error_influence_share"):
        val[key] = [sc[key] for sc in scores]
    err_ids = [i for i in ids if i.startswith("error/")]
    total = sum(abs(node_scores.get(i, 0.0)) for i in ids)
    val["circuit_error_nodes"] = len(err_ids)
    val["circuit_feature_nodes"] = sum(i.startswith("feature/") for i in ids)
    val["circuit_error_score_share"] = (sum(abs(node_scores.get(i, 0.0)) for i in err_ids) / total) if total else None
    val["n_relevant_universe"] = len(ev.relevant_universe)
    if held:
        feat_universe = [i for i in ev.universe if i.startswith("feature/")]
        hev = FeatureCircuitEvaluator(model, tcs, held, metric=cfg.metric, ablation=abl, feature_nodes=feat_universe)
        hids = [i for i in ids if i in set(hev.universe)]
        # replacement model, held out; the matched baseline only (each feature-circuit evaluation runs 18 transcoders)
        val["held_out"] = circuit_validation(hev, hids, ranked, cfg, seed, baselines=["matched"])
        val["held_out_faithfulness"] = val["held_out"]["faithfulness"]
        val["held_out_ci"] = val["held_out"]["ci"]
        hlive = hev.with_errors("live").faithfulness_with_ci(hids, seed=seed, min_gap=cfg.min_metric_gap)
        val["held_out_faithfulness_live"] = hlive["faithfulness"]
        val["held_out_ci_live"] = [hlive["ci_low"], hlive["ci_high"]]
        val["n_held_out"] = len(held)
        fev = FeatureCircuitEvaluator(model, tcs, held, metric=cfg.metric, ablation=abl, errors="live")
        val.update(features_matter_data(fev, ranked, cfg.steer_features, cfg.steer_random, seed, circuit=ids))
    else:
        val["held_out"] = val["held_out_faithfulness"] = val["held_out_faithfulness_live"] = None
        val["held_out_ci"] = val["held_out_ci_live"] = [None, None]
        val["n_held_out"] = 0
        val["features_matter_note"] = "no held-out prompts: features_matter data is computed on held-out prompts only"
    return {"circuit": circuit.to_dict(), "info": dict(res.info),
            "validation": val, "n_discovery": len(disc), "n_held_out": len(held)}


def feature_metrics(v: dict, found: dict) -> dict:
    """The per-relation entry of metrics.json's ``feature_circuits`` (held-out numbers lead)."""
    h = v.get("held_out") or {}
    base = v.get("baselines") or {}
    return {
        "faithfulness": v.get("faithfulness"), "faithfulness_live": v.get("faithfulness_live"),
        "held_out_faithfulness": v.get("held_out_faithfulness"), "held_out_ci": v.get("held_out_ci"),
        "held_out_faithfulness_live": v.get("held_out_faithfulness_live"),
        "held_out_ci_live": v.get("held_out_ci_live"),
        **_held_out_entry(h),
        "replacement_score": v.get("replacement_score"), "completeness_score": v.get("completeness_score"),
        "error_influence_share": v.get("error_influence_share"),
        "circuit_error_nodes": v.get("circuit_error_nodes"), "circuit_feature_nodes": v.get("circuit_feature_nodes"),
        "baseline_embeddings_and_errors": (base.get("embeddings_and_errors") or {}).get("faithfulness_replacement"),
        "baseline_features_only": (base.get("features_only") or {}).get("faithfulness_replacement"),
        "baselines": base,
        **{k: v.get(k) for k in ("feature_ablation_drop", "random_feature_ablation_drop", "steering_flips",
                                 "steering_random_flip_rate")},
        "validated": is_validated(h), "n_discovery": found.get("n_discovery"), "n_held_out": v.get("n_held_out"),
        "ablation": v.get("ablation"),
    }


def feature_circuit(relation: str, found: dict) -> Circuit:
    """The :class:`Circuit` of one relation's feature circuit (:func:`feature_circuit_for_relation`'s result),
    named ``<relation>/features``, marked ``kind: "feature"``, with its validation attached (if it was
    validated): what ``circuits.json`` holds and what the API returns."""
    circuit = Circuit.from_dict(found["circuit"])
    circuit.name = f"{relation}/features"
    circuit.extra["kind"] = "feature"
    v = found.get("validation")
    return attach_validation(circuit, None if v is None else feature_metrics(v, found), "feature")


def _ablation(cfg: RunConfig) -> str:
    return cfg.ablation if cfg.ablation in ("corrupted", "zero") else "corrupted"


def _layer_role(node_id: str) -> tuple[str, str]:
    parts = node_id.split("/")
    return parts[1], parts[-1]


def matched_random_features(ev, features: Sequence[str], pair_index: int, n_draws: int, rng,
                            exclude: Sequence[str] = ()) -> tuple[list[list[str]], int]:
    """``(draws, shortfall)``: ``n_draws`` random feature sets for pair ``pair_index`` of evaluator ``ev``, each
    with as many features per (layer, role) as ``features`` has, drawn uniformly without replacement from that
    pair's active features (:meth:`FeatureCircuitEvaluator.active_features`) outside ``features`` and
    ``exclude`` (the circuit). ``shortfall``: features per draw that could not be matched (a (layer, role) with
    fewer candidates than needed gets all of them)."""
    counts: dict[tuple[str, str], int] = {}
    for f in features:
        counts[_layer_role(f)] = counts.get(_layer_role(f), 0) + 1
    banned = set(features) | set(exclude)
    pools: dict[tuple[str, str], list[str]] = {}
    for f in ev.active_features(pair_index):
        key = _layer_role(f)
        if key in counts and f not in banned:
            pools.setdefault(key, []).append(f)
    shortfall = sum(max(0, c - len(pools.get(k, []))) for k, c in counts.items())
    draws = []
    for _ in range(n_draws):
        d: list[str] = []
        for k, c in sorted(counts.items()):
            pool = pools.get(k, [])
            if pool:
                d += rng.choice(pool, size=min(c, len(pool)), replace=False).tolist()
        draws.append(d)
    return draws, shortfall


def features_matter_data(ev, ranked: Sequence[str], k: int, n_random: int, seed: int,
                         circuit: Sequence[str] | None = None) -> dict:
    """Per-prompt data of the ``features_matter`` hypothesis from a :class:`FeatureCircuitEvaluator` on
    **held-out** prompts (the circuit and its ranking come from the discovery prompts); use ``errors="live"`` to
    judge the features in the real model.

    * necessity: ``feature_ablation_drop[i] = m_i(N) - m_i(N minus the top-k circuit features)`` (features ranked
      by ``ranked``, ablated to their ablation values) and ``random_feature_ablation_drop[i]``: the mean drop over
      ``n_random`` matched random feature sets of prompt ``i`` (:func:`matched_random_features`: same count per
      (layer, role), drawn from that prompt's active features outside the circuit);
    * sufficiency: steer the top-k *subject* features of the circuit to their ablation values (the
      counterfactual subject's, everything else clean): ``steering_flips[i]`` = 1 if prompt ``i``'s metric turns
      negative (the counterfactual answer now wins); ``steering_random_flip_rate[i]``: the share of ``n_random``
      matched random subject-feature sets that flip prompt ``i``.

    One value per prompt (the unit of the tests); ``clean_metric`` tells which prompts were right to begin with.
    """
    feats_ranked = [i for i in _feature_ids(ranked) if i in set(ev.universe)]
    in_circuit = set(circuit) if circuit is not None else None
    pool = [i for i in feats_ranked if in_circuit is None or i in in_circuit]
    top = pool[:k]
    out: dict = {"necessity_features": top, "features_matter_prompts": "held_out",
                 "features_matter_n_prompts": len(ev.pairs)}
    if not top:
        out["features_matter_note"] = "the circuit has no feature node active on these prompts"
        return out
    universe = ev.universe
    full = set(universe)
    exclude = sorted(in_circuit) if in_circuit is not None else []
    rng = np.random.default_rng(seed)
    n_pairs = len(ev.pairs)
    per = ev.metric_per_prompt([universe, sorted(full - set(top))]).numpy()
    out["clean_metric"] = per[0].tolist()
    out["feature_ablation_drop"] = (per[0] - per[1]).tolist()

    def random_rows(feats):
        draws, short = zip(*(matched_random_features(ev, feats, i, n_random, rng, exclude) for i in range(n_pairs)))
        sets = [[sorted(full - set(draws[i][d])) for i in range(n_pairs)] for d in range(n_random)]
        return (ev.metric_per_prompt_paired(sets).numpy() if n_random > 0 else np.zeros((0, n_pairs))), list(short)

    rand, short = random_rows(top)
    out["random_feature_ablation_drop"] = (per[0][None] - rand).mean(0).tolist() if n_random else []
    out["random_feature_shortfall"] = short
    out["n_random_draws"] = int(n_random)
    subj = [i for i in pool if i.split("/")[-1] in SUBJECT_ROLES][:k]
    out["steer_features"] = subj
    if not subj:
        return out
    steered = ev.metric_per_prompt([sorted(full - set(subj))]).numpy()[0]
    out["steering_flips"] = [int(v < 0) for v in steered]
    rand_s, short_s = random_rows(subj)
    flips = (rand_s < 0).astype(int)  # [n_random, n_pairs]
    out["steering_random_flip_rate"] = flips.mean(0).tolist() if n_random else []
    out["steering_random_shortfall"] = short_s
    out["steering_random_flips"] = flips.reshape(-1).tolist()  # flat, for readers of the old format
    return out


def feature_details(model, tcs, relations: dict, cfg: RunConfig) -> dict:
    """``{"feature/L{l}/I{f}": {"label", "contexts", "promoted", "density"}}`` for every feature in the relations'
    feature circuits: top-activating contexts over ``cfg.feature_context_tokens`` held-out tokens of the
    transcoders' corpus (one forward pass per batch for all layers) and the tokens each decoder direction
    promotes. Used by the viewer (node details) and kept in the stage file."""
    from circuit_discovery.sae.corpus import build_corpus, split_heldout
    from circuit_discovery.sae.labels import auto_label, feature_logit_effects, top_activating_contexts_multi

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
    hooks = {f"blocks.{l}.mlp.hook_in": tcs[l] for l in sorted(by_layer)}
    feats = {f"blocks.{l}.mlp.hook_in": sorted(fs) for l, fs in by_layer.items()}
    ctxs, fires, n_tok = top_activating_contexts_multi(model, hooks, held, feats, k=5,
                                                       max_tokens=cfg.feature_context_tokens)
    out = {}
    for l, fs in sorted(by_layer.items()):
        hook = f"blocks.{l}.mlp.hook_in"
        effects = feature_logit_effects(model, tcs[l], sorted(fs), top_n=5)
        for f in sorted(fs):
            prom = effects[f][0]
            out[f"feature/L{l}/I{f}"] = {
                "label": auto_label(ctxs[hook][f], prom), "contexts": [c["text"] for c in ctxs[hook][f]],
                "promoted": [t for t, _ in prom], "density": float(fires[hook][f]) / max(1, n_tok)}
    return out
