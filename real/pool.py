"""A fault-tolerant pool of torch.distributed rank processes on one machine.

`RankPool(n)` spawns n processes that join one process group and then wait for
work; `pool.run(fn, *args)` calls `fn(rank, world_size, *args)` on every rank
and returns the results indexed by rank. Start-up (importing torch, forming the
group) is paid once per pool, not once per scenario.

Faults never leave the pool half-broken: if a rank raises, dies or does not
answer in time, `run` raises `RankFailure` (what each failed rank did, the
results of the ranks that finished, the last progress note of each failed rank),
kills every rank process and rebuilds the group lazily on the next `run`.

Start-up (spawn, torch import, rendezvous, process-group init) has its own
timeout, `startup_timeout_s` (default `DEFAULT_STARTUP_TIMEOUT_S`, settable for
the whole process with `set_default_startup_timeout`), apart from the run
timeout: a run's clock starts when its work is sent to ready ranks. Ranks that
cannot start raise `PoolStartupError`, an infrastructure failure, never a
`RankFailure` of the work.

The rendezvous store is a TCPStore hosted by the parent on 127.0.0.1, bound to
port 0 (the kernel picks a free port, so there is no find-then-bind race) and
dropped with the group, so a rebuilt pool never reuses stale keys.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable
from typing import Any

from real.pool_errors import (
    ANALYSIS_OVER_BUDGET,
    AnalysisOverBudget,
    PoolError,
    PoolStartupError,
    RankFailure,
    startup_cause,
)

# The rank processes of one generation live in real/pool_procs.py.
from real.pool_procs import _Generation, _stop_processes  # noqa: F401
from real.ranks import (  # noqa: F401  (importable here as before)
    FINISHING_NOTE,
    MAX_RANKS_PER_CPU,
    NOTE_BYTES,
    default_backend,
    last_note,
    load_callable,
    max_world_size,
    note,
    rank_main,
    read_note,
    setup_rank_runtime,
    usable_cpu_count,
)
from real.startup import (
    DEFAULT_STARTUP_TIMEOUT_S,
    default_startup_timeout,
    set_default_startup_timeout,
)

__all__ = [
    "ANALYSIS_OVER_BUDGET",
    "AnalysisOverBudget",
    "DEFAULT_ANALYSIS_TIMEOUT_S",
    "MAX_RANKS_PER_CPU",
    "NOTE_BYTES",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "FINISHING_NOTE",
    "PoolError",
    "PoolStartupError",
    "RankFailure",
    "RankPool",
    "default_backend",
    "fresh_run",
    "load_callable",
    "max_world_size",
    "note",
    "last_note",
    "set_default_startup_timeout",
    "setup_rank_runtime",
    "usable_cpu_count",
]

# How long the other ranks may still finish after one rank raised or died;
# they are usually stuck in a collective waiting for the failed peer.
DEFAULT_FAILURE_GRACE_S = 1.0

# How long ranks past their last collective (FINISHING_NOTE: the twin's fits
# and output) may still take once the run's timeout has passed. The run's
# timeout is the runner's; the analysis is the twin's own work and must never
# make a finished runner read as hung. Normally a few seconds: this is a net.
DEFAULT_ANALYSIS_TIMEOUT_S = 300.0

class RankPool:
    """A reusable group of `world_size` rank processes (see module docstring).

    `backend` defaults to `default_backend()`; `timeout_s` bounds each `run`
    (unless overridden); `startup_timeout_s` bounds start-up (default: the
    process-wide `set_default_startup_timeout`, else DEFAULT_STARTUP_TIMEOUT_S);
    the default group's own collective timeout is the larger of the two;
    `analysis_timeout_s` is what ranks past their last collective (the twin's
    fits and output check) get beyond `timeout_s` (then `AnalysisOverBudget`);
    `threads_per_rank` defaults to usable cores // world_size (at least 1).
    """

    def __init__(
        self,
        world_size: int,
        backend: str | None = None,
        timeout_s: float = 60.0,
        threads_per_rank: int | None = None,
        *,
        failure_grace_s: float = DEFAULT_FAILURE_GRACE_S,
        startup_timeout_s: float | None = None,
        analysis_timeout_s: float = DEFAULT_ANALYSIS_TIMEOUT_S,
    ) -> None:
        self.backend = backend or default_backend()
        limit = max_world_size(self.backend)
        if world_size < 1:
            raise PoolError(f"world_size must be >= 1, got {world_size}")
        if world_size > limit:
            rule = (
                "one rank per visible GPU"
                if self.backend == "nccl"
                else f"{MAX_RANKS_PER_CPU} ranks per usable CPU core x {usable_cpu_count()} cores"
            )
            raise PoolError(
                f"world size {world_size} is larger than this machine can hold: "
                f"limit is {limit} for backend {self.backend!r} ({rule})"
            )
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.threads_per_rank = threads_per_rank or max(1, usable_cpu_count() // world_size)
        self.failure_grace_s = float(failure_grace_s)
        self.analysis_timeout_s = float(analysis_timeout_s)
        self._startup_timeout_s = None if startup_timeout_s is None else float(startup_timeout_s)
        self.starts = 0  # how many times rank processes were (re)started
        self._gen: _Generation | None = None
        self._closed = False
        self._seq = 0

    # -- lifecycle -------------------------------------------------------

    @property
    def startup_timeout_s(self) -> float:
        """Seconds the ranks may take to start (spawn, rendezvous, group init)."""
        return self._startup_timeout_s if self._startup_timeout_s is not None else default_startup_timeout()

    def start(self) -> None:
        """Start the ranks now (otherwise the first `run` does it).

        Raises `PoolStartupError` if they cannot start within `startup_timeout_s`."""
        if self._closed:
            raise PoolError("pool is closed")
        if self._gen is not None:
            return
        limit = self.startup_timeout_s
        try:
            gen = _Generation(self.world_size, self.backend, limit, max(limit, self.timeout_s),
                              self.threads_per_rank)
        except Exception as exc:  # spawn or the rendezvous store failed
            raise PoolStartupError(self.world_size, limit, f"spawning failed: {type(exc).__name__}: {exc}") from exc
        try:
            results, failures, _ = gen.gather("ready", limit, self.failure_grace_s)
        except BaseException:
            gen.stop(graceful=False)
            raise
        if failures:
            notes = gen.notes()
            gen.stop(graceful=False)
            notes = {r: notes[r] for r in failures if notes[r]}
            raise PoolStartupError(self.world_size, limit, startup_cause(failures, notes), failures, notes)
        gen.pids = [results[r] for r in range(self.world_size)]
        self._gen = gen
        self.starts += 1

    def close(self) -> None:
        """Destroy the process group in every rank, then join (kill stragglers)."""
        self._closed = True
        self._teardown(graceful=True)

    def _teardown(self, graceful: bool) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.stop(graceful=graceful)

    def __enter__(self) -> RankPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection ---------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Pids of the live rank processes (empty before start / after a failure)."""
        return list(self._gen.pids) if self._gen is not None else []

    @property
    def port(self) -> int | None:
        """Port of the current rendezvous store, if the ranks are up."""
        return self._gen.port if self._gen is not None else None

    def notes(self) -> dict[int, str]:
        """Latest progress note of every rank (empty strings if none)."""
        return self._gen.notes() if self._gen is not None else {}

    # -- work ------------------------------------------------------------

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout_s: float | None = None,
        failed: Callable[[Any], bool] | None = None,
    ) -> list[Any]:
        """Call `fn(rank, world_size, *args)` on every rank; results by rank.

        `fn` and `args` must pickle (a module-level function). On any fault
        raises `RankFailure` and tears the ranks down; the next call restarts them
        (start-up failures raise `PoolStartupError`). `timeout_s` counts from
        when the work is sent to started ranks. `failed(result)`, evaluated
        here in the parent, marks results that report a failure the rank caught
        itself: the other ranks then get the short failure grace, as after a raise.
        Raises `AnalysisOverBudget` (not `RankFailure`) when a rank past its
        last collective is still analysing `analysis_timeout_s` after the timeout.
        """
        if self._closed:
            raise PoolError("pool is closed")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        self._seq += 1
        try:
            payload = pickle.dumps((self._seq, fn, args))
        except Exception as exc:
            raise PoolError(f"cannot send {fn!r} to the ranks: {exc!r}") from exc
        if self._gen is not None and not self._gen.alive():
            # A rank died while idle (e.g. OOM killer): not this call's fault.
            warnings.warn("a rank died while the pool was idle; restarting", stacklevel=2)
            self._teardown(graceful=False)
        self.start()
        gen = self._gen
        assert gen is not None
        try:
            gen.clear_notes()
            for conn in gen.conns:
                with contextlib.suppress(OSError):
                    conn.send_bytes(payload)  # a dead rank shows up in gather
            results, failures, times = gen.gather("ok", timeout, self.failure_grace_s, failed,
                                                  self.analysis_timeout_s)
        except BaseException:
            # Ctrl-C or a parent-side bug: never leave ranks mid-collective.
            self._teardown(graceful=False)
            raise
        if failures:
            notes = gen.notes()
            self._teardown(graceful=False)
            if any(w.startswith(ANALYSIS_OVER_BUDGET) for w in failures.values()):
                raise AnalysisOverBudget(self.analysis_timeout_s, failures, notes)
            raise RankFailure(failures, results, {r: notes[r] for r in failures if notes[r]}, times)
        return [results[r] for r in range(self.world_size)]


def fresh_run(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
    startup_timeout_s: float | None = None,
) -> list[Any]:
    """Start a pool, run `fn` once, close the pool (start-up paid every call)."""
    with RankPool(world_size, timeout_s=timeout_s, startup_timeout_s=startup_timeout_s) as pool:
        return pool.run(fn, *args)
