"""The parent side of a RankPool (real/pool.py): one generation of spawned
rank processes and their rendezvous store, stopping and reaping them, and
gathering one answer per rank under the run's timeout and failure grace."""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import multiprocessing.connection as mp_conn
import multiprocessing.util as mp_util
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from real.pool_errors import ANALYSIS_OVER_BUDGET
from real.ranks import FINISHING_NOTE, NOTE_BYTES, rank_main, read_note


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    # Spawned children inherit an ignored SIGINT through exec, and Python then
    # never installs its KeyboardInterrupt handler, covering the torch import.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _stop_processes(
    procs: list[Any], conns: list[mp_conn.Connection], graceful: bool, join_s: float
) -> None:
    """Stop rank processes: ask politely if `graceful`, then SIGKILL; always reap."""
    if graceful:
        for conn in conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send_bytes(b"")
        deadline = time.monotonic() + join_s
        for proc in procs:
            with contextlib.suppress(ValueError, AssertionError):
                proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ValueError, AssertionError, OSError):
            if proc.is_alive():
                proc.kill()
    for proc in procs:
        with contextlib.suppress(ValueError, AssertionError):
            proc.join(5.0)  # reap: no zombies
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()
    for proc in procs:
        with contextlib.suppress(ValueError):
            proc.close()


def _exit_reason(proc: Any) -> str:
    with contextlib.suppress(ValueError, AssertionError):
        proc.join(1.0)
    code = proc.exitcode
    if code is None:
        return "closed its pipe but is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"died with exit code {code} ({name})"
    return f"died with exit code {code}"


@contextlib.contextmanager
def _stop_on_error(procs: list[Any], conns: list[mp_conn.Connection]) -> Iterator[None]:
    # A spawn failing half-way must not leave the ranks already started behind.
    try:
        yield
    except BaseException:
        _stop_processes(procs, conns, False, 0.0)
        raise


class _Generation:
    """One set of live rank processes plus their store; never revived once stopped."""

    def __init__(self, world_size: int, backend: str, startup_s: float, pg_timeout_s: float, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.note_buf = ctx.RawArray(ctypes.c_char, world_size * NOTE_BYTES)
        # The parent hosts the store, bound to port 0: no port race, and a
        # dying rank 0 cannot take the rendezvous down with it.
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=startup_s),
        )
        self.port = self.store.port
        self.procs: list[Any] = []
        self.conns: list[mp_conn.Connection] = []
        self.pids: list[int] = []
        # multiprocessing's own exit hook runs exitpriority finalizers before
        # joining children, so a forgotten pool cannot hang interpreter exit.
        # The lists are filled below; the finalizer sees them by reference.
        self._finalizer: Any = mp_util.Finalize(
            self, _stop_processes, args=(self.procs, self.conns, False, 0.0), exitpriority=100
        )
        with _sigint_ignored(), _stop_on_error(self.procs, self.conns):
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=rank_main,
                    args=(
                        rank,
                        world_size,
                        backend,
                        self.port,
                        startup_s,
                        pg_timeout_s,
                        threads,
                        child_end,
                        self.note_buf,
                        os.getpid(),
                    ),
                    name=f"moe-twin-rank{rank}",
                )
                self.procs.append(proc)
                self.conns.append(parent_end)
                try:
                    proc.start()
                finally:
                    child_end.close()  # so the parent sees EOF when the child dies

    def stop(self, graceful: bool, join_s: float = 5.0) -> None:
        if self._finalizer is not None:
            self._finalizer.cancel()
            self._finalizer = None
        _stop_processes(self.procs, self.conns, graceful, join_s)
        self.store = None  # closes the listening socket

    def notes(self) -> dict[int, str]:
        return {r: read_note(self.note_buf, r) for r in range(self.world_size)}

    def finishing(self, rank: int) -> bool:
        """The rank said it is past its last collective (see FINISHING_NOTE)."""
        return read_note(self.note_buf, rank).startswith(FINISHING_NOTE)

    def clear_notes(self) -> None:
        ctypes.memset(ctypes.addressof(self.note_buf), 0, self.world_size * NOTE_BYTES)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def gather(
        self, kind_ok: str, timeout_s: float, grace_s: float, failed: Callable[[Any], bool] | None = None,
        analysis_s: float = 0.0,
    ) -> tuple[dict[int, Any], dict[int, str], dict[int, float]]:
        """Wait for one message per rank; returns (results, failures, times).

        `failed(result)` says a result reports a failure of the work (the
        rank caught its own error): like a failure, it starts the short grace
        for the other ranks. `times` is when each rank was noticed (time.time()).
        At the timeout, ranks past their collectives (FINISHING_NOTE) get
        `analysis_s` more; those still busy then fail with ANALYSIS_OVER_BUDGET,
        not as timed out."""
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        times: dict[int, float] = {}
        first_failed: list[int] = []  # the first rank that failed or reported a failure
        pending = set(range(self.world_size))
        start = time.monotonic()
        deadline = start + timeout_s
        by_conn = {id(self.conns[r]): r for r in pending}
        by_sentinel = {self.procs[r].sentinel: r for r in pending}

        def take(rank: int) -> None:
            times[rank] = time.time()
            take_message(rank)
            if rank not in pending and not first_failed and (
                rank in failures or (failed is not None and failed(results[rank]))
            ):
                first_failed.append(rank)

        def take_message(rank: int) -> None:
            # A message beats a death: the rank may have answered then exited.
            conn = self.conns[rank]
            try:
                if conn.poll():
                    kind, _seq, value = pickle.loads(conn.recv_bytes())
                    if kind == kind_ok:
                        results[rank] = value
                    else:
                        failures[rank] = value
                    pending.discard(rank)
                    return
            except (EOFError, OSError):
                # The pipe closed: the rank is exiting, wait briefly for its code.
                failures[rank] = _exit_reason(self.procs[rank])
                pending.discard(rank)
                return
            except Exception as exc:  # e.g. result unpicklable here
                failures[rank] = f"sent a result the parent cannot load: {exc!r}"
                pending.discard(rank)
                return
            if not self.procs[rank].is_alive() or conn.closed:
                failures[rank] = _exit_reason(self.procs[rank])
                pending.discard(rank)

        grace_end: float | None = None
        stuck: set[int] = set()  # cut short by the failure grace
        late: set[int] = set()  # still in the run (not finishing) at its timeout
        analysis_end: float | None = None  # set at the timeout if ranks are finishing
        while pending:
            now = time.monotonic()
            if grace_end is not None and now >= grace_end:
                # Peers of a failed rank usually hang in a collective: after a
                # short grace stop waiting for them, but not for ranks whose
                # note says they are past their collectives (their results count).
                stuck |= {r for r in pending if not self.finishing(r)}
                pending -= stuck
                grace_end = math.inf
                continue
            limit = deadline if analysis_end is None else analysis_end
            if now >= limit:
                if analysis_end is not None or not analysis_s > 0:
                    break
                late = {r for r in pending if not self.finishing(r)}
                pending -= late
                analysis_end = now + analysis_s
                continue
            waitables: list[Any] = []
            for r in pending:
                waitables += [self.conns[r], self.procs[r].sentinel]
            ready = mp_conn.wait(waitables, timeout=min(limit, grace_end or limit) - now)
            for obj in ready:
                rank = by_sentinel.get(obj) if isinstance(obj, int) else by_conn.get(id(obj))
                if rank is not None and rank in pending:
                    take(rank)
            if first_failed and pending and grace_end is None:
                grace_end = time.monotonic() + grace_s
        waited = time.monotonic() - start
        for rank in sorted(pending | stuck | late):
            times[rank] = time.time()
            if rank in pending and analysis_end is not None:
                failures[rank] = (f"{ANALYSIS_OVER_BUDGET}: the run ended (past its last collective) but the "
                                  f"twin's analysis was still running {analysis_s:g} s after the run's "
                                  f"{timeout_s:g} s timeout")
            elif first_failed:
                failures[rank] = (
                    f"timed out: still running {waited:.1f} s into the run, "
                    f"{grace_s:.1f} s after rank {first_failed[0]} failed"
                )
            else:
                failures[rank] = f"timed out after {timeout_s:.1f} s"
        return results, failures, times

