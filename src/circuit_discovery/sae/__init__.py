"""Sparse autoencoders and transcoders: architectures, harvesting, training, evaluation, SAELens I/O, labels.

Typical use::

    from circuit_discovery.sae import SAETrainConfig, build_corpus, evaluate_sae, split_heldout, train_saes_on_model
    corpus = build_corpus(model)                      # built-in: model-sampled text + fact sentences (cached)
    train, held = split_heldout(corpus.texts, 0.1)
    results = train_saes_on_model(model, train, [SAETrainConfig("blocks.6.hook_resid_post")],
                                  corpus_id=corpus.corpus_id)
    sae = results["blocks.6.hook_resid_post"].sae
    metrics = evaluate_sae(model, sae, "blocks.6.hook_resid_post", held)
"""
from circuit_discovery.sae.activation_store import ActivationStore, ActivationStoreError
from circuit_discovery.sae.architectures import (
    SAE_REGISTRY,
    JumpReLUSAE,
    SAEConfig,
    SAEForwardOutput,
    SparseAutoencoder,
    StandardSAE,
    TopKSAE,
    create_sae,
    geometric_median,
    register_sae,
)
from circuit_discovery.sae.clt_training import CLTTrainConfig, evaluate_clt, load_clt, save_clt, train_clt
from circuit_discovery.sae.corpus import (
    Corpus,
    build_corpus,
    builtin_fact_sentences,
    load_hf_dataset,
    load_text_files,
    model_sampled_texts,
    sample_token_batch,
    split_heldout,
)
from circuit_discovery.sae.dictionaries import SAE_KINDS, DictionarySet, train_transcoders
from circuit_discovery.sae.evaluate import (
    ce_loss_score,
    cossim,
    dead_fraction,
    evaluate_sae,
    explained_variance,
    kl_div_score,
    l0,
    mse,
    plot_layer_metrics,
    reconstruction_metrics,
)
from circuit_discovery.sae.harvest import collect_hook_activations, harvest_activations, stream_activations
from circuit_discovery.sae.io import (
    load_cached_sae,
    load_sae,
    sae_cache_key,
    save_cached_sae,
    save_sae,
)
from circuit_discovery.sae.labels import (
    FeatureLabel,
    auto_label,
    feature_logit_effects,
    label_features,
    top_activating_contexts,
)
from circuit_discovery.sae.pretrained import (
    DictionaryFormatError,
    DictionaryNotFoundError,
    PretrainedDictionary,
    load_dictionary,
    load_transcoder_set,
    map_hf_hook,
    map_hook_name,
)
from circuit_discovery.sae.training import SAETrainConfig, TrainResult, train_saes, train_saes_on_model
from circuit_discovery.sae.transcoder_set import CrossLayerTranscoder, DictionaryMismatchError, TranscoderSet

__all__ = [
    "ActivationStore",
    "ActivationStoreError",
    "CLTTrainConfig",
    "evaluate_clt",
    "load_clt",
    "save_clt",
    "train_clt",
    "SAE_KINDS",
    "DictionarySet",
    "train_transcoders",
    "SAE_REGISTRY",
    "JumpReLUSAE",
    "SAEConfig",
    "SAEForwardOutput",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "create_sae",
    "geometric_median",
    "register_sae",
    "load_cached_sae",
    "load_sae",
    "sae_cache_key",
    "save_cached_sae",
    "save_sae",
    "DictionaryFormatError",
    "DictionaryNotFoundError",
    "PretrainedDictionary",
    "load_dictionary",
    "load_transcoder_set",
    "map_hf_hook",
    "map_hook_name",
    "CrossLayerTranscoder",
    "DictionaryMismatchError",
    "TranscoderSet",
    "SAETrainConfig",
    "TrainResult",
    "train_saes",
    "train_saes_on_model",
    "collect_hook_activations",
    "harvest_activations",
    "stream_activations",
    "ce_loss_score",
    "cossim",
    "dead_fraction",
    "evaluate_sae",
    "explained_variance",
    "kl_div_score",
    "l0",
    "mse",
    "reconstruction_metrics",
    "plot_layer_metrics",
    "Corpus",
    "build_corpus",
    "builtin_fact_sentences",
    "load_hf_dataset",
    "load_text_files",
    "model_sampled_texts",
    "sample_token_batch",
    "split_heldout",
    "FeatureLabel",
    "auto_label",
    "feature_logit_effects",
    "label_features",
    "top_activating_contexts",
]
