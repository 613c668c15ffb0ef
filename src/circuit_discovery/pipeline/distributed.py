"""Runs across processes launched by ``torchrun``: which rank does what, and the few messages the ranks exchange.

``torchrun --nproc-per-node N main.py [options]`` starts N copies of the run. :meth:`Dist.from_env` reads
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; any rendezvous torchrun supports, so many
machines too) and :meth:`Dist.start` joins the process group: gloo on CPU, nccl when the run's device is CUDA (each
rank then uses ``cuda:<LOCAL_RANK>``). The run's own messages are JSON (never pickle) sent through a gloo group
with a timeout (:data:`ENV_TIMEOUT`), so a rank that stops answering ends the run instead of hanging it. Without
torchrun, or with one process, :meth:`Dist.from_env` returns ``None`` and the run is the plain single-process run.

Every message is an envelope, ``{"ok": value}`` or ``{"error": ...}``, exchanged by all ranks at the same point
(:meth:`Dist.exchange`, :meth:`Dist.share`): a rank whose work raised sends its error instead of its result, so
every rank learns at the same message that the run has failed, and rank 0 prints one line naming the failing rank
and the cause (:class:`DistributedError`, exit code 2, for bad input; exit code 1 for a bug, whose traceback the
failing rank logs). A rank that dies without a message (SIGKILL, out of memory) closes its connections: the others'
next message fails, or torchrun stops them with SIGTERM; the lowest surviving rank names the ranks whose process is
gone (ranks on the same machine; for other machines it says that it lost contact).

Work items are dealt round robin in a fixed order (item ``i`` to rank ``i mod N``), and every random draw in the
per-relation functions is seeded by the run's seed and what it is for, never by the rank, so the results do not
depend on the number of processes (``tests/unit/test_distributed.py``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.io import _default

log = logging.getLogger(__name__)

#: seconds a rank waits at one message for the others (they may still be working on their share): default
#: :data:`DEFAULT_TIMEOUT_S`; past it the run stops with a message naming the message it waited at
ENV_TIMEOUT = "FRC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0

#: testing hook: ``"<stage>:<rank>:<item>"`` makes that rank kill itself with SIGKILL before its item number
#: ``<item>`` (0-based, among its own items) of that stage, the way an out-of-memory kill would
ENV_KILL = "FRC_TEST_KILL"

#: store key set by the rank that has printed why the run stopped
REPORTED_KEY = "frc/reported"

#: exit codes: bad input (as the CLI's ``error:`` lines), and anything else (a bug, a killed rank)
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class DistributedError(CircuitDiscoveryError, RuntimeError):
    """A rank of a distributed run stopped on bad input; the message names the rank and says what to do."""


class RankStopped(SystemExit):
    """A rank leaves because the run has failed (rank 0, or the lowest surviving rank, reports why)."""


class _Lost(BaseException):
    """Contact with another rank was lost: its process died, or torchrun stopped this one (SIGTERM)."""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def timeout_s() -> float:
    """:data:`ENV_TIMEOUT`, else :data:`DEFAULT_TIMEOUT_S`; a value that is not a positive number is an error."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw in (None, ""):
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r} is not valid; give the seconds a rank may wait for the "
                               "others (a positive number)")
    return v


def share_of(n_items: int, rank: int, world_size: int) -> list[int]:
    """The indices of the items rank ``rank`` works on: ``i`` with ``i mod world_size == rank``, in order."""
    return list(range(rank, n_items, world_size))


def maybe_kill(stage: str, rank: int, index: int) -> None:
    """The :data:`ENV_KILL` testing hook: SIGKILL this process before item ``index`` of ``stage`` on ``rank``."""
    spec = os.environ.get(ENV_KILL)
    if spec and spec == f"{stage}:{rank}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this machine has ended (no such process, or a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


@dataclass
class Dist:
    """This process's place in a distributed run, and the run's messages (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT_S
    host: str = field(default_factory=socket.gethostname)
    backend: str | None = None
    peers: list[dict] = field(default_factory=list)   # per rank: {"host", "pid"}
    stage: str = "start"                                # what the ranks are doing (named in failure messages)
    _group: Any = None
    _old_sigterm: Any = None
    _started: bool = False
    _failing: bool = False   # the run has failed: SIGTERM is ignored until this process has said why and left

    @classmethod
    def from_env(cls) -> Dist | None:
        """The rank of a ``torchrun`` worker (``None`` without torchrun or with ``WORLD_SIZE`` 1)."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return None
        return cls(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                   timeout=timeout_s())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n_items: int) -> list[int]:
        return share_of(n_items, self.rank, self.world_size)

    # ------------------------------------------------------------------ start and stop
    def device(self, requested: str) -> str:
        """The device this rank runs on: ``cuda:<LOCAL_RANK mod GPUs>`` where ``requested`` is ``auto`` or
        ``cuda`` and CUDA is available (more ranks than GPUs on a machine share them), else ``requested``."""
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def start(self, device: str) -> None:
        """Join the process group (nccl for a CUDA ``device`` with one GPU per rank, else gloo) and a gloo group for
        the messages; exchange every rank's host and process id; SIGTERM (torchrun stopping this rank) ends the
        run with a message instead of silently."""
        import torch
        import torch.distributed as dist

        td = timedelta(seconds=self.timeout)
        per_machine = _env_int("LOCAL_WORLD_SIZE", self.world_size)
        gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
        self.backend = "nccl" if gpus and per_machine <= gpus else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            dist.init_process_group(backend=self.backend, timeout=td)
        self._started = True
        self._group = None if self.backend == "gloo" else dist.new_group(backend="gloo", timeout=td)
        self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.peers = self.exchange(lambda: {"host": self.host, "pid": os.getpid()}, "start")

    def _on_sigterm(self, signum, frame) -> NoReturn:
        raise _Lost("stopped by SIGTERM (torchrun stops every rank when one has ended)")

    def close(self) -> None:
        """Leave the process group and restore SIGTERM (after a failure: neither; the process is ending, and
        torchrun's SIGTERM must not cut rank 0's message short)."""
        import torch.distributed as dist

        if self._failing:
            return
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if self._started and dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # a peer already gone: nothing left to leave cleanly
                dist.destroy_process_group()
        self._started = False

    # ------------------------------------------------------------------ messages
    def _all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON: floats round-trip exactly), in rank order. A failed or timed-out
        collective raises :class:`_Lost`."""
        import torch
        import torch.distributed as dist

        data = json.dumps(obj, default=_default, allow_nan=True).encode("utf-8")
        n = torch.tensor([len(data)], dtype=torch.int64)
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, n, group=self._group)
            most = max(int(s.item()) for s in sizes)
            buf = torch.zeros(most, dtype=torch.uint8)
            if data:
                buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.empty(most, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(bufs, buf, group=self._group)
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout passed
            raise _Lost(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        return [json.loads(b[: int(s.item())].numpy().tobytes().decode("utf-8")) for b, s in zip(bufs, sizes)]

    def _envelopes(self, envelope: dict, stage: str) -> list[Any]:
        self.stage = stage
        envs = self._all_gather_json(envelope)
        failed = [(r, e["error"]) for r, e in enumerate(envs) if "error" in e]
        if failed:
            self._fail(failed)
        return [e["ok"] for e in envs]

    def _run_local(self, fn: Callable[[], Any]) -> dict:
        """``{"ok": fn()}``, or ``{"error": ...}`` when it raises (bad input: the message; a bug: logged with its
        traceback here, named in the message)."""
        try:
            return {"ok": fn()}
        except CircuitDiscoveryError as e:
            return {"error": {"kind": "input", "message": str(e)}}
        except Exception as e:  # a bug: its traceback is logged on this rank; every rank stops with one line
            log.error("rank %d: unexpected error", self.rank, exc_info=True)
            return {"error": {"kind": "bug", "message": f"{type(e).__name__}: {e}"}}

    def exchange(self, fn: Callable[[], Any], stage: str) -> list[Any]:
        """Run ``fn`` on every rank and give every rank the list of all ranks' results (rank order). If any rank's
        ``fn`` raised, the run stops on every rank (rank 0 reports it)."""
        return self._envelopes(self._run_local(fn), stage)

    def share(self, fn: Callable[[], Any], stage: str, src: int = 0) -> Any:
        """Run ``fn`` on rank ``src`` only and give its result to every rank (stops the run if it raised)."""
        env = self._run_local(fn) if self.rank == src else {"ok": None}
        return self._envelopes(env, stage)[src]

    def fail(self, exc: BaseException, stage: str) -> NoReturn:
        """This rank failed outside a message (``exc``): send the failure at the next message, which every rank
        reaches, so that the run stops everywhere with one line."""
        env = self._run_local(lambda: _reraise(exc))
        try:
            self._envelopes(env, stage)
        except _Lost:
            # the others cannot hear it (they finished and left after the last message, or stopped too): this rank
            # says why itself instead of reporting them as lost
            self.stage = stage
            self._report_alone(env["error"])
        raise AssertionError("unreachable: an error envelope always stops the run")  # pragma: no cover

    def _report_alone(self, err: dict) -> NoReturn:
        """This rank failed (``err``) where no other rank could be told: it reports its own failure."""
        self._ignore_sigterm()
        self._mark_reported()
        where = (f"rank {self.rank} of {self.world_size} failed in stage {self.stage} (the other ranks had left or "
                 f"stopped answering): ")
        if err["kind"] == "input":
            raise DistributedError(where + err["message"])
        print(f"error: {where}{err['message']} (a bug: the traceback is in rank {self.rank}'s log above)",
              file=sys.stderr, flush=True)
        raise RankStopped(EXIT_FAILED)

    def _fail(self, failed: Sequence[tuple[int, dict]]) -> NoReturn:
        """The run has failed (``failed``: (rank, error) of each failing rank, every rank knows the same list):
        rank 0 reports the first failure, every rank leaves."""
        self._ignore_sigterm()
        rank, err = failed[0]
        others = [r for r, _ in failed[1:]]
        also = f" (ranks {', '.join(map(str, others))} failed too)" if others else ""
        where = f"rank {rank} of {self.world_size} failed in stage {self.stage}{also}: "
        code = EXIT_BAD_INPUT if err["kind"] == "input" else EXIT_FAILED
        if self.rank != 0:
            raise RankStopped(code)
        self._mark_reported()
        if err["kind"] == "input":
            raise DistributedError(where + err["message"])
        print(f"error: {where}{err['message']} (a bug: the traceback is in rank {rank}'s log above)",
              file=sys.stderr, flush=True)
        raise RankStopped(code)

    def _ignore_sigterm(self) -> None:
        """From here on this process only says why the run failed and leaves: torchrun's SIGTERM (sent when another
        rank has left) must not cut that short."""
        self._failing = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _store(self):
        """The process group's key-value store (torchrun's agent keeps it while workers come and go), or ``None``."""
        from torch.distributed import distributed_c10d as c10d

        try:
            return c10d._get_default_store()
        except (RuntimeError, ValueError):
            return None

    def _mark_reported(self) -> None:
        """Tell the other ranks that this one has said why the run stopped (they then leave silently)."""
        store = self._store()
        if store is not None:
            with contextlib.suppress(RuntimeError):
                store.set(REPORTED_KEY, str(self.rank))

    def _already_reported(self) -> bool:
        store = self._store()
        if store is None:
            return False
        try:
            return bool(store.check([REPORTED_KEY]))
        except RuntimeError:
            return False

    def lost(self, why: str) -> NoReturn:
        """Contact with the other ranks was lost (``why``): unless a rank has already said why the run stopped, the
        lowest surviving rank names the ranks whose process has ended; every rank leaves with exit code 1."""
        self._ignore_sigterm()
        time.sleep(0.2)  # let the process that ended be seen as ended
        if self._already_reported():
            raise RankStopped(EXIT_FAILED)
        gone = [r for r, p in enumerate(self.peers) if r != self.rank and p.get("host") == self.host
                and _process_gone(int(p["pid"]))]
        alive_here = [r for r, p in enumerate(self.peers) if r not in gone and p.get("host") == self.host]
        reporter = min(alive_here) if alive_here else self.rank
        if self.rank == reporter:
            if gone:
                who = ", ".join(f"rank {r} (pid {self.peers[r]['pid']})" for r in gone)
                msg = (f"{who} stopped during stage {self.stage} without reporting an error (killed: SIGKILL, the "
                       f"out-of-memory killer or a lost machine); finished work is saved in the output folder: rerun "
                       f"the same command with --resume")
            else:
                msg = (f"rank {self.rank} stopped waiting for the other ranks during stage {self.stage} ({why}): a "
                       f"rank on another machine may have stopped, or one took longer than {ENV_TIMEOUT}="
                       f"{self.timeout:g} s; rerun the same command with --resume (with a larger {ENV_TIMEOUT} if a "
                       f"rank was only slow)")
            self._mark_reported()
            print(f"error: {msg}", file=sys.stderr, flush=True)
        raise RankStopped(EXIT_FAILED)


def _reraise(exc: BaseException) -> NoReturn:
    raise exc


def run_distributed(body: Callable[[Dist], Any], device: str) -> Any:
    """Start this rank (:meth:`Dist.from_env`, which must not be ``None``), run ``body(dist)`` and leave the
    group; an error escaping ``body`` is sent to the other ranks (:meth:`Dist.fail`), a lost peer or torchrun's
    SIGTERM stops the run with one line (:meth:`Dist.lost`)."""
    d = Dist.from_env()
    assert d is not None, "run_distributed is for torchrun workers (WORLD_SIZE > 1)"
    try:
        try:
            d.start(d.device(device))
            return body(d)
        except _Lost as e:
            d.lost(str(e))
        except Exception as e:  # sent to every rank, which all stop with one line (see Dist.fail)
            if isinstance(e, DistributedError) or not d._started:
                raise
            d.fail(e, d.stage)
    except _Lost as e:
        d.lost(str(e))
    finally:
        d.close()
