"""Streaming activation harvesting from a ``HookedModel``.

Several hooks are read in one forward pass; the pass stops right after the deepest requested hook
(nothing after it, and no unembedding, is computed). BOS and padding positions are dropped, so every
yielded row is a real token; rows of different hooks stay aligned (row ``i`` of every hook is the same
token), which transcoder training relies on.

>>> for batch in stream_activations(model, texts, ["blocks.6.hook_resid_post"], batch_size=4096):
...     batch["blocks.6.hook_resid_post"]      # Tensor[4096, d_model]
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from circuit_discovery.errors import InputError

__all__ = [
    "HOOK_ORDER",
    "hook_sort_key",
    "iter_token_batches",
    "collect_hook_activations",
    "stream_activations",
    "harvest_activations",
    "harvest_to_store",
    "token_mask",
]

# order in which hooks fire inside one block
HOOK_ORDER = (
    "hook_resid_pre",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_in",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_sort_key(name: str) -> tuple[int, int]:
    """(layer, position within the block) -- the order hooks fire in a forward pass."""
    if name in ("hook_embed", "hook_pos_embed"):
        return (-1, 0)
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in HOOK_ORDER:
        raise ValueError(f"cannot place hook {name!r} in the forward order")
    return (int(m.group(1)), HOOK_ORDER.index(m.group(2)))


class _StopForward(Exception):
    pass


def token_mask(model, tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """Bool [batch, pos]: True for real tokens, False for padding and BOS (row starts and packed separators)."""
    keep = attention_mask.bool().clone()
    bos = model.cfg.bos_token_id
    if bos is not None:
        keep &= tokens != bos
    return keep


def iter_token_batches(
    model, texts: Sequence[str], context_size: int = 128, batch_size: int = 8, pack: bool = True
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(tokens [b, pos], attention_mask [b, pos])`` rows of at most ``context_size`` tokens, each starting
    with BOS.

    ``pack=True`` (SAELens-style packing): the texts form one token stream, documents separated by a BOS
    token, cut into full rows of ``context_size`` (a new BOS starts each row); only the last row can be
    short (right-padded). BOS positions -- row starts and separators -- are dropped by :func:`token_mask`.
    ``pack=False``: one text per row (texts longer than a row continue in further rows, each with its own
    BOS), padded to the longest row of the batch.
    """
    if context_size < 2:
        raise InputError(f"context_size must be >= 2, got {context_size}")
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    bos = model.cfg.bos_token_id
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    start = [bos] if bos is not None else []
    rows: list[list[int]] = []

    def flush(rows):
        n = max(len(r) for r in rows)
        toks = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            toks[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return toks.to(model.device), mask.to(model.device)

    cur: list[int] = list(start)
    for text in texts:
        if not text:
            continue
        ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            continue
        if pack:
            if len(cur) > len(start) and bos is not None:
                ids = [bos] + ids  # document separator
            while ids:
                room = context_size - len(cur)
                cur += ids[:room]
                ids = ids[room:]
                if len(cur) == context_size:
                    rows.append(cur)
                    cur = list(start)
                    if ids and bos is not None and ids[0] == bos:
                        ids = ids[1:]  # a separator right at a row start would duplicate the row's BOS
                if len(rows) == batch_size:
                    yield flush(rows)
                    rows = []
        else:
            body = context_size - len(start)
            for s in range(0, len(ids), body):
                rows.append(list(start) + ids[s : s + body])
                if len(rows) == batch_size:
                    yield flush(rows)
                    rows = []
    if pack and len(cur) > len(start):
        rows.append(cur)
    if rows:
        yield flush(rows)


def collect_hook_activations(
    model, tokens: Tensor, attention_mask: Tensor, hook_names: Sequence[str]
) -> dict[str, Tensor]:
    """Activations [batch, pos, ...] at ``hook_names`` from one forward pass that stops after the deepest hook."""
    names = list(dict.fromkeys(hook_names))
    for n in names:
        model.check_hook_name(n)
    last = max(names, key=hook_sort_key)
    cache: dict[str, Tensor] = {}

    def save(x: Tensor, name: str):
        cache[name] = x.detach()
        if len(cache) == len(names) and name == last:
            raise _StopForward

    with torch.no_grad():
        try:
            with model.hooks([(n, save) for n in names]):
                model.final_hidden(tokens, attention_mask)
        except _StopForward:
            pass
    missing = [n for n in names if n not in cache]
    if missing:  # unexpected order: fall back to a full pass
        _, cache = model.run_with_cache(tokens, names=names, attention_mask=attention_mask, return_logits=False)
    return cache


def _rows(model, texts, hook_names, context_size, model_batch_size) -> Iterator[dict[str, Tensor]]:
    for tokens, mask in iter_token_batches(model, texts, context_size, model_batch_size):
        acts = collect_hook_activations(model, tokens, mask, hook_names)
        keep = token_mask(model, tokens, mask)
        out = {}
        for h in hook_names:
            a = acts[h]
            a = a.reshape(*a.shape[:2], -1)  # attn.hook_z [b, pos, head, d_head] -> [b, pos, head*d_head]
            out[h] = a[keep].float().cpu()
        if keep.any():
            yield out


def stream_activations(
    model,
    texts: Sequence[str],
    hook_names: Sequence[str],
    batch_size: int = 4096,
    context_size: int = 128,
    model_batch_size: int = 8,
    buffer_tokens: int = 65_536,
    seed: int = 0,
    max_tokens: int | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{hook: Tensor[batch_size, d]}`` shuffled through a buffer of at most ``buffer_tokens`` rows.

    Memory is bounded by ``buffer_tokens * sum(d) * 4`` bytes. When the buffer is full it is shuffled
    (one permutation shared by all hooks) and half of it is yielded. ``max_tokens`` caps the tokens read.
    Deterministic for a fixed ``seed`` and input.
    """
    if batch_size <= 0 or buffer_tokens < batch_size:
        raise InputError(f"need 0 < batch_size <= buffer_tokens, got {batch_size}, {buffer_tokens}")
    hook_names = list(dict.fromkeys(hook_names))
    gen = torch.Generator().manual_seed(seed)
    buf: dict[str, list[Tensor]] = {h: [] for h in hook_names}
    n_buf, n_read = 0, 0

    def drain(keep: int) -> Iterator[dict[str, Tensor]]:
        nonlocal buf, n_buf
        cat = {h: torch.cat(buf[h]) for h in hook_names}
        perm = torch.randperm(n_buf, generator=gen)
        cat = {h: v[perm] for h, v in cat.items()}
        n_out = ((n_buf - keep) // batch_size) * batch_size
        for s in range(0, n_out, batch_size):
            yield {h: v[s : s + batch_size] for h, v in cat.items()}
        buf = {h: [v[n_out:]] for h, v in cat.items()}
        n_buf -= n_out

    for rows in _rows(model, texts, hook_names, context_size, model_batch_size):
        n = rows[hook_names[0]].shape[0]
        if max_tokens is not None and n_read + n > max_tokens:
            n = max_tokens - n_read
            rows = {h: v[:n] for h, v in rows.items()}
        for h in hook_names:
            buf[h].append(rows[h])
        n_buf += n
        n_read += n
        if n_buf >= buffer_tokens:
            yield from drain(buffer_tokens // 2)
        if max_tokens is not None and n_read >= max_tokens:
            break
    if n_buf:
        yield from drain(0)
        if n_buf and not drop_last:
            yield {h: torch.cat(v) for h, v in buf.items()}


def _harvest(model, texts, hook_names, max_tokens, context_size, model_batch_size, dtype, progress, sink) -> int:
    """Feed ``sink({hook: Tensor[rows, d]})`` the activations in corpus order, at most ``max_tokens`` rows;
    returns the number of rows (0 raises)."""
    n = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="harvest", unit="tok", dynamic_ncols=True)
    try:
        for rows in _rows(model, texts, hook_names, context_size, model_batch_size):
            k = rows[hook_names[0]].shape[0]
            if max_tokens is not None:
                k = min(k, max_tokens - n)
            sink({h: rows[h][:k].to(dtype) for h in hook_names})
            n += k
            if bar is not None:
                bar.update(k)
            if max_tokens is not None and n >= max_tokens:
                break
    finally:
        if bar is not None:
            bar.close()
    if n == 0:
        raise InputError("no tokens harvested: the texts are empty")
    return n


def harvest_activations(
    model,
    texts: Sequence[str],
    hook_names: Sequence[str],
    max_tokens: int | None = None,
    context_size: int = 128,
    model_batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, Tensor]:
    """All activations in corpus order: ``{hook: Tensor[n_tokens, d]}`` (BOS and padding excluded)."""
    hook_names = list(dict.fromkeys(hook_names))
    parts: dict[str, list[Tensor]] = {h: [] for h in hook_names}

    def keep(rows: dict[str, Tensor]) -> None:
        for h in hook_names:
            parts[h].append(rows[h])

    _harvest(model, texts, hook_names, max_tokens, context_size, model_batch_size, dtype, progress, keep)
    return {h: torch.cat(v) for h, v in parts.items()}


#: bytes of activations the disk store buffers before it writes a shard (all hooks together)
STORE_SHARD_BYTES = 64 * 2**20


def harvest_to_store(
    model,
    texts: Sequence[str],
    hook_names: Sequence[str],
    folder,
    max_tokens: int | None = None,
    context_size: int = 128,
    model_batch_size: int = 8,
    progress: bool = False,
):
    """The rows :func:`harvest_activations` returns, written to an
    :class:`~circuit_discovery.sae.activation_store.ActivationStore` at ``folder`` instead of kept in memory (float32,
    the same values and order); at most :data:`STORE_SHARD_BYTES` of rows are in memory at once. Returns the store,
    opened for reading. A folder holding an unfinished store (no manifest: a harvest that was stopped) is cleared
    first; a finished one is an error (open it instead)."""
    import shutil
    from pathlib import Path

    from circuit_discovery.sae.activation_store import MANIFEST, ActivationStore

    hook_names = list(dict.fromkeys(hook_names))
    folder = Path(folder)
    if folder.is_dir() and not (folder / MANIFEST).exists():
        shutil.rmtree(folder)
    box: dict[str, ActivationStore] = {}

    def write(rows: dict[str, Tensor]) -> None:
        if not box:  # the widths are known from the first rows
            widths = {h: int(rows[h].shape[-1]) for h in hook_names}
            box["store"] = ActivationStore.create(folder, widths,
                                                  shard_rows=max(1, STORE_SHARD_BYTES // (4 * sum(widths.values()))))
        box["store"].append(rows)

    _harvest(model, texts, hook_names, max_tokens, context_size, model_batch_size, torch.float32, progress, write)
    box["store"].close()
    return ActivationStore.open(folder)
