"""Predicted peak memory and time per stage of a run, from the model's shape alone (``frc estimate``).

Memory (float32, bytes): the process (Python, torch, transformers and this package imported:
:data:`BASE_PROCESS_GB`; a tiny test model adds :data:`TINY_BUILD_GB` for building it), the tokenizer
(:data:`TOKENIZER_BYTES_PER_TOKEN` per vocabulary entry, measured on Gemma 3's 262k-token tokenizer), the weights (4
bytes per parameter) and the working memory of the stage, from what it holds at once:

* ``known``: 64 prompts per batch, their last-position logits (3 copies: logits, float copy, comparison);
* ``attribution``: the exact ``resid_pre`` sweep, 32 patched runs per batch, the clean residual of every layer;
* ``causal_tracing``: 128 restored runs per batch with their last-position logits;
* ``circuits``, ``validation``: EAP, 32 prompts per batch, the gradients of 6 hooks per layer (the metric reads
  the answer tokens' logits only; refinement and validation run forwards only: less);
* ``dictionaries``: with the activations on disk (``sae_activations = "disk"``, the default) the finished
  transcoders, the training state (weights, gradients, two Adam moments) of those trained at once (at most
  :data:`~circuit_discovery.sae.training.TRAIN_GROUP_BYTES`, and at least one layer's), and the store's shard
  buffer while harvesting (measured on Gemma 3 270M, a cold run: 2.96 GB, predicted 2.49 GB); in memory
  (``"memory"``), the harvested activations of every layer (input and output, the built-in corpus of about 21k
  tokens) and every layer's training state;
* ``feature_circuits``: the transcoders and one graph's rows (128 feature nodes x sources).

The weights count in full: the cached weights are memory-mapped, and the known filter, the first stage, reads all
of them (its full-vocabulary unembedding). The prediction of each stage is the process peak while that stage runs
after the earlier ones (``peak_gb``); ``peak_gb`` of the run is the largest. Checked against measured peaks
within 25% (``tests/unit/test_estimate.py``: the tiny model, whose peak is mostly the process itself; integration:
Gemma 3 270M).

Time: the stage times of the measured default run of Gemma 3 270M (:data:`REFERENCE_SECONDS`, 1 thread on the
2-core development machine, ``benchmarks/results/pipeline_default*.json``) scaled by the ratio of floating-point
work per unit (a forward pass over a prompt: ``2 x (non-embedding parameters x prompt tokens + d_model x d_vocab)``
for the last position's unembedding) and by how the number of units grows with the model (layers for the patching
sweep, causal tracing and feature graphs; component nodes, layers x (heads + 1), for greedy refinement and
validation; layers x d_model^2 for transcoder training), and by the facts and relations asked for. It is a
first-order model: ``benchmarks/scale.py`` measures the per-fact costs on models of the real width
(``docs/scaling.md`` compares the two). No GPU time is predicted: nothing has been measured on a GPU.
"""
from __future__ import annotations

from typing import Any

from circuit_discovery.errors import ModelLoadError
from circuit_discovery.models.synthetic import SHAPES, Shape, shape_of

#: RSS of a process with this package, torch and transformers' model code imported (measured: 0.423 GB)
BASE_PROCESS_GB = 0.43
#: building a tiny test model in process (training its BPE tokenizer, random initialisation): measured +0.09 GB
TINY_BUILD_GB = 0.09
#: resident bytes of a loaded ``tokenizers`` BPE tokenizer per vocabulary entry (measured on Gemma 3's 262,144
#: entries: 0.32 GB)
TOKENIZER_BYTES_PER_TOKEN = 1230.0
#: tokens of a typical fact prompt, BOS included (the built-in relations with the Gemma tokenizer: 6-12)
PROMPT_TOKENS = 10
#: rows of the built-in transcoder corpus (model-sampled text plus the fact sentences; docs/sae.md)
CORPUS_TOKENS = 21_000
#: the built-in dataset: facts, relations of the default run, and the default run's per-relation settings
BUILTIN_FACTS = 994
DEFAULT_RELATIONS = 20

#: stage seconds of the default run of Gemma 3 270M (20 relations, 12 + 8 facts, 994 facts filtered): known,
#: attribution, causal tracing and feature circuits from the cold run on 2 idle threads
#: (pipeline_default_cold.json), circuits and validation from the refine run on 1 shared thread
#: (pipeline_default.json), dictionaries from the cold run
REFERENCE_SECONDS = {"known": 33.7, "attribution": 36.6, "causal_tracing": 71.3, "circuits": 3056.4,
                     "validation": 1079.6, "dictionaries": 759.1, "feature_circuits": 225.2, "hypotheses": 7.6,
                     "report": 45.4}
REFERENCE_MODEL = "gemma-3-270m"

STAGES = tuple(REFERENCE_SECONDS)

_SMOLLM2 = Shape("smollm2-135m", "LlamaConfig", n_layers=30, d_model=576, d_mlp=1536, n_heads=9, n_kv_heads=3,
                 d_head=64, d_vocab=49152, n_ctx=8192, tied=True)


def model_shape(model_name: str | None) -> Shape:
    """The shape of a model name: built-in, tiny test model, or a published shape (``gemma-2-2b``, ``gpt2-xl``)."""
    from circuit_discovery.models.loading import DEFAULT_MODEL, TINY_MODELS, tiny_config

    name = model_name or DEFAULT_MODEL
    if name == "smollm2-135m":
        return _SMOLLM2
    if name in TINY_MODELS:
        c: Any = tiny_config(name, vocab_size=512)
        if name == "tiny-gpt2":
            return Shape(name, "GPT2Config", c.n_layer, c.n_embd, 4 * c.n_embd, c.n_head, c.n_head,
                         c.n_embd // c.n_head, c.vocab_size, c.n_positions, tied=True)
        return Shape(name, type(c).__name__, c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                     c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size,
                     c.max_position_embeddings, tied=bool(c.tie_word_embeddings))
    try:
        return shape_of(name)
    except ModelLoadError:
        raise ModelLoadError(f"no shape is known for {name!r}: estimate takes a built-in model, a tiny test model "
                             f"or one of {', '.join(SHAPES)} (and their hub ids)") from None


def _gb(x: float) -> float:
    return x / 1e9


def working_gb(shape: Shape, stage: str, activations: str = "disk") -> float:
    """Working memory of one stage in GB (float32), as the module docstring lists it; ``activations``: where the
    transcoders' training activations are kept (``RunConfig.sae_activations``)."""
    d, V, L, P, f = shape.d_model, shape.d_vocab, shape.n_layers, PROMPT_TOKENS, shape.d_mlp
    act = P * (2 * f + 4 * d) * 4  # one prompt's activations inside one layer (MLP hidden, residuals)
    if stage == "known":
        return _gb(64 * V * 4 * 3 + 64 * act)
    if stage == "attribution":
        return _gb(32 * V * 4 * 3 + 32 * act + L * P * d * 4)
    if stage == "causal_tracing":
        return _gb(128 * V * 4 * 3 + 128 * act)
    if stage in ("circuits", "validation"):  # the metric reads the answer tokens' logits only
        return _gb(32 * L * 6 * P * d * 4 * 2 + 32 * act)
    tc = L * (2 * d * 4 * d + d * d + 5 * d) * 4  # per-layer skip transcoders, d_sae = 4 d_model
    if stage == "dictionaries":
        from circuit_discovery.sae.harvest import STORE_SHARD_BYTES
        from circuit_discovery.sae.training import TRAIN_GROUP_BYTES

        if activations == "memory":
            return _gb(CORPUS_TOKENS * L * 2 * d * 4 + 4 * tc)
        return _gb(tc + min(4 * tc, TRAIN_GROUP_BYTES + 4 * tc / L) + STORE_SHARD_BYTES)
    if stage == "feature_circuits":
        sources = L * P * (64 + 1) + P  # active features (k = 64 per token), errors, embeddings
        return _gb(tc + 2 * 128 * sources * 4 + 32 * act * L)
    return 0.0


def _fwd_flops(shape: Shape) -> float:
    return 2.0 * (shape.non_embedding_params() * PROMPT_TOKENS + shape.d_model * shape.d_vocab)


def _units(shape: Shape, stage: str) -> float:
    """How the work of a stage grows with the model, per prompt (see the module docstring)."""
    if stage in ("attribution", "causal_tracing", "feature_circuits"):
        return shape.n_layers * _fwd_flops(shape)
    if stage in ("circuits", "validation"):
        return shape.n_layers * (shape.n_heads + 1) * _fwd_flops(shape)
    if stage == "dictionaries":
        return shape.n_layers * shape.d_model ** 2 + _fwd_flops(shape) / CORPUS_TOKENS
    if stage == "known":
        return _fwd_flops(shape)
    return 1.0


def estimate(model_name: str | None, n_facts: int | None = None, device: str = "cpu", *,
             n_relations: int | None = None) -> dict:
    """Predicted peak memory (GB) and time (s) per stage of a default run of ``model_name`` on ``device``.

    ``n_facts``: facts given to the known filter (default: the built-in dataset, 994); ``n_relations``: relations
    that reach the per-relation stages (default: 20, the default run; with ``n_facts`` < 20 x 20 it is capped at
    ``n_facts // 20``, at least 1). Returns ``{"model", "device", "n_facts", "n_relations", "params",
    "weights_gb", "stages": {stage: {"peak_gb", "working_gb", "seconds"}}, "peak_gb", "total_seconds", "notes"}``;
    ``seconds`` are None on a GPU (never measured there). Raises ``ModelLoadError`` for a model of unknown shape.
    """
    shape = model_shape(model_name)
    ref = shape_of(REFERENCE_MODEL)
    facts = BUILTIN_FACTS if n_facts is None else int(n_facts)
    if facts < 1:
        raise ModelLoadError(f"n_facts must be >= 1, got {n_facts}")
    rels = DEFAULT_RELATIONS if n_relations is None else int(n_relations)
    if n_facts is not None and n_relations is None:
        rels = max(1, min(DEFAULT_RELATIONS, facts // 20))
    gpu = str(device).startswith("cuda")
    weights = _gb(shape.params() * 4)
    from circuit_discovery.models.loading import TINY_MODELS

    base = _gb(TOKENIZER_BYTES_PER_TOKEN * shape.d_vocab) + (0.5 if gpu else BASE_PROCESS_GB)
    if shape.name in TINY_MODELS:
        base += TINY_BUILD_GB
    stages: dict[str, dict[str, Any]] = {}
    for s in STAGES:
        work = working_gb(shape, s)
        scale = facts / BUILTIN_FACTS if s == "known" else rels / DEFAULT_RELATIONS
        secs = None if gpu else REFERENCE_SECONDS[s] * scale * _units(shape, s) / _units(ref, s)
        stages[s] = {"working_gb": round(work, 3), "peak_gb": round(base + weights + work, 3),
                     "seconds": None if secs is None else round(secs, 1)}
    total = None if gpu else round(sum(v["seconds"] for v in stages.values()), 1)
    return {"model": shape.name, "device": str(device), "n_facts": facts, "n_relations": rels,
            "params": shape.params(), "weights_gb": round(weights, 3), "stages": stages,
            "peak_gb": round(max(v["peak_gb"] for v in stages.values()), 3), "total_seconds": total,
            "total_hours": None if total is None else round(total / 3600, 2),
            "notes": ("float32; memory of the GPU on cuda (plus about 0.5 GB of CUDA context), of the process on "
                      "cpu; time: first-order scaling of the Gemma 3 270M default run on 1 CPU thread"
                      + (" (no GPU time: never measured on a GPU)" if gpu else ""))}


def format_estimate(est: dict) -> str:
    """A few lines for ``frc estimate``."""
    lines = [f"{est['model']} on {est['device']}: {est['params'] / 1e6:,.0f}M parameters, weights "
             f"{est['weights_gb']:.2f} GB; {est['n_facts']} facts, {est['n_relations']} relations"]
    for s, v in est["stages"].items():
        t = "" if v["seconds"] is None else f"  {v['seconds']:>9,.0f} s"
        lines.append(f"  {s:<17} peak {v['peak_gb']:6.2f} GB{t}")
    tot = "" if est["total_seconds"] is None else f", total {est['total_seconds'] / 3600:.1f} h"
    lines.append(f"peak {est['peak_gb']:.2f} GB{tot}")
    return "\n".join(lines)
