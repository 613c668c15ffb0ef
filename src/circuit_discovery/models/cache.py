"""The model cache's manifest: file sizes, SHA-256 hashes and the stamp of the file last verified.

A cached model folder (``<cache root>/models/<name>/``) holds an ordinary Hugging Face folder plus
``frc_manifest.json``::

    {"format": 1, "model": ..., "source": ...,
     "files": {name: size},                 # every file of the folder
     "sha256": ...,                         # model.safetensors
     "sha256_files": {name: sha256},        # every file (written since per-file hashes exist; see below)
     "verified": {name: [size, mtime_ns, inode, ctime_ns]}}   # each file as it was when its hash last matched

:func:`check_cache` (run by every load) checks the sizes, and rehashes a file only when its stamp differs from the
one recorded at its last successful hash check; a file untouched since then is not read. A write into the file (a
same-size corruption included) changes its mtime and ctime, a replaced file has another inode, so such a file is
rehashed before it is used. What the stamp cannot see: a change that restores mtime *and* ctime (ctime can only be
set by changing the system clock) on the same inode. :func:`verify_model_cache` rehashes every file whatever the
stamps say.

Manifests written before per-file hashes existed hold the hash of ``model.safetensors`` only; the first check whose
``model.safetensors`` hash matches records the hashes of the other files as they are then (trust on first check).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuit_discovery.errors import ModelLoadError
from circuit_discovery.io import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "frc_manifest.json"
CACHE_FORMAT = 1
WEIGHTS = "model.safetensors"


class ModelCacheError(ModelLoadError):
    """A cached model folder is damaged and could not be rebuilt, or a cache check was asked for a bad name."""


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns, inode, ctime_ns]`` of a file: what changes when the file is written or replaced."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a cache folder, or None when it is missing or not a JSON object."""
    try:
        meta = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_manifest_file(folder: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(meta, indent=2) + "\n")


def write_manifest(folder: str | os.PathLike, **meta: Any) -> dict[str, Any]:
    """Write the manifest of a freshly written cache folder: sizes, hashes and stamps of every file in it, plus
    ``meta`` (``model``, ``source``, ``build_seconds``, ...). Returns the manifest."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    hashes = {n: sha256_file(folder / n) for n in names}
    manifest: dict[str, Any] = {"format": CACHE_FORMAT, **meta,
                                "files": {n: (folder / n).stat().st_size for n in names},
                                "sha256": hashes.get(WEIGHTS), "sha256_files": hashes,
                                "verified": {n: file_stamp(folder / n) for n in names}}
    _write_manifest_file(folder, manifest)
    return manifest


@dataclass
class CacheCheck:
    """What :func:`check_cache` found. ``ok``: every file is present with its size and (where read) its hash."""

    folder: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    rehashed: list[str] = field(default_factory=list)   # files whose hash was computed by this check
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "ok": self.ok, "problems": list(self.problems),
                "rehashed": list(self.rehashed), "seconds": round(self.seconds, 3)}


def check_cache(folder: str | os.PathLike, *, full: bool = False) -> CacheCheck:
    """Check a cache folder against its manifest.

    Every listed file must exist with its recorded size. A file with a recorded hash is rehashed when ``full`` or
    when its stamp (:func:`file_stamp`) differs from the one recorded at its last successful check; a mismatch is a
    problem. When everything matches, new stamps (and, for old manifests, the hashes of files that had none) are
    written back to the manifest atomically; a read-only cache is left as it is (the next check rehashes again).
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    res = CacheCheck(folder, ok=False)
    meta = read_manifest(folder)
    if meta is None:
        res.problems.append(f"{MANIFEST} is missing or unreadable")
        return _done(res, t0)
    if meta.get("format") != CACHE_FORMAT:
        res.problems.append(f"cache format {meta.get('format')!r} is not {CACHE_FORMAT}")
        return _done(res, t0)
    files = meta.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        res.problems.append(f"{MANIFEST} lists no {WEIGHTS}")
        return _done(res, t0)
    hashes: dict[str, str] = dict(meta.get("sha256_files") or {})
    if isinstance(meta.get("sha256"), str):
        hashes.setdefault(WEIGHTS, meta["sha256"])
    verified: dict[str, list[int]] = dict(meta.get("verified") or {})
    stamps: dict[str, list[int]] = {}
    for name, size in files.items():
        try:
            stamps[name] = file_stamp(folder / name)
        except OSError:
            res.problems.append(f"{name} is missing")
            continue
        if stamps[name][0] != size:
            res.problems.append(f"{name} has {stamps[name][0]} bytes, the manifest says {size}")
    if res.problems:
        return _done(res, t0)
    if WEIGHTS not in hashes:
        res.problems.append(f"{MANIFEST} holds no hash of {WEIGHTS}")
        return _done(res, t0)
    changed = False
    for name in files:  # the weights first: the other files' hashes may be trusted on its match (old manifests)
        if name not in hashes or (not full and verified.get(name) == stamps[name]):
            continue
        res.rehashed.append(name)
        if sha256_file(folder / name) != hashes[name]:
            res.problems.append(f"{name} does not match its SHA-256 in {MANIFEST} (same size, changed content)")
        else:
            verified[name] = stamps[name]
            changed = True
    if res.problems:
        return _done(res, t0)
    for name in files:  # old manifests: record the hashes of the files that had none
        if name not in hashes:
            hashes[name] = sha256_file(folder / name)
            verified[name] = stamps[name]
            res.rehashed.append(name)
            changed = True
    res.ok = True
    if changed:
        new = {**meta, "sha256_files": hashes, "verified": verified}
        try:
            _write_manifest_file(folder, new)
        except OSError as e:  # a read-only cache: correct, only slower (the next load rehashes)
            log.info("could not record the verified stamps in %s (%s); the next load rehashes", folder, e)
    return _done(res, t0)


def _done(res: CacheCheck, t0: float) -> CacheCheck:
    res.seconds = time.perf_counter() - t0
    return res
