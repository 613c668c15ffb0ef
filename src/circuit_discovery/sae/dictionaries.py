"""Per-layer dictionaries for feature circuits: train (or reuse from the cache) one transcoder per layer.

Feature graphs (``circuit_discovery.attribution.feature_graph``) replace each MLP by a transcoder that reads the MLP's
normalised input ``blocks.{l}.mlp.hook_in`` and predicts ``blocks.{l}.hook_mlp_out``. This module
builds those transcoders for a model from the built-in offline corpus (``build_corpus``) with one harvesting
pass for all layers, caches them (keyed by model, hook, training config and corpus) and optionally evaluates
them on held-out documents::

    ds = train_transcoders(model)                  # DictionarySet; ds.transcoders: {layer: SparseAutoencoder}
    ds = train_transcoders(model, layers=[3, 9])   # a subset; other MLPs become error nodes in graphs
    ds = train_transcoders(model, kind="jumprelu_skip_transcoder")
    ds.transcoder_set                              # the TranscoderSet feature graphs take (any kind)
    ds = train_transcoders(model, kind="clt")      # ds.transcoder_set.cross_layer; ds.transcoders == {}

Kinds (:data:`SAE_KINDS`, ``RunConfig.sae_kind``): ``topk_transcoder`` (TopK, k active latents),
``jumprelu_transcoder`` and ``jumprelu_skip_transcoder`` (JumpReLU trained by BatchTopK with k active latents on
average, without / with an affine skip connection; SAELens ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``)
and ``clt`` (one cross-layer transcoder over all layers, :mod:`circuit_discovery.sae.clt_training`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from circuit_discovery.errors import InputError
from circuit_discovery.io import atomic_write_json, read_json
from circuit_discovery.sae.architectures import SparseAutoencoder
from circuit_discovery.sae.dictionary_set import DictionarySet
from circuit_discovery.sae.io import cached_sae_path, sae_cache_key
from circuit_discovery.sae.training import SAETrainConfig, TrainResult, train_saes_on_model

__all__ = ["DictionarySet", "SAE_KINDS", "kind_settings", "transcoder_configs", "train_transcoders"]

#: the dictionary kinds :func:`train_transcoders` trains (``RunConfig.sae_kind``)
SAE_KINDS = ("topk_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "clt")
_KIND_SETTINGS: dict[str, dict[str, Any]] = {
    "topk_transcoder": {"architecture": "topk"},
    "jumprelu_transcoder": {"architecture": "jumprelu"},
    "jumprelu_skip_transcoder": {"architecture": "jumprelu", "skip": True},
}


def kind_settings(kind: str) -> dict[str, Any]:
    """The :class:`SAETrainConfig` fields of a per-layer ``kind`` (``architecture``, ``skip``)."""
    if kind not in SAE_KINDS:
        raise InputError(f"unknown dictionary kind {kind!r}; use one of {SAE_KINDS}")
    if kind == "clt":
        raise InputError("kind 'clt' is one cross-layer transcoder, not per-layer configs; use train_transcoders")
    return dict(_KIND_SETTINGS[kind])

_EVAL_VERSION = 2  # bump when evaluate_sae changes what it measures or how it sums (invalidates cached metrics)


def transcoder_configs(n_layers: int, layers: Sequence[int] | None = None, training_tokens: int = 100_000,
                       k: int = 64, architecture: str = "topk", seed: int = 42, **kwargs: Any) -> list[SAETrainConfig]:
    """One :class:`SAETrainConfig` per layer: ``blocks.{l}.mlp.hook_in -> blocks.{l}.hook_mlp_out``."""
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InputError(f"transcoder layers {bad} out of range for a {n_layers}-layer model (0..{n_layers - 1})")
    if not layers:
        raise InputError("no transcoder layers given")
    return [SAETrainConfig(f"blocks.{l}.mlp.hook_in", hook_name_out=f"blocks.{l}.hook_mlp_out",
                           architecture=architecture, k=k, training_tokens=training_tokens, seed=seed, **kwargs)
            for l in layers]


def train_transcoders(model, layers: Sequence[int] | None = None, *, training_tokens: int = 100_000, k: int = 64,
                      architecture: str | None = None, seed: int = 42, cache_dir: str | os.PathLike | None = None,
                      corpus_cache_dir: str | os.PathLike | None = None, text_files: Sequence[str] = (),
                      n_sequences: int | None = None, evaluate: bool = False, eval_tokens: int = 256,
                      sparsity_tokens: int = 4096, progress: bool = True, kind: str | None = None,
                      clt_d_sae: int | None = None, activations: str = "memory") -> DictionarySet:
    """Train (or load from the cache) the transcoders of ``kind`` for ``model`` on the built-in corpus.

    ``kind``: one of :data:`SAE_KINDS` (default ``topk_transcoder``; ``architecture="standard"`` alone gives plain
    ReLU transcoders, kept for old callers). ``clt`` trains one cross-layer transcoder over every layer
    (``layers`` must be ``None`` or all layers; ``clt_d_sae`` latents per layer, default
    :data:`~circuit_discovery.sae.clt_training.CLT_D_SAE`) with the same budget and corpus.
    ``layers``: default every layer. ``training_tokens``/``k``/``architecture``/``seed``: see
    :class:`SAETrainConfig` (the defaults meet the quality bar at the middle layer of Gemma 3 270M; see
    ``docs/sae.md``). ``evaluate``: compute the SAELens metrics of each transcoder on ``eval_tokens`` held-out
    tokens (MLP replaced by the transcoder in the CE score; ``l0`` and ``dead_fraction`` over up to
    ``sparsity_tokens`` held-out tokens, which need no unembedding); the metrics of a transcoder taken from the cache
    are cached too (``<cache>/evals/``), so a warm run does not evaluate again. ``activations``: ``"memory"`` keeps
    the harvested activations in RAM, ``"disk"`` streams them from a store on disk (the same dictionaries; see
    :func:`~circuit_discovery.sae.training.train_saes_on_model`).
    """
    from circuit_discovery.sae.corpus import build_corpus, split_heldout
    from circuit_discovery.sae.evaluate import evaluate_sae

    if kind is None:
        kind = {"topk": "topk_transcoder", "jumprelu": "jumprelu_transcoder"}.get(architecture or "topk", "")
        extra: dict[str, Any] = {"architecture": architecture} if not kind else kind_settings(kind)
        kind = kind or f"{architecture}_transcoder"
    elif architecture is not None:
        raise InputError("give kind or architecture, not both")
    else:
        extra = {} if kind == "clt" else kind_settings(kind)
    t0 = time.perf_counter()
    corpus = build_corpus(model, n_sequences=n_sequences, cache_dir=corpus_cache_dir, text_files=list(text_files),
                          progress=progress)
    train_texts, heldout = split_heldout(corpus.texts, 0.1, seed=0)
    if kind == "clt":
        from circuit_discovery.sae.clt_training import train_clt_on_model

        return train_clt_on_model(model, train_texts, heldout, corpus, layers=layers, training_tokens=training_tokens,
                                  k=k, seed=seed, d_sae=clt_d_sae, cache_dir=cache_dir, evaluate=evaluate,
                                  eval_tokens=eval_tokens, progress=progress, t0=t0, activations=activations)
    cfgs = transcoder_configs(model.cfg.n_layers, layers, training_tokens=training_tokens, k=k, seed=seed, **extra)
    results = train_saes_on_model(model, train_texts, cfgs, corpus_id=corpus.corpus_id, cache_dir=cache_dir,
                                  progress=progress, activations=activations)
    tcs: dict[int, SparseAutoencoder] = {}
    trained: list[int] = []
    for c in cfgs:
        layer = int(c.hook_name.split(".")[1])
        r = results[c.key]
        if isinstance(r, TrainResult):
            trained.append(layer)
            r = r.sae
        tcs[layer] = r.eval()
    out = DictionarySet(transcoders=tcs, corpus_id=corpus.corpus_id, trained=trained, kind=kind,
                        settings={"kind": kind, "architecture": cfgs[0].architecture, "skip": cfgs[0].skip,
                                  "k": k, "training_tokens": training_tokens,
                                  "seed": seed, "corpus_tokens": corpus.n_tokens, "eval_tokens": eval_tokens,
                                  "sparsity_tokens": sparsity_tokens})
    if evaluate:
        for c in cfgs:
            layer = int(c.hook_name.split(".")[1])
            # metrics are a function of the transcoder (its cache key) and the held-out tokens: cached beside it
            eval_path = cached_sae_path(cache_dir, "evals") / (
                sae_cache_key(model.cfg.model_name, c.key, {"cfg": c.to_dict(), "eval_tokens": int(eval_tokens),
                                                            "sparsity_tokens": int(sparsity_tokens),
                                                            "version": _EVAL_VERSION}, corpus.corpus_id) + ".json")
            m = None
            if layer not in trained and eval_path.is_file():
                try:
                    m = read_json(eval_path)
                except (OSError, ValueError):
                    m = None
            if m is None:
                m = evaluate_sae(model, tcs[layer], c.hook_name, heldout, n_tokens=eval_tokens,
                                 hook_name_out=c.hook_name_out, sparsity_tokens=sparsity_tokens)
                m = {k2: float(v) for k2, v in m.items() if isinstance(v, (int, float))}
                atomic_write_json(eval_path, m)
            out.metrics[layer] = m
    out.seconds = time.perf_counter() - t0
    return out
