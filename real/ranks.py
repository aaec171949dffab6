"""The rank side of the pool: what each rank process runs, and helpers
shared with real/launch.py (torchrun).

A rank joins the group through the parent's TCPStore, reports "ready", then
answers work requests until its pipe closes; progress notes go to shared memory
(`note`), where the parent reads them when a rank fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing.connection as mp_conn
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rule for the largest pool: NCCL needs one GPU per rank; CPU ranks (gloo) may
# oversubscribe the cores, but past 8 ranks per core start-up and collectives
# crawl and memory (~0.3 GB per torch process) becomes the real limit.
MAX_RANKS_PER_CPU = 8

# Bytes of shared memory per rank for its latest progress note (UTF-8, NUL-padded).
NOTE_BYTES = 256

# How often a rank checks that its parent is still alive.
_PARENT_POLL_S = 0.5

# A rank whose latest note starts with this is past its last collective (e.g.
# checking its results): it cannot be stuck waiting for a failed peer, so the
# pool's failure grace does not cut it short, and once the run timeout has
# passed it gets the pool's analysis budget instead of counting as hung.
FINISHING_NOTE = "finishing"


# --------------------------------------------------------------------------
# Helpers shared with real/launch.py


def default_backend() -> str:
    """NCCL when CUDA is usable, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def usable_cpu_count() -> int:
    """Cores this process may run on."""
    # Affinity respects container/taskset limits; cpu_count() does not.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_world_size(backend: str | None = None) -> int:
    """Largest pool this machine can hold.

    NCCL: the number of visible GPUs (one rank per GPU). Any other backend runs
    ranks on the CPU: `MAX_RANKS_PER_CPU` ranks per usable core.
    """
    backend = backend or default_backend()
    if backend == "nccl":
        return torch.cuda.device_count()
    return MAX_RANKS_PER_CPU * usable_cpu_count()


def load_callable(spec: str) -> Callable[..., Any]:
    """Resolve "package.module:function" (dotted attributes allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj


def _loopback_ifname() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def setup_rank_runtime(backend: str, rank: int, threads: int) -> None:
    """Per-rank torch settings done before the group forms (pool and torchrun alike)."""
    torch.set_num_threads(max(1, threads))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())


def _describe_exception(exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"raised {type(exc).__name__}: {exc}\n{tb}"


# --------------------------------------------------------------------------
# Progress notes (rank side)

_note_buf: Any = None  # shared RawArray of c_char, world_size * NOTE_BYTES
_note_rank = 0
_last_note = ""


def note(text: str) -> None:
    """Publish where this rank is ("step 12 final_all_reduce").

    Cheap enough to call every step: one memmove into shared memory, no IPC.
    Outside a pool rank it only remembers the text (see `last_note`). A reader
    racing a writer may see a mix of two notes; notes are hints, not data.
    """
    global _last_note
    _last_note = text
    if _note_buf is None:
        return
    data = text.encode("utf-8", "replace")[: NOTE_BYTES - 1]
    # Pad with NULs so a shorter note fully replaces a longer one.
    ctypes.memmove(
        ctypes.addressof(_note_buf) + _note_rank * NOTE_BYTES,
        data.ljust(NOTE_BYTES, b"\0"),
        NOTE_BYTES,
    )


def last_note() -> str:
    """The last note this process published."""
    return _last_note


def read_note(buf: Any, rank: int) -> str:
    raw = bytes(buf[rank * NOTE_BYTES : (rank + 1) * NOTE_BYTES])
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Rank process


def _send(conn: mp_conn.Connection, reply: tuple[str, int, Any]) -> None:
    # Plain pickle, not conn.send: torch registers ForkingPickler reductions
    # that would ship tensors as shared-memory fds tied to this process.
    try:
        data = pickle.dumps(reply)
    except Exception as exc:  # the value, not the pipe, is bad
        data = pickle.dumps(("error", reply[1], f"result is not picklable: {exc!r}"))
    conn.send_bytes(data)


def _watch_parent(parent_pid: int) -> None:
    # The main thread may be stuck in a collective, so a thread must notice an
    # orphaned rank; re-parenting changes getppid().
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def rank_main(
    rank: int,
    world_size: int,
    backend: str,
    store_port: int,
    startup_s: float,
    pg_timeout_s: float,
    threads: int,
    conn: mp_conn.Connection,
    note_buf: Any,
    parent_pid: int,
) -> None:
    global _note_buf, _note_rank
    # The parent owns Ctrl-C: it tears the ranks down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    _note_buf, _note_rank = note_buf, rank
    try:
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # Keep gloo's pair sockets on loopback: the pool is single-host.
            ifname = _loopback_ifname()
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        setup_rank_runtime(backend, rank, threads)
        store = dist.TCPStore(
            "127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=startup_s)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),  # the default group's collective timeout
        )
    except BaseException as exc:  # report anything, then exit
        with contextlib.suppress(OSError):
            _send(conn, ("init_error", 0, _describe_exception(exc)))
        return
    _send(conn, ("ready", 0, os.getpid()))
    try:
        while True:
            try:
                payload = conn.recv_bytes()
            except (EOFError, OSError):
                break  # parent closed the pipe or died
            if not payload:
                break  # orderly close
            seq = -1
            try:
                seq, fn, args = pickle.loads(payload)
                reply = ("ok", seq, fn(rank, world_size, *args))
            except BaseException as exc:  # becomes the rank's failure
                reply = ("error", seq, _describe_exception(exc))
            _send(conn, reply)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        # Skip interpreter finalisation: tearing torch down costs ~0.5 s per
        # rank and the rank owns nothing that needs it.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)
