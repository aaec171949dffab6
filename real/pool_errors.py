"""The rank pool's exceptions (real/pool.py re-exports them), and the
failure text of a rank whose post-run analysis ran over its budget."""

from __future__ import annotations

from typing import Any

# A rank's failure text when its run finished (it was past its last
# collective) but the twin's own analysis after it (fits, output) did not end
# within its budget: a limit of the twin, never a hang of the runner.
ANALYSIS_OVER_BUDGET = "analysis over budget"


class PoolError(Exception):
    """The pool cannot do what was asked (bad size, start-up failure, closed pool)."""


class RankFailure(PoolError):
    """One or more ranks raised, died or hung during `RankPool.run`.

    `failures` maps rank -> what happened (in the order the parent noticed),
    `partial` maps rank -> result for the ranks that finished, and `notes` maps
    each failed rank to its last progress note (see `note`).
    """

    def __init__(
        self,
        failures: dict[int, str],
        partial: dict[int, Any] | None = None,
        notes: dict[int, str] | None = None,
        times: dict[int, float] | None = None,
    ) -> None:
        self.failures = dict(failures)
        self.partial = dict(partial or {})
        self.notes = dict(notes or {})
        # Wall-clock time (time.time()) at which the parent noticed each
        # rank's message or failure: orders failures across ranks.
        self.times = dict(times or {})
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"{len(self.failures)} rank(s) failed:"]
        for rank, what in self.failures.items():
            first, _, _ = what.partition("\n")
            text = f"  rank {rank}: {first}"
            if self.notes.get(rank):
                text += f" [last note: {self.notes[rank]!r}]"
            lines.append(text)
        if self.partial:
            lines.append(f"  finished: ranks {sorted(self.partial)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args by default, which would lose the attributes.
        return (RankFailure, (self.failures, self.partial, self.notes, self.times))


class PoolStartupError(PoolError):
    """The rank processes could not be started (spawn failed, rendezvous or
    group init failed or timed out): an infrastructure failure, one line."""

    def __init__(self, world_size: int, timeout_s: float, cause: str, failures: dict[int, str] | None = None,
                 notes: dict[int, str] | None = None) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.cause = cause
        self.failures = dict(failures or {})
        self.notes = dict(notes or {})
        super().__init__(f"could not start {world_size} rank processes within {timeout_s:g} s: {cause}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (PoolStartupError, (self.world_size, self.timeout_s, self.cause, self.failures, self.notes))


def startup_cause(failures: dict[int, str], notes: dict[int, str]) -> str:
    """One line naming why ranks did not start: the first rank that died or
    raised (the others' time-outs follow from it), else the ranks not ready."""
    hard = [(r, w) for r, w in failures.items() if not w.startswith("timed out")]
    if hard:
        rank, what = hard[0]
        text = f"rank {rank} {what.partition(chr(10))[0]}"
        if notes.get(rank):
            text += f" (last note: {notes[rank]})"
        return text
    late = sorted(failures)
    return f"rank(s) {', '.join(map(str, late))} not ready in time"


class AnalysisOverBudget(RuntimeError):
    """The runner finished on every rank that was still running, but the
    twin's analysis after the last collective (fits against the float64
    reference, the output) did not end within its budget: the twin's limit,
    not a verdict on the runner."""

    def __init__(self, budget_s: float, failures: dict[int, str], notes: dict[int, str] | None = None) -> None:
        self.budget_s = budget_s
        self.failures = dict(failures)
        self.notes = dict(notes or {})
        late = sorted(r for r, w in failures.items() if w.startswith(ANALYSIS_OVER_BUDGET))
        others = {r: w.partition("\n")[0] for r, w in failures.items() if r not in late}
        text = (f"the twin's analysis (fits and output check, past every collective) on rank(s) "
                f"{', '.join(map(str, late))} did not end within its budget of {budget_s:g} s "
                "after the run's timeout; the runner itself had finished there")
        if others:
            text += "; also: " + "; ".join(f"rank {r}: {w}" for r, w in sorted(others.items()))
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (AnalysisOverBudget, (self.budget_s, self.failures, self.notes))


__all__ = ["ANALYSIS_OVER_BUDGET", "AnalysisOverBudget", "PoolError", "PoolStartupError", "RankFailure",
           "startup_cause"]
