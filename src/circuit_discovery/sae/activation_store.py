"""An activation store on disk: safetensors shards per hook, read by memory map.

Dictionary training needs the same rows of every hook it reads (a transcoder's input and output at one token), a
fresh permutation of the rows every epoch, and, to be reproducible, exactly the batches it would draw from tensors
held in memory. :class:`ActivationStore` gives that without holding the activations in RAM::

    store = ActivationStore.create(folder, {"blocks.3.mlp.hook_in": 640, "blocks.3.hook_mlp_out": 640})
    for acts in stream:                 # {hook: Tensor[rows, d]}, rows aligned across hooks
        store.append(acts)
    store.close()                       # flush the last shard, write manifest.json (atomically)
    source = ActivationStore.open(folder).source()   # {hook: RowView}; RowView[idx] -> Tensor[len(idx), d]

``source`` is a ``Mapping[str, RowView]`` that :func:`circuit_discovery.sae.training.train_saes` accepts like
``{hook: Tensor}``: ``view.shape[0]`` rows, ``view[idx]`` gathers the rows ``idx`` (a ``LongTensor``) from the
memory-mapped shards -- the same values, in the same order, as indexing the tensor in memory, so training from the
store gives the same dictionary at the same seed. Pages read are released after each gather (``MADV_DONTNEED``), so
the resident memory stays at one batch, not the store's size.

Files: ``<folder>/manifest.json`` (hooks, widths, dtype, rows per shard) and
``<folder>/<hook>/<index>.safetensors`` (one tensor ``"activations" [rows, d]`` each). A shard is written to a
temporary name and renamed; the manifest last, so a folder without a manifest is an unfinished store.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.io import atomic_write_text

__all__ = ["ActivationStore", "ActivationStoreError", "RowView"]

MANIFEST = "manifest.json"
_TENSOR = "activations"
_DTYPES = {"float32": (torch.float32, "F32", 4), "bfloat16": (torch.bfloat16, "BF16", 2),
           "float16": (torch.float16, "F16", 2)}


class ActivationStoreError(CircuitDiscoveryError, ValueError):
    """The activation store folder is unfinished, damaged or does not match what is asked of it."""


def _hook_dir(hook: str) -> str:
    return hook.replace("/", "_")


class _Shard:
    """One memory-mapped shard: a ``[rows, d]`` tensor viewed in place (no copy)."""

    def __init__(self, path: Path, d: int, dtype: str):
        self.path = path
        try:
            with open(path, "rb") as fh:
                (n_header,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n_header))
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, struct.error, ValueError) as e:
            raise ActivationStoreError(f"{path} cannot be read ({e}); delete the store folder and harvest again") \
                from None
        meta = header.get(_TENSOR)
        want = _DTYPES[dtype][1]
        if not isinstance(meta, dict) or meta.get("dtype") != want or len(meta.get("shape", ())) != 2 \
                or meta["shape"][1] != d:
            raise ActivationStoreError(f"{path}: expected one {want} tensor '{_TENSOR}' [rows, {d}]; the store is "
                                       "damaged: delete the folder and harvest again")
        self.rows = int(meta["shape"][0])
        start, end = meta["data_offsets"]
        self.offset, self.nbytes = 8 + n_header + int(start), int(end) - int(start)
        if self.offset + self.nbytes > len(self.mm):
            raise ActivationStoreError(f"{path} is truncated; delete the store folder and harvest again")
        arr = np.frombuffer(self.mm, dtype=np.uint8, count=self.nbytes, offset=self.offset)
        with warnings.catch_warnings():  # a read-only buffer: torch warns that the tensor is not writable; it never is
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.from_numpy(arr).view(_DTYPES[dtype][0]).view(self.rows, d)

    def release(self) -> None:
        """Drop the pages read so far from resident memory (they are file-backed: reading again re-faults them)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED)


class RowView:
    """The rows of one hook across its shards; ``view[idx]`` gathers rows like indexing a ``[n, d]`` tensor."""

    def __init__(self, shards: list[_Shard], d: int):
        self.shards = shards
        self.d = d
        self.starts = np.cumsum([0] + [s.rows for s in shards])
        self.shape = (int(self.starts[-1]), d)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> Tensor:
        if isinstance(idx, slice):
            idx = torch.arange(self.shape[0])[idx]
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.shape[0]):
            raise IndexError(f"row index out of range for a store of {self.shape[0]} rows")
        shard_of = np.searchsorted(self.starts, idx.numpy(), side="right") - 1
        out = torch.empty(idx.numel(), self.d, dtype=self.shards[0].tensor.dtype)
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            sel_t = torch.from_numpy(sel)
            out[sel_t] = self.shards[s].tensor[idx[sel_t] - int(self.starts[s])]
            self.shards[s].release()
        return out


@dataclass
class ActivationStore:
    """A folder of activation shards (see the module docstring)."""

    folder: Path
    widths: dict[str, int]
    dtype: str = "float32"
    shard_rows: int = 65_536
    _buf: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)
    _have: int = 0
    _rows: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, folder: str | os.PathLike, widths: Mapping[str, int], *, dtype: str = "float32",
               shard_rows: int = 65_536) -> ActivationStore:
        if dtype not in _DTYPES:
            raise ActivationStoreError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        if shard_rows < 1:
            raise ActivationStoreError("shard_rows must be >= 1")
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise ActivationStoreError(f"{folder} already holds a finished store; open it, or delete it first")
        folder.mkdir(parents=True, exist_ok=True)
        store = cls(folder, dict(widths), dtype, shard_rows)
        store._buf = {h: [] for h in store.widths}
        return store

    def append(self, acts: Mapping[str, Tensor]) -> None:
        """Add rows (``{hook: Tensor[rows, d]}``, the same rows for every hook of the store)."""
        if set(acts) != set(self.widths):
            raise ActivationStoreError(f"append got hooks {sorted(acts)}, the store holds {sorted(self.widths)}")
        rows = {int(t.reshape(-1, t.shape[-1]).shape[0]) for t in acts.values()}
        if len(rows) != 1:
            raise ActivationStoreError(f"append got different row counts per hook: {sorted(rows)}")
        for h, t in acts.items():  # check every hook before adding any, so the rows stay aligned
            if t.shape[-1] != self.widths[h]:
                raise ActivationStoreError(f"{h}: rows of width {t.shape[-1]}, the store expects {self.widths[h]}")
        for h, t in acts.items():
            self._buf[h].append(t.detach().reshape(-1, t.shape[-1]).to("cpu", _DTYPES[self.dtype][0]))
        self._have += rows.pop()
        while self._have >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        for h in self.widths:
            cat = torch.cat(self._buf[h])
            d = self.folder / _hook_dir(h)
            d.mkdir(exist_ok=True)
            i = len(self._rows)
            tmp = d / f".{i:05d}.safetensors.tmp"
            save_file({_TENSOR: cat[:n].contiguous()}, str(tmp))
            os.replace(tmp, d / f"{i:05d}.safetensors")
            self._buf[h] = [cat[n:]]
        self._rows.append(n)
        self._have -= n

    def close(self) -> Path:
        """Write what is buffered and the manifest; returns the folder."""
        if self._have:
            self._flush(self._have)
        manifest = {"format": "frc-activation-store", "version": 1, "dtype": self.dtype,
                    "hooks": {h: {"d": d, "dir": _hook_dir(h)} for h, d in self.widths.items()},
                    "shard_rows": self._rows, "rows": int(sum(self._rows))}
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        return self.folder

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, folder: str | os.PathLike) -> ActivationStore:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ActivationStoreError(f"{folder} has no {MANIFEST}: the store is unfinished; delete it and harvest "
                                       "again")
        try:
            m = json.loads(path.read_text())
            widths = {h: int(v["d"]) for h, v in m["hooks"].items()}
            store = cls(folder, widths, str(m["dtype"]))
            store._rows = [int(r) for r in m["shard_rows"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ActivationStoreError(f"{path} is damaged ({e}); delete the store folder and harvest again") \
                from None
        if store.dtype not in _DTYPES:
            raise ActivationStoreError(f"{path}: unknown dtype {store.dtype!r}")
        return store

    @property
    def rows(self) -> int:
        return int(sum(self._rows))

    def source(self, hooks: list[str] | None = None) -> dict[str, RowView]:
        """``{hook: RowView}`` over the memory-mapped shards (for ``train_saes(activation_source=...)``)."""
        out = {}
        for h in hooks or list(self.widths):
            if h not in self.widths:
                raise ActivationStoreError(f"the store at {self.folder} holds no {h}; it has {sorted(self.widths)}")
            d = self.folder / _hook_dir(h)
            shards = [_Shard(d / f"{i:05d}.safetensors", self.widths[h], self.dtype) for i in range(len(self._rows))]
            for s, want in zip(shards, self._rows, strict=True):
                if s.rows != want:
                    raise ActivationStoreError(f"{s.path} holds {s.rows} rows, the manifest says {want}; delete the "
                                               "store folder and harvest again")
            out[h] = RowView(shards, self.widths[h])
        return out
