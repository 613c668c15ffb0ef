"""Load published dictionaries (SAEs and transcoders) from local files or the local Hugging Face cache.

::

    from circuit_discovery.sae import load_dictionary, load_transcoder_set
    d = load_dictionary("path/to/saelens_folder")          # cfg.json + sae_weights.safetensors
    d = load_dictionary("google/gemma-scope-2-270m-pt/transcoder_all/layer_5_width_16k_l0_small_affine")
    f = d.encode(x); x_hat = d.decode(f); out = d(x)       # out.recon (skip term included), out.feats
    d.d_in, d.d_sae, d.architecture, d.hook_in, d.hook_out, d.skip
    ts = load_transcoder_set("google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine")  # TranscoderSet

Formats (the file layouts and what each reader does are in :mod:`circuit_discovery.sae.pretrained_formats`):

* **SAELens folders** (``cfg.json`` + ``sae_weights.safetensors``), v6 and pre-6 configs: ``standard``, ``gated``,
  ``jumprelu``, ``topk`` (``rescale_acts_by_decoder_norm``), ``transcoder``, ``jumprelu_transcoder``,
  ``skip_transcoder``, ``jumprelu_skip_transcoder``; ``apply_b_dec_to_input``; ``normalize_activations:
  expected_average_only_in`` folded with ``norm_scaling_factor``; ``reshape_activations: hook_z`` and
  ``hook_head_index`` on ``attn.hook_z``. Every folder written by :func:`circuit_discovery.sae.save_sae`.
* **Gemma Scope 1** ``params.npz``; **Gemma Scope 2** ``params.safetensors`` + ``config.json`` (SAEs, transcoders
  with and without ``affine_skip_connection``); Gemma Scope 2 CLTs through :func:`load_transcoder_set`.
* **circuit-tracer** per-layer files ``layer_{i}.safetensors`` (ReLU, JumpReLU, TopK without ReLU, ``W_skip``);
  its sets and cross-layer format through :func:`load_transcoder_set`.
* **EleutherAI sparsify** hookpoint folders (``cfg.json`` + ``sae.safetensors``).
* **dictionary_learning** ``ae.pt`` + ``config.json``, read with ``torch.load(weights_only=True)`` only.

A config value that changes the computation is implemented or refused with a :class:`DictionaryFormatError`
naming it; tensors the format does not define are refused; nothing is unpickled; nothing is downloaded unless
``allow_download=True`` (and the machine is online). Hook names are returned in this project's names
(``HookedModel.hook_names()``; :mod:`circuit_discovery.sae.pretrained_hooks` says how each vocabulary maps); a
hook with no exact counterpart is an error, and a file that names no hook at all gives ``hook_in = hook_out =
None``.
"""
from __future__ import annotations

import os

import torch

from circuit_discovery.sae.pretrained_base import (
    DictionaryFormatError,
    DictionaryNotFoundError,
    PretrainedDictionary,
    torch_dtype,
)
from circuit_discovery.sae.pretrained_formats import resolve_source
from circuit_discovery.sae.pretrained_hooks import map_hf_hook, map_hook_name
from circuit_discovery.sae.pretrained_sets import load_one, load_transcoder_set
from circuit_discovery.sae.transcoder_set import CrossLayerTranscoder, DictionaryMismatchError, TranscoderSet

__all__ = [
    "CrossLayerTranscoder",
    "DictionaryFormatError",
    "DictionaryMismatchError",
    "DictionaryNotFoundError",
    "PretrainedDictionary",
    "TranscoderSet",
    "load_dictionary",
    "load_transcoder_set",
    "map_hf_hook",
    "map_hook_name",
]


def load_dictionary(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    allow_download: bool = False,
    model: str | None = None,
) -> PretrainedDictionary:
    """Load one published SAE or transcoder from a local folder/file or a Hugging Face id.

    ``source``: a local folder or file in one of the formats above, or ``owner/repo[/path inside][@revision]``
    (also ``hf://owner/repo/path?revision=...``), read from the local Hugging Face cache (``local_files_only``);
    only with ``allow_download=True`` and online is a missing file downloaded. ``model``: the model name, needed
    only for files that name hooks by Hugging Face module path without saying which model (sparsify outside its
    run folder). ``device`` defaults to CPU; ``dtype`` to the config's dtype, else the stored tensors' dtype.

    Raises :class:`DictionaryNotFoundError` (missing files, not cached) or :class:`DictionaryFormatError`
    (an unsupported format, field, tensor or hook), each with a one-line message.
    """
    dt = torch_dtype(dtype)
    path = resolve_source(source, allow_download=allow_download)
    dic = load_one(path, dt, model)
    return dic.to(device if device is not None else "cpu")
