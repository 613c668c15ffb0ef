"""Loading a Hugging Face folder written by the model cache, without ``from_pretrained``'s detours.

``AutoTokenizer.from_pretrained`` rebuilds a Gemma tokenizer from the vocabulary and merges of ``tokenizer.json``
parsed by Python's ``json`` (about 3 s for Gemma's 262k tokens and 515k merges); :func:`load_tokenizer` hands the
file to the Rust ``tokenizers`` parser instead (about 1 s, in a thread beside the model's loading) and gives the
same backend (the tests compare the two).
``AutoModelForCausalLM.from_pretrained`` resolves the class through the auto mappings, random-initialises what the
checkpoint lacks (Gemma's tied embedding, 168M values, about 1 s) and copies every tensor; :func:`load_model_weights`
builds the class named in ``config.json`` with initialisation switched off, assigns the tensors of
``model.safetensors`` memory-mapped (private, copy-on-write: an in-place edit never reaches the file) and ties the
embeddings as ``from_pretrained`` does. Anything outside that simple case (sharded or ``.bin`` weights, remote
code, keys that do not match) goes through ``from_pretrained``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# tokenizer_config.json keys that name the class or the loading context rather than the tokenizer's behaviour
_NOT_INIT_KWARGS = ("tokenizer_class", "auto_map", "processor_class")


def load_tokenizer(folder: str | Path, backend=None):
    """The tokenizer of ``folder`` (``tokenizer.json`` + ``tokenizer_config.json``) as a ``TokenizersBackend``
    (transformers' fast tokenizer) with the special tokens, padding side and input names of the class that
    ``tokenizer_config.json`` names. ``backend``: the ``tokenizers.Tokenizer`` of ``tokenizer.json`` when already
    parsed (:func:`load_folder` parses it beside the model). Falls back to ``AutoTokenizer.from_pretrained`` where
    the folder has no ``tokenizer.json`` or names a class that is not a ``tokenizers``-backed one."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    folder = Path(folder)
    cfg_path, tok_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (cfg_path.is_file() and tok_path.is_file()):
        return _auto_tokenizer(folder)
    cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    cls = _tokenizer_class(cfg.get("tokenizer_class"))
    if cls is None or not issubclass(cls, TokenizersBackend) or cfg.get("auto_map"):
        return _auto_tokenizer(folder)
    kwargs = {k: v for k, v in cfg.items() if k not in _NOT_INIT_KWARGS}
    kwargs.setdefault("padding_side", cls.padding_side)
    kwargs.setdefault("truncation_side", cls.truncation_side)
    kwargs.setdefault("model_input_names", list(cls.model_input_names))
    template = folder / "chat_template.jinja"
    if template.is_file() and "chat_template" not in kwargs:
        kwargs["chat_template"] = template.read_text(encoding="utf-8")
    if backend is None:
        return TokenizersBackend(tokenizer_file=str(tok_path), name_or_path=str(folder), **kwargs)
    # the subclass pattern of transformers' own tokenizers (GemmaTokenizer sets ``_tokenizer``, then calls
    # ``TokenizersBackend.__init__``), without the deep copy that ``tokenizer_object=`` makes
    tok = TokenizersBackend.__new__(TokenizersBackend)
    tok._tokenizer = backend
    TokenizersBackend.__init__(tok, name_or_path=str(folder), **kwargs)
    return tok


def _tokenizer_class(name: str | None):
    if not name:
        return None
    import transformers

    return getattr(transformers, name, None)


def _auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    log.debug("tokenizer of %s: AutoTokenizer.from_pretrained", folder)
    return AutoTokenizer.from_pretrained(folder)


def load_model_weights(folder: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of ``folder`` (``config.json`` + one ``model.safetensors``), weights memory-mapped, in eval
    mode and ``dtype``. Falls back to ``AutoModelForCausalLM.from_pretrained`` outside the simple case."""
    folder = Path(folder)
    weights = folder / "model.safetensors"
    cfg: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    cls = _model_class(archs[0]) if len(archs) == 1 and not cfg.get("auto_map") else None
    if cls is None or not weights.is_file():
        return _auto_model(folder, dtype)
    from safetensors.torch import load_file
    from transformers.initialization import no_init_weights

    config = cls.config_class.from_pretrained(folder)
    config.name_or_path = str(folder)  # as from_pretrained records it
    with no_init_weights():
        model = cls(config)
    state = load_file(str(weights))
    res = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights(missing_keys=set(res.missing_keys))
    loaded = {t.untyped_storage().data_ptr() for t in state.values()}
    params = dict(model.named_parameters(remove_duplicate=False))
    stray = [n for n, p in params.items() if p.untyped_storage().data_ptr() not in loaded]
    if res.unexpected_keys or stray:  # a checkpoint this shortcut does not cover: the standard path
        log.info("fast load of %s does not cover %s; using from_pretrained",
                 folder, (res.unexpected_keys or stray)[:3])
        return _auto_model(folder, dtype)
    model.eval()
    return model.to(dtype=dtype)


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) and hasattr(cls, "config_class") else None


def _auto_model(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    log.debug("model of %s: AutoModelForCausalLM.from_pretrained", folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def load_folder(folder: str | Path, dtype: torch.dtype):
    """``(model, tokenizer)`` of a cache folder by the fast path (:func:`load_model_weights`,
    :func:`load_tokenizer`). ``tokenizer.json`` is parsed in a worker thread while the main thread imports the
    model code and maps the weights: the Rust parser releases the GIL, so on two cores the two overlap (an error of
    the parser is raised here, by ``Future.result``)."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenizers import Tokenizer

    folder = Path(folder)
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        return load_model_weights(folder, dtype), load_tokenizer(folder)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frc-tokenizer") as pool:
        parsed = pool.submit(Tokenizer.from_file, str(tok_json))
        model = load_model_weights(folder, dtype)
        backend = parsed.result()
    return model, load_tokenizer(folder, backend=backend)
