"""Text corpora for SAE training that need no download.

The built-in corpus (:func:`build_corpus` with defaults) has two parts:

* text *sampled from the model itself*: ``n_sequences`` sequences of up to ``max_new_tokens`` tokens,
  ancestral sampling from BOS (temperature 1, top-k 256 then top-p 0.95, fixed seed), batched with a KV
  cache and the unembedding only at the last position; cached as JSON under
  ``<cache>/sae_corpus/<model>/sampled_<hash>.json`` keyed by model name and every sampling setting.
  Sampled text follows the model's own distribution (for Gemma 3 270M: web text, code, several
  languages), which is what its activations look like in use;
* the built-in facts (:func:`circuit_discovery.facts.load_builtin`) as completed sentences
  (``prompt + answer + "."``). Their prompts are prefixes of these sentences, so a causal model sees
  the prompt activations inside them; adding the bare prompts again would only duplicate rows.

Default size (Gemma 3 270M): 256 x 64 sampled tokens (<= 16,384; EOS cuts a few short) + 537 fact
sentences (~6,000 tokens). Measured cost and counts are in ``docs/sae.md``; the cache file records
``n_tokens``, ``seconds`` and ``tokens_per_s``.

Other sources: :func:`load_text_files` (UTF-8 files, one document per blank-line-separated paragraph)
and :func:`load_hf_dataset` (a Hugging Face ``datasets`` name; needs internet and the ``datasets``
package; present but not exercised by the tests).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from circuit_discovery.errors import InputError
from circuit_discovery.io import atomic_write_json, read_json
from circuit_discovery.models.arch import get_module

__all__ = [
    "Corpus",
    "DEFAULT_N_SEQUENCES",
    "DEFAULT_MAX_NEW_TOKENS",
    "sample_token_batch",
    "model_sampled_texts",
    "sampled_corpus_path",
    "builtin_fact_sentences",
    "load_text_files",
    "load_hf_dataset",
    "build_corpus",
    "split_heldout",
]

DEFAULT_N_SEQUENCES = 256
DEFAULT_MAX_NEW_TOKENS = 64
_SAMPLER_VERSION = 2  # bump when the sampling code changes what it produces


@dataclass
class Corpus:
    texts: list[str]
    corpus_id: str  # stable hash of the sources and settings; part of SAE cache keys
    sources: list[str] = field(default_factory=list)
    n_tokens: int | None = None  # tokens of the texts (without BOS), when counted


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("CIRCUIT_DISCOVERY_CACHE") or os.path.join(Path.home(), ".cache", "circuit_discovery")
    return Path(root)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _sample_next(logits: Tensor, gen: torch.Generator, temperature: float, top_k: int, top_p: float) -> Tensor:
    """One token per row from ``logits`` [batch, vocab]: temperature, then top-k, then top-p (nucleus) -> [batch].

    Top-k first keeps the nucleus search to ``top_k`` candidates instead of sorting the whole vocabulary
    (262k tokens for Gemma); ``top_k=0`` disables it.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)  # sorted, descending
    else:
        vals, idx = logits.sort(dim=-1, descending=True)
    probs = vals.softmax(-1)
    if top_p < 1.0:
        before = probs.cumsum(-1) - probs  # mass of strictly more probable candidates
        probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs, 1, generator=gen)  # renormalises
    return idx.gather(-1, choice).squeeze(-1)


def _base_with_cache(model, ids: Tensor, cache):
    """Run the base transformer on ``ids`` [batch, new] with a KV cache; -> (last hidden [batch, d], cache)."""
    base = get_module(model.hf_model, model.spec.base)
    kw = {"use_cache": True}
    if cache is not None:
        kw["cache" if "cache" in _forward_params(base) else "past_key_values"] = cache
    out = base(input_ids=ids, **kw)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.last_hidden_state[:, -1], new_cache


def _forward_params(module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


@torch.no_grad()
def sample_token_batch(
    model,
    n: int,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int = 256,
    top_p: float = 0.95,
) -> list[list[int]]:
    """``n`` sequences sampled from ``model`` starting at BOS, as token ids (BOS and everything from EOS on dropped).

    One batched prefill + ``max_new_tokens - 1`` single-token steps with a KV cache; the unembedding runs
    only at the last position (``model.unembed`` of the final-normed hidden state). Stops early when every
    row has produced EOS.
    """
    bos = model.cfg.bos_token_id
    if bos is None:
        raise InputError(f"{model.cfg.model_name} has no BOS token to sample from; pass text files instead")
    eos = getattr(model.tokenizer, "eos_token_id", None)
    ids = torch.full((n, 1), bos, dtype=torch.long, device=model.device)
    h, cache = _base_with_cache(model, ids, None)
    out = torch.empty((n, max_new_tokens), dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    t = 0
    for t in range(max_new_tokens):
        nxt = _sample_next(model.unembed(h), generator, temperature, top_k, top_p).cpu()
        out[:, t] = nxt
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
        if t + 1 < max_new_tokens:
            h, cache = _base_with_cache(model, nxt[:, None].to(model.device), cache)
    rows = []
    for r in out[:, : t + 1].tolist():
        if eos is not None and eos in r:
            r = r[: r.index(eos)]
        rows.append(r)
    return rows


@torch.no_grad()
def model_sampled_texts(
    model,
    n_sequences: int = DEFAULT_N_SEQUENCES,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    batch_size: int = 128,
    temperature: float = 1.0,
    top_p: float = 0.95,
    top_k: int = 256,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[str]:
    """``n_sequences`` texts sampled from ``model`` starting at BOS; cached by model and settings.

    Batched ancestral sampling with a KV cache (:func:`sample_token_batch`), ``batch_size`` sequences at
    once, each batch seeded from ``seed`` and its index (so results do not depend on where a run resumed).
    Finished batches are saved to the cache file as they complete, so an interrupted run resumes, and a
    larger run starts from the whole batches of a smaller cached one with the same other settings.
    The cache file also records ``n_tokens`` (sampled tokens kept) and ``seconds`` (generation time).
    """
    if n_sequences <= 0 or max_new_tokens <= 0 or batch_size <= 0:
        raise InputError("n_sequences, max_new_tokens and batch_size must be positive")
    if not 0 < top_p <= 1 or temperature <= 0 or top_k < 0:
        raise InputError("need 0 < top_p <= 1, temperature > 0 and top_k >= 0")
    settings = dict(
        model=model.cfg.model_name, n_sequences=n_sequences, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size, temperature=temperature, top_p=top_p, top_k=top_k, sampler=_SAMPLER_VERSION,
    )
    path = sampled_corpus_path(model.cfg.model_name, settings, cache_dir)
    done: list[str] = []
    n_tok, seconds = 0, 0.0
    if path.is_file():
        data = read_json(path)
        if data.get("settings") == settings:
            done = list(data["texts"])
            n_tok, seconds = int(data.get("n_tokens", 0)), float(data.get("seconds", 0.0))
            if data.get("complete"):
                return done
    if not done:
        done, n_tok, seconds = _reuse_smaller_run(path.parent, settings, model.tokenizer)
        if len(done) >= n_sequences:  # all taken from a larger run: cache under these settings too
            _save_sampled(path, settings, done, n_tok, seconds, complete=True)
            return done
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_sequences, initial=len(done), desc="sample corpus", unit="seq", dynamic_ncols=True)
    try:
        b = len(done) // batch_size
        while len(done) < n_sequences:
            n = min(batch_size, n_sequences - len(done))
            gen = torch.Generator().manual_seed(seed * 100_003 + b)
            t0 = time.perf_counter()
            rows = sample_token_batch(model, n, max_new_tokens, gen, temperature, top_k, top_p)
            seconds += time.perf_counter() - t0
            for r in rows:
                done.append(model.tokenizer.decode(r, skip_special_tokens=True).strip())
                n_tok += len(r)
            b += 1
            _save_sampled(path, settings, done, n_tok, seconds, complete=len(done) >= n_sequences)
            if bar is not None:
                bar.update(n)
                bar.set_postfix_str(f"{n_tok / max(seconds, 1e-9):.0f} tok/s")
    finally:
        if bar is not None:
            bar.close()
    return done


def _save_sampled(path: Path, settings: dict, texts: list[str], n_tok: int, seconds: float, complete: bool) -> None:
    atomic_write_json(path, {"settings": settings, "texts": texts, "complete": complete, "n_tokens": n_tok,
                             "seconds": seconds, "tokens_per_s": n_tok / seconds if seconds > 0 else None})


def _reuse_smaller_run(folder: Path, settings: dict, tokenizer) -> tuple[list[str], int, float]:
    """Whole batches of the largest cached run that differs from ``settings`` only in ``n_sequences``.

    Batch ``b`` is always sampled from the generator seeded with ``seed`` and ``b``, so those texts are exactly
    what this run would sample first; a larger corpus then only samples the rest. A smaller run's last batch
    may be partial (other random draws), so it is not reused. -> (texts, their token count, seconds spent).
    """
    best: dict | None = None
    for f in folder.glob("sampled_*.json") if folder.is_dir() else []:
        try:
            data = read_json(f)
        except (OSError, ValueError):
            continue
        other = data.get("settings") if isinstance(data, dict) else None
        if not isinstance(other, dict) or {**other, "n_sequences": settings["n_sequences"]} != settings:
            continue
        if best is None or len(data.get("texts", [])) > len(best["texts"]):
            best = data
    if best is None:
        return [], 0, 0.0
    bs = settings["batch_size"]
    n = min(len(best["texts"]), settings["n_sequences"]) // bs * bs
    texts = list(best["texts"][:n])
    if not texts:
        return [], 0, 0.0
    n_tok = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    seconds = float(best.get("seconds", 0.0)) * n / max(len(best["texts"]), 1)
    return texts, n_tok, seconds


def sampled_corpus_path(model_name: str, settings: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of a model-sampled corpus: ``<cache>/sae_corpus/<model>/sampled_<hash of settings>.json``."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_root(cache_dir) / "sae_corpus" / _safe(model_name) / f"sampled_{key}.json"


def load_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Documents from UTF-8 text files, split at blank lines."""
    texts: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"corpus text file {p} does not exist")
        raw = p.read_text(encoding="utf-8")
        texts += [t.strip() for t in raw.split("\n\n") if t.strip()]
    return texts


def load_hf_dataset(
    name: str, split: str = "train", text_column: str = "text", max_documents: int = 10_000, config: str | None = None
) -> list[str]:  # pragma: no cover - needs internet
    """Up to ``max_documents`` texts of a Hugging Face dataset, streamed (needs internet and ``datasets``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_dataset needs the 'datasets' package: pip install datasets") from e
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    out = []
    for row in ds:
        t = row.get(text_column)
        if t:
            out.append(t)
        if len(out) >= max_documents:
            break
    return out


def builtin_fact_sentences() -> list[str]:
    """The corpus's fact sentences ``prompt + answer + "."``: a fixed list of 537 (``sae/data/fact_sentences.json``),
    so that facts added to the evaluation dataset neither change the cached dictionaries nor enter their training
    text."""
    import json

    data = json.loads((Path(__file__).parent / "data" / "fact_sentences.json").read_text(encoding="utf-8"))
    return list(dict.fromkeys(data["sentences"]))


def build_corpus(
    model,
    fact_prompts: Sequence[str] = (),
    n_sequences: int | None = DEFAULT_N_SEQUENCES,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    builtin_facts: bool = True,
    text_files: Sequence[str | os.PathLike] = (),
    hf_dataset: str | None = None,
    hf_max_documents: int = 10_000,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    progress: bool = False,
    count_tokens: bool = True,
) -> Corpus:
    """Model-sampled text (``n_sequences`` > 0; ``None``: the built-in size) + built-in fact sentences
    (``builtin_facts``) + ``fact_prompts`` + ``text_files`` (+ ``hf_dataset``), in that order. ``corpus_id`` hashes
    every text."""
    texts: list[str] = []
    sources: list[str] = []
    h = hashlib.sha256()
    if n_sequences is None:  # the built-in size
        n_sequences = DEFAULT_N_SEQUENCES
    if n_sequences > 0:
        texts += model_sampled_texts(model, n_sequences, max_new_tokens, seed, batch_size=batch_size,
                                     cache_dir=cache_dir, progress=progress)
        sources.append(f"sampled:{model.cfg.model_name}:n={n_sequences}:len={max_new_tokens}:seed={seed}")
    if builtin_facts:
        facts = builtin_fact_sentences()
        texts += facts
        sources.append(f"builtin_fact_sentences:{len(facts)}")
    for p in text_files:
        docs = load_text_files([p])
        texts += docs
        sources.append(f"file:{Path(p).name}")
    if hf_dataset:
        texts += load_hf_dataset(hf_dataset, max_documents=hf_max_documents)
        sources.append(f"hf:{hf_dataset}:{hf_max_documents}")
    prompts = [p for p in fact_prompts if p]
    texts += prompts
    if prompts:
        sources.append(f"prompts:{len(prompts)}")
    texts = [t for t in texts if t]
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    if not texts:
        raise InputError("empty corpus: give n_sequences > 0, builtin facts, fact prompts, text files or a dataset")
    n_tok = None
    if count_tokens:
        n_tok = sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return Corpus(texts=texts, corpus_id=h.hexdigest()[:16], sources=sources, n_tokens=n_tok)


def split_heldout(texts: Sequence[str], heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split of documents."""
    if not 0 < heldout_fraction < 1:
        raise InputError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(texts), generator=g).tolist()
    n_h = max(1, int(round(heldout_fraction * len(texts))))
    held = set(perm[:n_h])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]
