"""What `explore` keeps: findings, results, and their files under `--out`.

`findings.json` holds the runner, the total number of examples ever tried on
this `--out`, and every finding; one TOML per finding sits beside it. Saves
are incremental (the example count at least every SAVE_EVERY_S while the
search runs, and at every new finding), atomic (tmp + rename: a Ctrl-C or a
crash mid-write never leaves a truncated file) and merged under an exclusive
`fcntl` lock: a save adds the examples tried since this process's last save to
the count on disk and keeps the findings another explore on the same `--out`
wrote meanwhile, so concurrent searches never overwrite each other's counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios.spec import Scenario, ScenarioError, scenario_from_dict, scenario_to_toml

FINDINGS_FILE = "findings.json"
LOCK_FILE = ".findings.lock"
SAVE_EVERY_S = 1.0


class ExploreInputError(ValueError):
    """Bad input to explore/mutate: the CLI reports it as one line, exit 2."""


@dataclass
class Finding:
    """One distinct hazard signature and its minimal scenario."""

    kind: str
    signature: str
    detail: str  # the hazard text of the minimal scenario: the one-line explanation
    scenario: Scenario
    shrunk: bool = False
    scenario_file: str | None = None
    verdict: str | None = None  # CONFIRMED / REFUTED / INCONCLUSIVE / "ERROR: ..." (confirm)
    verdict_reason: str | None = None
    new: bool = True
    reproduces: bool = True  # still predicted by the current runner code (resume)
    found_at: int | None = None  # example index of this run that first showed it
    # The scenario the search met first (before shrinking): the real run falls
    # back to it when the minimal one is too small to measure (INCONCLUSIVE).
    found: Scenario | None = None
    decisions: dict[str, str] = field(default_factory=dict)
    step: int | None = None
    rank: int | None = None
    # Why it is not shrunk (a runner stopped by a budget takes the whole budget
    # on every scenario: shrinking would re-run it hundreds of times).
    unshrinkable: str | None = None
    # Which phase met it first: "enumeration" (verify's classes) or "search" (Hypothesis).
    found_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "signature": self.signature,
            "scenario_file": self.scenario_file,
            "minimal": self.scenario.to_dict(),
            "verdict": self.verdict,
            "detail": self.detail,
            "new": self.new,
            "shrunk": self.shrunk,
            "reproduces": self.reproduces,
            "summary": self.scenario.summary_line(),
            "decisions": dict(self.decisions),
            "verdict_reason": self.verdict_reason,
            "step": self.step,
            "rank": self.rank,
            "found": self.found.to_dict() if self.found is not None else None,
            "unshrinkable": self.unshrinkable,
            "found_by": self.found_by,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        scenario = scenario_from_dict(d["minimal"])
        return cls(
            kind=str(d["kind"]),
            signature=str(d["signature"]),
            detail=str(d.get("detail", "")),
            scenario=scenario,
            shrunk=bool(d.get("shrunk", False)),
            scenario_file=d.get("scenario_file"),
            verdict=d.get("verdict"),
            verdict_reason=d.get("verdict_reason"),
            new=False,
            decisions=dict(d.get("decisions") or {}),
            step=d.get("step"),
            rank=d.get("rank"),
            found=scenario_from_dict(d["found"]) if d.get("found") else None,
            unshrinkable=d.get("unshrinkable"),
            found_by=d.get("found_by"),
        )


@dataclass
class ExploreResult:
    runner: str
    examples: int
    findings: list[Finding]
    out: Path | None = None
    first_finding_at: int | None = None  # examples tried when the first new finding appeared
    elapsed_s: float = 0.0
    search_s: float = 0.0
    interrupted: bool = False  # Ctrl-C: what was collected until then
    # The enumeration phase (explore_enum.EnumerationSummary.to_dict), None when skipped.
    enumeration: dict[str, Any] | None = None

    @property
    def new_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.new]

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "examples": self.examples,
            "findings": [f.to_dict() for f in self.findings],
            "out": self.out.as_posix() if self.out is not None else None,
            "first_finding_at": self.first_finding_at,
            "elapsed_s": round(self.elapsed_s, 3),
            "interrupted": self.interrupted,
            "enumeration": self.enumeration,
        }


def prepare_out(out: Path) -> Path:
    """Create `out` and prove it is writable now, not after an hour of search."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ExploreInputError(f"--out {out}: not a writable directory ({exc.strerror or exc})") from None
    return out


def slug(signature: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", signature.lower()).strip("-") or "finding"


def write_atomic(path: Path, text: str) -> None:
    # tmp + rename: a Ctrl-C mid-write never leaves a truncated file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _better(mine: Finding, theirs: Finding) -> Finding:
    """Of two records of one signature, the one further along (shrunk, then judged)."""
    def progress(f: Finding) -> tuple[bool, bool]:
        return (f.shrunk, f.verdict is not None and not f.verdict.startswith("ERROR"))

    return theirs if progress(theirs) > progress(mine) else mine


class FindingStore:
    """findings.json + one TOML per finding under `out` (None: memory only)."""

    def __init__(self, out: Path | None, runner_spec: str) -> None:
        self.out = out
        self.runner = runner_spec
        self.examples_before = 0  # the count on disk when this search started
        self.findings: dict[str, Finding] = {}
        self._session = 0  # examples this process has tried
        self._saved_session = 0  # ... of which already added to the count on disk
        self._saved_at = time.monotonic()
        if out is not None:
            with self._locked():
                disk = self._read()
            if disk is not None:
                self.examples_before, items = disk
                for f in items:
                    self.findings[f.signature] = f

    @property
    def path(self) -> Path | None:
        return self.out / FINDINGS_FILE if self.out is not None else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.out is not None
        fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> tuple[int, list[Finding]] | None:
        path = self.path
        assert path is not None
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            runner = data["runner"]
            items = [Finding.from_dict(d) for d in data["findings"]]
            total = int(data.get("examples_total", 0))
        except (OSError, ValueError, KeyError, TypeError, ScenarioError) as exc:
            raise ExploreInputError(f"--out {self.out}: {FINDINGS_FILE} is unreadable ({exc}); "
                                    "use another --out or remove it") from None
        if runner != self.runner:
            raise ExploreInputError(f"--out {self.out} holds findings of runner {runner!r}, "
                                    f"not {self.runner!r}: use another --out")
        return total, items

    def tried(self, examples: int) -> None:
        """This process has now tried `examples` examples; saved at most every SAVE_EVERY_S."""
        self._session = examples
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        """Merge into findings.json under the lock: add the examples tried since
        the last save to the count on disk; keep findings written by others."""
        self._saved_at = time.monotonic()
        if self.out is None:
            return
        with self._locked():
            disk = self._read()
            total, theirs = disk if disk is not None else (0, [])
            total += self._session - self._saved_session
            merged = {f.signature: f for f in theirs}
            for sig, f in self.findings.items():
                merged[sig] = _better(f, merged[sig]) if sig in merged else f
            data = {
                "runner": self.runner,
                "examples_total": total,
                "findings": [f.to_dict() for f in merged.values()],
            }
            assert self.path is not None
            write_atomic(self.path, json.dumps(data, indent=2) + "\n")
            self._saved_session = self._session

    def write_scenario(self, f: Finding) -> None:
        if self.out is None:
            return
        name = f"{slug(f.signature)}.toml"
        head = (f"# moe-twin explore --runner {self.runner}: {f.signature}"
                f"{'' if f.shrunk else ' (not shrunk yet)'}\n"
                f"# {f.detail}\n")
        write_atomic(self.out / name, _comment_safe(head) + scenario_to_toml(f.scenario))
        f.scenario_file = (self.out / name).as_posix()


def _comment_safe(head: str) -> str:
    # Runner text in a comment: a newline would end it early, and TOML
    # comments may not hold control characters.
    text = re.sub("[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", head.rstrip("\n"))
    return "".join(f"{line if line.startswith('#') else '# ' + line}\n" for line in text.split("\n"))


__all__ = [
    "ExploreInputError",
    "ExploreResult",
    "FINDINGS_FILE",
    "Finding",
    "FindingStore",
    "prepare_out",
    "slug",
    "write_atomic",
]
