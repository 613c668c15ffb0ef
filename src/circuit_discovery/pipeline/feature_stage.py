"""Pipeline glue for dictionaries and feature circuits.

* :func:`dictionaries` loads the run's transcoder set (``cfg.dictionaries``: per-layer transcoders with or without
  skip connections, or a cross-layer transcoder, through ``sae.load_transcoder_set``; checked against the model
  before any work) or trains (or reuses from the cache) one transcoder per layer (``cfg.sae_kind``), measures
  each layer's quality on the held-out corpus (EV, CE-loss score, dead share, L0) and states it against the bar
  (:func:`dictionary_quality`).
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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuit_discovery.errors import InputError
from circuit_discovery.graph.circuit import Circuit, attach_validation
from circuit_discovery.pipeline.circuit_stage import _held_out_entry, is_validated, split_pairs
from circuit_discovery.pipeline.config import RunConfig
from circuit_discovery.sae.transcoder_set import TranscoderSet

log = logging.getLogger(__name__)

SUBJECT_ROLES = ("subject_first", "subject_middle", "subject_last")


#: The quality a dictionary layer must reach for feature circuits built on it to count as findings: explained
#: variance and CE-loss score at least, dead share and L0 at most these values (SAELens metric names).
QUALITY_BAR = {"explained_variance": 0.8, "ce_loss_score": 0.85, "dead_fraction": 0.1, "l0": 64}
_AT_LEAST = ("explained_variance", "ce_loss_score")


def _below_bar(m: Mapping[str, Any] | None) -> bool:
    if not m:
        return True
    for k, bar in QUALITY_BAR.items():
        v = m.get(k)
        if not isinstance(v, (int, float)) or math.isnan(float(v)):
            return True
        if (float(v) < bar) if k in _AT_LEAST else (float(v) > bar):
            return True
    return False


def dictionary_quality(layers: Mapping[str, Mapping[str, Any] | None], source: str, *,
                       trained_tokens: int | None = None, expected: Sequence[str] = ()) -> dict:
    """The dictionary-quality contract of feature circuits, from per-layer metrics.

    ``layers``: ``{hook pair ("blocks.3.mlp.hook_in->blocks.3.hook_mlp_out"): metrics}`` (``evaluate_sae``'s names);
    ``expected``: hook pairs that must be there (a layer without metrics is below the bar: its quality is
    unknown). ``trained_tokens``: the training budget per layer when the dictionaries were trained here (shapes the
    advice), ``None`` for loaded ones. Returns ``{"meets_bar", "bar", "layers_below_bar", "source", "advice"}``:
    ``meets_bar`` is true only when every layer meets every bar (:data:`QUALITY_BAR`)."""
    keys = list(dict.fromkeys(list(expected) + list(layers)))
    below = [k for k in keys if _below_bar(layers.get(k))]
    unmeasured = [k for k in keys if not layers.get(k)]
    meets = bool(keys) and not below
    if meets:
        advice = "none needed: every layer meets the bar"
    elif unmeasured and len(unmeasured) == len(keys):
        advice = ("quality not measured: set sae_eval_tokens > 0 (e.g. 256) so each layer is evaluated; until then "
                  "feature circuits are not counted as findings")
    elif trained_tokens is not None:
        advice = (f"trained here on {trained_tokens:,} tokens per layer, too few for these layers: raise "
                  "sae_training_tokens (docs/sae.md gives the budget that meets the bar) or load a published "
                  "transcoder set with --dictionaries SOURCE (e.g. a Gemma Scope 2 repo id or a local folder; "
                  "README lists the sources)")
    else:
        advice = ("the loaded dictionaries are below the bar on this model's held-out corpus: load another width "
                  "or L0 of the release with --dictionaries, or train here with a larger sae_training_tokens")
    return {"meets_bar": meets, "bar": dict(QUALITY_BAR), "layers_below_bar": below, "source": source,
            "advice": advice}


def hook_pair(ts: TranscoderSet, layer: int) -> str:
    """``"blocks.{l}.<in hook>->blocks.{l}.<out hook>"``: a dictionary layer's key in metrics and quality."""
    return f"{ts.hook_in_at(layer)}->{ts.hook_out_at(layer)}"


@dataclass
class FeatureDictionaries:
    """The run's dictionaries: ``transcoders`` (``{layer: transcoder}`` as a ``TranscoderDict`` for per-layer sets,
    the :class:`TranscoderSet` of a cross-layer transcoder; the set's ``metadata["dictionary_quality"]`` is
    :func:`dictionary_quality`'s result), the per-layer ``metrics`` and the stage's JSON."""

    transcoders: Any
    metrics: dict[str, dict]
    quality: dict
    json: dict = field(default_factory=dict)
    trained_set: Any = None  # the trainer's DictionarySet when trained here

    def metrics_json(self) -> dict:
        return self.json

    @property
    def trained(self) -> list[int]:
        """Layers trained by this call (the others came from the cache; none for loaded dictionaries)."""
        return list(getattr(self.trained_set, "trained", []))


def _load_transcoder_set(source: str, model):
    """``sae.load_transcoder_set(source)``: a local folder/file, or a Hugging Face id read from the local cache first
    (downloaded only when online and ``HF_HUB_OFFLINE`` is unset)."""
    from circuit_discovery.sae.pretrained import load_transcoder_set

    return load_transcoder_set(source, model=model.cfg.model_name, allow_download=True)


def load_checked_dictionaries(model, cfg: RunConfig) -> TranscoderSet:
    """The transcoder set ``cfg.dictionaries`` names, loaded and checked against ``model`` (width, layer count and
    hooks: ``TranscoderSet.check_model``; the hooks and affine reading feature graphs need: ``DictionaryView``), so
    that a set that does not fit fails with one line before any work. Call it before creating anything."""
    from circuit_discovery.attribution.feature_graph import DictionaryView

    if not cfg.dictionaries:
        raise InputError("no dictionaries to load: set dictionaries (--dictionaries SOURCE)")
    ts = _load_transcoder_set(cfg.dictionaries, model)
    ts.source = ts.source or str(cfg.dictionaries)
    ts.check_model(model)
    DictionaryView(model, ts)
    return ts


def dictionaries(model, cfg: RunConfig, loaded: TranscoderSet | None = None):
    """``(FeatureDictionaries, json)``: the run's transcoders, loaded (``cfg.dictionaries``; ``loaded``: the set
    :func:`load_checked_dictionaries` already returned) or trained (``cfg.sae_kind``), with their per-layer quality
    on the held-out corpus and the quality contract."""
    import time

    from circuit_discovery.attribution.feature_graph import DictionaryView, TranscoderDict, as_transcoder_set

    t0 = time.perf_counter()
    trained_tokens: int | None = None
    ds = None
    if cfg.dictionaries:
        ts = loaded if loaded is not None else load_checked_dictionaries(model, cfg)
        view = DictionaryView(model, ts)
        source = f"loaded: {cfg.dictionaries}"
        metrics = _evaluate_set(model, ts, cfg) if cfg.sae_eval_tokens > 0 else {}
        base: dict = {"layers": metrics}
    else:
        ds = _train(model, cfg)
        ts = as_transcoder_set(getattr(ds, "transcoder_set", None) or ds.transcoders)
        view = DictionaryView(model, ts)
        trained_tokens = int(cfg.sae_training_tokens)
        source = f"trained here: {cfg.sae_kind}, {trained_tokens:,} tokens/layer"
        base = ds.metrics_json()
        metrics = {(hook_pair(ts, int(l)) if isinstance(l, int) or str(l).isdigit() else str(l)): m
                   for l, m in ds.metrics.items()}
        ts.source = ts.source or source
    quality = dictionary_quality(metrics, source, trained_tokens=trained_tokens,
                                 expected=[hook_pair(ts, l) for l in ts.layers])
    ts.metadata["dictionary_quality"] = quality
    js = {**base, "source": source, "kind": view.kind, "activation": view.activation, "hook_in": ts.hook_in,
          "hook_out": ts.hook_out, "dictionary_quality": quality, "seconds": base.get("seconds",
                                                                                     time.perf_counter() - t0)}
    tcs = ts if ts.cross_layer is not None else TranscoderDict(ts)
    return FeatureDictionaries(transcoders=tcs, metrics=metrics, quality=quality, json=js,
                               trained_set=None if cfg.dictionaries else ds), js


def _train(model, cfg: RunConfig, layers: Sequence[int] | None = None):
    """``train_transcoders`` with the run's settings, for ``layers`` (default ``cfg.sae_layers``: every layer when
    ``None``)."""
    from circuit_discovery.sae.dictionaries import train_transcoders

    return train_transcoders(model, cfg.sae_layers if layers is None else list(layers),
                             training_tokens=cfg.sae_training_tokens, k=cfg.sae_k,
                             seed=cfg.sae_seed, cache_dir=None if cfg.cache_dir is None else f"{cfg.cache_dir}/saes",
                             corpus_cache_dir=cfg.cache_dir, n_sequences=cfg.sae_corpus_sequences,
                             text_files=cfg.sae_text_files, evaluate=cfg.sae_eval_tokens > 0,
                             eval_tokens=max(cfg.sae_eval_tokens, 1), progress=cfg.progress, kind=cfg.sae_kind,
                             activations=cfg.sae_activations)


def split_layers(model, cfg: RunConfig) -> list[int] | None:
    """The transcoder layers a distributed run deals over its ranks (``cfg.sae_layers``, else every layer), or
    ``None`` when the dictionaries are not trained layer by layer: loaded (``cfg.dictionaries``) or one cross-layer
    transcoder (``cfg.sae_kind == "clt"``), which one rank trains."""
    if cfg.dictionaries or cfg.sae_kind == "clt":
        return None
    return [int(l) for l in (cfg.sae_layers if cfg.sae_layers is not None else range(model.cfg.n_layers))]


def build_training_corpus(model, cfg: RunConfig) -> str:
    """Build (or read from the cache) the transcoders' corpus with the settings :func:`_train` uses, so that it is
    in the cache before several processes train; returns its ``corpus_id``."""
    from circuit_discovery.sae.corpus import build_corpus

    return build_corpus(model, n_sequences=cfg.sae_corpus_sequences, cache_dir=cfg.cache_dir,
                        text_files=list(cfg.sae_text_files), progress=cfg.progress).corpus_id


def train_layers(model, cfg: RunConfig, layers: Sequence[int]) -> dict[str, list[int]]:
    """Train the per-layer transcoders of ``layers`` (:func:`_train`: one activation harvest; each transcoder and its
    held-out metrics saved in the transcoder cache, where :func:`dictionaries` finds them): ``{"trained": layers
    trained now, "cached": layers that were already in the cache}``."""
    ds = _train(model, cfg, layers)
    trained = [int(l) for l in ds.trained]
    return {"trained": trained, "cached": [int(l) for l in layers if int(l) not in trained]}


def _evaluate_set(model, ts: TranscoderSet, cfg: RunConfig) -> dict[str, dict]:
    """Per-layer quality of a loaded set on the run's held-out corpus (the documents the trainer holds out):
    :func:`~circuit_discovery.sae.evaluate.evaluate_sae` per layer, :func:`evaluate_cross_layer` for a CLT."""
    from circuit_discovery.sae.corpus import build_corpus, split_heldout
    from circuit_discovery.sae.evaluate import evaluate_sae

    corpus = build_corpus(model, n_sequences=cfg.sae_corpus_sequences, cache_dir=cfg.cache_dir,
                          text_files=list(cfg.sae_text_files), progress=cfg.progress)
    _, held = split_heldout(corpus.texts, 0.1, seed=0)
    if ts.cross_layer is not None:
        return evaluate_cross_layer(model, ts, held, n_tokens=cfg.sae_eval_tokens)
    out = {}
    for l in ts.layers:
        m = evaluate_sae(model, ts.per_layer[l], ts.hook_in_at(l), held, n_tokens=cfg.sae_eval_tokens,
                         hook_name_out=ts.hook_out_at(l), sparsity_tokens=4096)
        out[hook_pair(ts, l)] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
    return out


@torch.no_grad()
def evaluate_cross_layer(model, ts: TranscoderSet, texts: Sequence[str], n_tokens: int = 256,
                         context_size: int = 128, batch_size: int = 2) -> dict[str, dict]:
    """Per-layer quality of a cross-layer transcoder on held-out ``texts`` (at most ``n_tokens`` real tokens; BOS
    and padding excluded, as :func:`~circuit_discovery.sae.evaluate.evaluate_sae`).

    For target layer ``t``: ``explained_variance`` of ``hook_mlp_out`` at ``t`` by the CLT's reconstruction from
    the clean inputs of every layer ``<= t``; ``ce_loss_score`` with only layer ``t``'s output spliced (that
    reconstruction) against zero-ablating it; ``l0`` and ``dead_fraction`` of the features encoded at ``t`` (per
    layer the definition of :func:`circuit_discovery.sae.clt_training.evaluate_clt`, here for every target in one
    pass per batch).
    ``ce_loss_score_all_layers`` (every layer's entry): the fully spliced model, each layer's output the CLT's
    reconstruction from the spliced model's own inputs (circuit-tracer's replacement model), against zero-ablating
    every MLP output."""
    from circuit_discovery.sae.evaluate import ce_loss_score, dead_fraction, explained_variance, next_token_losses
    from circuit_discovery.sae.harvest import iter_token_batches, token_mask

    c = ts.cross_layer
    if c is None:
        raise InputError("evaluate_cross_layer needs a TranscoderSet holding a cross-layer transcoder")
    L = c.n_layers
    ins, outs = [ts.hook_in_at(l) for l in range(L)], [ts.hook_out_at(l) for l in range(L)]
    ys: dict[int, list[Tensor]] = {t: [] for t in range(L)}
    recs: dict[int, list[Tensor]] = {t: [] for t in range(L)}
    fires = torch.zeros(L, c.d_sae, dtype=torch.long)
    l0s: dict[int, list[Tensor]] = {t: [] for t in range(L)}
    ce = {"clean": 0.0, "all": 0.0, "zero_all": 0.0, **{f"{k}{t}": 0.0 for t in range(L) for k in "sz"}}
    n_pred = n_seen = 0
    for tokens, mask in iter_token_batches(model, texts, context_size, batch_size):
        real = token_mask(model, tokens, mask)
        keep = real & (real.flatten().cumsum(0).reshape(real.shape) <= n_tokens - n_seen)
        rows = keep.any(1)
        tokens, mask, keep = tokens[rows], mask[rows], keep[rows]
        cache: dict[str, Tensor] = {}
        with model.hooks([(h, lambda x, name: cache.__setitem__(name, x.detach())) for h in ins + outs]):
            clean = model.final_hidden(tokens, attention_mask=mask)
        valid = keep[:, 1:]

        def nll(h):
            return next_token_losses(model, {"h": h}, tokens, valid)[0]["h"]

        ce["clean"] += nll(clean)
        acts = {l: c.encode(l, cache[ins[l]].float()) for l in range(L)}
        for l in range(L):
            f = acts[l][keep]
            fires[l] += (f != 0).sum(0).cpu()
            l0s[l].append((f != 0).sum(-1).float().cpu())
        for t in range(L):
            rec = c.decode(acts, t)
            ys[t].append(cache[outs[t]][keep].float().cpu())
            recs[t].append(rec[keep].float().cpu())
            for key, val in ((f"s{t}", rec), (f"z{t}", torch.zeros_like(rec))):
                def put(x, _, val=val):
                    return torch.where(keep[..., None], val.to(x.dtype), x)
                with model.hooks([(outs[t], put)]):
                    ce[key] += nll(model.final_hidden(tokens, attention_mask=mask))
        live: dict[int, Tensor] = {}

        def grab(l):
            def fn(x, _):
                live[l] = c.encode(l, x.float())
            return fn

        def splice(t):
            def fn(x, _):
                return torch.where(keep[..., None], c.decode(live, t).to(x.dtype), x)
            return fn
        hooks = [h for l in range(L) for h in ((ins[l], grab(l)), (outs[l], splice(l)))]
        with model.hooks(hooks):
            ce["all"] += nll(model.final_hidden(tokens, attention_mask=mask))

        def zero(x, _):
            return torch.where(keep[..., None], torch.zeros_like(x), x)
        with model.hooks([(o, zero) for o in outs]):
            ce["zero_all"] += nll(model.final_hidden(tokens, attention_mask=mask))
        n_pred += int(valid.sum())
        n_seen += int(keep.sum())
        if n_seen >= n_tokens:
            break
    if n_pred == 0:
        raise InputError("no held-out tokens to evaluate the cross-layer transcoder on; give more text")
    all_score = ce_loss_score(ce["clean"] / n_pred, ce["all"] / n_pred, ce["zero_all"] / n_pred)
    out = {}
    for t in range(L):
        out[hook_pair(ts, t)] = {
            "l0": float(torch.cat(l0s[t]).mean()),
            "explained_variance": explained_variance(torch.cat(ys[t]), torch.cat(recs[t])),
            "ce_loss_score": ce_loss_score(ce["clean"] / n_pred, ce[f"s{t}"] / n_pred, ce[f"z{t}"] / n_pred),
            "ce_clean": ce["clean"] / n_pred, "ce_spliced": ce[f"s{t}"] / n_pred,
            "ce_zero_ablated": ce[f"z{t}"] / n_pred, "dead_fraction": dead_fraction(fires[t]),
            "ce_loss_score_all_layers": all_score, "n_tokens": n_seen, "dead_fraction_n_tokens": n_seen}
    return out


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
    from circuit_discovery.attribution.feature_graph import decoder_directions, dictionary_view, feature_circuit
    from circuit_discovery.graph import find_supernodes
    from circuit_discovery.pipeline.circuit_stage import circuit_validation, export_graph
    from circuit_discovery.validation.features import FeatureCircuitEvaluator

    seed = cfg.seed
    quality = quality_of(tcs, model)
    tcs = dictionary_view(model, tcs)  # read and checked once for the graphs and the evaluators
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
        sn = find_supernodes(g, node_ids=feats, decoder_directions=decoder_directions(g, tcs)) \
            if len(feats) > 1 else []
        graph_files.append(export_graph(g, relation, f"-features-{i}", cfg, graphs_dir, supernodes=sn,
                                        description=f"transcoder feature graph of {g.prompt!r}"))
    circuit.extra["graphs"] = graph_files
    circuit.extra["prompt_tokens"] = [model.tokenizer.decode([t]) for t in disc[0].clean_tokens]

    res.info["dictionary_kind"] = tcs.kind
    if not validate:
        return {"circuit": circuit.to_dict(), "info": dict(res.info), "validation": None,
                "n_discovery": len(disc), "n_held_out": len(held), "dictionary_quality": quality}
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
    val["dictionary_quality"] = quality
    val["dictionary_kind"] = tcs.kind
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
    return {"circuit": circuit.to_dict(), "info": dict(res.info), "dictionary_quality": quality,
            "validation": val, "n_discovery": len(disc), "n_held_out": len(held)}


def quality_of(tcs: Any, model=None) -> dict:
    """The dictionary-quality contract of ``tcs``: the one :func:`dictionaries` stored in the set's metadata, else
    (dictionaries passed without measured quality, e.g. built by hand) unknown quality, which is below the bar."""
    meta = getattr(getattr(tcs, "set", tcs), "metadata", None)
    if isinstance(meta, Mapping) and isinstance(meta.get("dictionary_quality"), Mapping):
        return dict(meta["dictionary_quality"])
    layers: list[str] = []
    if model is not None:
        from circuit_discovery.attribution.feature_graph import as_transcoder_set

        ts = as_transcoder_set(tcs)
        layers = [hook_pair(ts, l) for l in ts.layers]
    return dictionary_quality({}, "unknown: dictionaries given without measured quality", expected=layers)


def finding_status(v: dict) -> tuple[bool, str | None]:
    """``(validated, reason)`` of a feature circuit's validation entry: the held-out criteria
    (:func:`circuit_stage.is_validated`) and dictionaries that meet the quality bar; ``reason`` says what failed."""
    reasons = []
    if not is_validated(v.get("held_out") or {}):
        reasons.append("the held-out criteria are not met (f >= 0.7, CI low >= 0.5, matched random p < 0.01, "
                       "<= 10% of the non-inert nodes)")
    dq = v.get("dictionary_quality")
    if not isinstance(dq, Mapping):
        reasons.append("the quality of its dictionaries is unknown")
    elif not dq.get("meets_bar"):
        below = list(dq.get("layers_below_bar") or [])
        reasons.append(f"its dictionaries are below the quality bar at {len(below)} layer(s)"
                       + (f" ({', '.join(below[:3])}{', ...' if len(below) > 3 else ''})" if below else "")
                       + f": {dq.get('advice')}")
    return not reasons, "; ".join(reasons) or None


def feature_metrics(v: dict, found: dict) -> dict:
    """The per-relation entry of metrics.json's ``feature_circuits`` (held-out numbers lead). ``validated`` needs
    the held-out criteria *and* dictionaries that meet the quality bar (:func:`finding_status`; the reason is in
    ``not_validated_reason``)."""
    h = v.get("held_out") or {}
    base = v.get("baselines") or {}
    validated, reason = finding_status(v)
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
        "validated": validated, "not_validated_reason": reason,
        "dictionary_quality": v.get("dictionary_quality"), "dictionary_kind": v.get("dictionary_kind"),
        "n_discovery": found.get("n_discovery"), "n_held_out": v.get("n_held_out"),
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
    dq = (v or {}).get("dictionary_quality") or found.get("dictionary_quality")
    if dq is not None:
        circuit.extra["dictionary_quality"] = dq
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
    """``{"feature/L{l}/I{f}": {"label", "contexts", "promoted", "suppressed", "density"}}`` for every feature in
    the relations' feature circuits: top-activating contexts over ``cfg.feature_context_tokens`` held-out tokens of the
    transcoders' corpus (one forward pass per batch for all layers) and the tokens each decoder direction
    promotes. Used by the viewer (node details) and kept in the stage file."""
    from circuit_discovery.attribution.feature_graph import dictionary_view
    from circuit_discovery.sae.corpus import build_corpus, split_heldout
    from circuit_discovery.sae.labels import auto_label, feature_logit_effects, top_activating_contexts_multi

    view = dictionary_view(model, tcs)
    by_layer: dict[int, set[int]] = {}
    for r in relations.values():
        for n in r["circuit"]["nodes"]:
            if n["component"] == "feature" and n.get("index") is not None and n["layer"] in view.layers:
                by_layer.setdefault(int(n["layer"]), set()).add(int(n["index"]))
    if not by_layer or cfg.feature_context_tokens <= 0:
        return {}
    corpus = build_corpus(model, n_sequences=cfg.sae_corpus_sequences, cache_dir=cfg.cache_dir,
                          text_files=list(cfg.sae_text_files), progress=False, count_tokens=False)
    _, held = split_heldout(corpus.texts, 0.1, seed=0)
    layer_dicts = {l: _LayerFeatures(view, l) for l in sorted(by_layer)}
    hooks = {view.in_hook(l): layer_dicts[l] for l in sorted(by_layer)}
    feats = {view.in_hook(l): sorted(fs) for l, fs in by_layer.items()}
    ctxs, fires, n_tok = top_activating_contexts_multi(model, hooks, held, feats, k=5,  # type: ignore[arg-type]
                                                       max_tokens=cfg.feature_context_tokens)
    out = {}
    for l, fs in sorted(by_layer.items()):
        hook = view.in_hook(l)
        effects = feature_logit_effects(model, layer_dicts[l], sorted(fs), top_n=5)  # type: ignore[arg-type]
        for f in sorted(fs):
            prom = effects[f][0]
            out[f"feature/L{l}/I{f}"] = {
                "label": auto_label(ctxs[hook][f], prom), "contexts": [c["text"] for c in ctxs[hook][f]],
                "promoted": [t for t, _ in prom], "suppressed": [t for t, _ in effects[f][1]],
                "density": float(fires[hook][f]) / max(1, n_tok)}
    return out


class _LayerFeatures:
    """The features encoded at one layer of a :class:`DictionaryView`, as the labelling helpers read a dictionary:
    ``encode``, ``cfg.d_sae``, ``W_enc`` (its device) and ``W_dec`` (each feature's total residual write,
    :meth:`DictionaryView.direction` -- its decoder row for a per-layer transcoder)."""

    def __init__(self, view, layer: int):
        from types import SimpleNamespace

        self.view, self.layer = view, layer
        self.cfg = SimpleNamespace(d_sae=view.d_sae[layer])
        self.W_enc = view.W_enc[layer]
        self._W_dec: Tensor | None = None

    @property
    def W_dec(self) -> Tensor:
        if self._W_dec is None:
            v, l = self.view, self.layer
            self._W_dec = torch.stack([v.dec(l, t) for t in v.targets(l)]).sum(0)
        return self._W_dec

    def eval(self):
        return self

    def encode(self, x: Tensor) -> Tensor:
        return self.view.encode(self.layer, x)
