"""Search for hazards: Hypothesis drives `moe_scenarios`, the simulator is the oracle.

One search (`explore`) runs the runner under test on generated scenarios and
collects every distinct finding (hazard kind + step, + the order decision for
overlap hazards) without failing the test body. The budget is spent as a
series of short Hypothesis runs (ROUND_SIZE examples, fresh seeds derived from
`seed`) over one example database. Each run reports graded severity signals
with `hypothesis.target` (output coefficients far from 1, the LOST_OVERLAP
cost, how much shapes disagree, how many distinct hazards at once), so the
target phase climbs from a hazardous scenario towards worse ones, and the
database keeps the pareto front of those scenarios for the next run and for a
resumed search. Each distinct finding is then shrunk to a minimal scenario
(`hypothesis.find` on "this signature occurs", then a greedy field-by-field
`polish`) and written as a TOML file the other commands load. With `confirm`,
every finding is run on the real ranks (`twin.crosscheck.check`) and gets a
verdict.

Everything found is on disk as soon as it is found (`findings.json` plus one
TOML per finding under `out`), so Ctrl-C or a crash loses nothing; a second
run with the same `out` reuses the example database and the findings already
on disk, and marks which findings are new.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from scenarios.runners import MoERunner, RunnerLoadError, load_runner
from scenarios.spec import Scenario, ScenarioError, scenario_from_dict, scenario_to_toml
from scenarios.trace import Hazard, HazardKind, Trace

FINDINGS_FILE = "findings.json"
DB_DIR = "hypothesis-db"
DEFAULT_BUDGET = 300
DEFAULT_OUT = Path("explore-out")

# The decision that causes an overlap hazard is the shared-experts order, so it
# is part of the identity of such a finding (two different wrong orders are two
# bugs). For reduction and shape hazards the step already names the decision
# (final_all_reduce <-> needs_final_reduce, shared_all_reduce <->
# maybe_reduce_shared, custom_op_boundary <-> pre_trim_width); splitting those by
# an unrelated order would report one bug several times.
ORDER_DECISION = "shared_experts_order"
OVERLAP_KINDS = (HazardKind.LOST_OVERLAP, HazardKind.UNSAFE_OVERLAP)
FATAL_KINDS = (HazardKind.SHAPE_MISMATCH, HazardKind.RUNNER_ERROR, HazardKind.HANG)

# Methods the runner programs call on a runner (the interface a user's class
# must keep callable with the same arguments).
INTERFACE = (
    "process_weights",
    "backend_output_is_reduced",
    "is_sequence_parallel",
    "fused_output_is_reduced",
    "shared_experts_order",
    "shared_experts_sharded",
    "routed_inplace",
    "should_pad",
    "pre_trim_width",
    "post_trim_width",
    "shared_input",
    "maybe_reduce_shared",
    "needs_final_reduce",
    "final_reduce",
    "model_forward",
    "forward",
    "routed_path",
)


class ExploreInputError(ValueError):
    """Bad input to explore/mutate: the CLI reports it as one line, exit 2."""


# ---------------------------------------------------------------- findings


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
        }


@dataclass
class Progress:
    """What the search is doing, for a progress display (never on stdout)."""

    phase: str  # "search", "shrink", "confirm", "done"
    examples: int
    budget: int
    findings: int
    new_findings: int
    confirmed: int
    message: str = ""


ProgressFn = Callable[[Progress], None]


# ---------------------------------------------------------------- signatures and signals


def finding_signature(h: Hazard, trace: Trace) -> str:
    """Identity of a finding: kind@step, plus the order decision for overlap hazards."""
    sig = h.signature
    if h.kind in OVERLAP_KINDS:
        order = trace.decisions.get(ORDER_DECISION)
        if order:
            sig += f"[{ORDER_DECISION}={order}]"
    return sig


def trace_findings(trace: Trace) -> dict[str, Hazard]:
    """The first hazard of each signature, rank 0 first (the one shown to users)."""
    out: dict[str, Hazard] = {}
    for h in sorted(trace.hazards, key=lambda h: (h.rank, h.step)):
        out.setdefault(finding_signature(h, trace), h)
    return out


def target_signals(trace: Trace) -> dict[str, float]:
    """Graded observations for `hypothesis.target`: how deep into a hazard a run is.

    Output coefficients far from 1 (a reduction applied twice, or missing),
    the predicted LOST_OVERLAP cost relative to the layer, how much shapes
    disagree where a rank failed, and how many distinct hazards occur at once.
    All are 0 on a clean run."""
    coef_err = 0.0
    for coeffs in trace.outputs.values():
        for c in coeffs.values():
            coef_err = max(coef_err, min(abs(c - 1.0), 16.0))
    if not trace.hazards:
        return {"coefficient_error": coef_err, "lost_overlap_cost": 0.0,
                "shape_disagreement": 0.0, "hazard_signatures": 0.0}
    latency = max(trace.latency_us, 1e-9)
    lost = sum(h.cost_us or 0.0 for h in trace.hazards if h.kind == HazardKind.LOST_OVERLAP)
    failed_ranks = {h.rank for h in trace.hazards if h.kind in FATAL_KINDS}
    shape = len(failed_ranks) / max(trace.world, 1)
    for steps in trace.steps.values():
        for st in steps:
            if st.error and st.in_shapes and st.out_shape:
                widths = [s[-1] for s in st.in_shapes if s] + [st.out_shape[-1]]
                shape += (max(widths) - min(widths)) / max(max(widths), 1)
    return {
        "coefficient_error": coef_err,
        "lost_overlap_cost": lost / latency,
        "shape_disagreement": shape,
        "hazard_signatures": float(len(trace_findings(trace))),
    }


def simulate_safe(scenario: Scenario, runner_cls: type[MoERunner]) -> Trace:
    """simulate(); a simulator crash on this scenario becomes a finding, not a lost search."""
    from sim import simulate

    try:
        return simulate(scenario, runner_cls)
    except Exception as exc:  # noqa: BLE001 - reported as a RUNNER_ERROR finding
        trace = Trace(source="sim", scenario=scenario.name, runner=runner_cls.__name__,
                      world=scenario.world)
        trace.hazards.append(Hazard(HazardKind.RUNNER_ERROR, 0, "simulate", 0,
                                    f"the simulator raised {type(exc).__name__}: {exc}"))
        return trace


# ---------------------------------------------------------------- input validation


def resolve_runner(spec: str) -> tuple[type[MoERunner], str]:
    """Load and check a runner spec; returns the class and the spec to write in
    TOML files (a `file.py:Class` path made absolute so the file loads from anywhere)."""
    if not isinstance(spec, str) or not spec:
        raise ExploreInputError("--runner: a preset name or module:Class is required")
    cls = load_runner(spec)
    check_interface(cls, spec)
    module, sep, attr = spec.rpartition(":")
    if sep and module.endswith(".py"):
        spec = f"{Path(module).resolve().as_posix()}:{attr}"
    return cls, spec


def check_interface(cls: type[MoERunner], spec: str) -> None:
    """Every method the programs call must still accept the base class's arguments."""
    for name in ("__init__", *INTERFACE):
        base = getattr(MoERunner, name)
        mine = getattr(cls, name, None)
        if not callable(mine):
            raise RunnerLoadError(
                f"runner {spec!r} does not implement the runner interface: {name} is not a method")
        if mine is base:
            continue
        base_sig = inspect.signature(base)
        try:
            sig = inspect.signature(mine)
        except (TypeError, ValueError):
            continue  # builtins / C callables: nothing to check
        try:
            sig.bind(*[None] * len(base_sig.parameters))
        except TypeError:
            raise RunnerLoadError(
                f"runner {spec!r} does not implement the runner interface: "
                f"{cls.__name__}.{name}{sig} cannot be called as {name}{base_sig}"
            ) from None


def check_budget(budget: Any, flag: str = "--budget") -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ExploreInputError(f"{flag}: must be a positive number of examples, got {budget!r}")
    return budget


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


# ---------------------------------------------------------------- disk


def _slug(signature: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", signature.lower()).strip("-") or "finding"


def _write_atomic(path: Path, text: str) -> None:
    # tmp + rename: a Ctrl-C mid-write never leaves a truncated findings file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FindingStore:
    """findings.json + one TOML per finding under `out` (None: memory only)."""

    def __init__(self, out: Path | None, runner_spec: str) -> None:
        self.out = out
        self.runner = runner_spec
        self.examples_before = 0
        self.findings: dict[str, Finding] = {}
        if out is not None:
            self._load()

    @property
    def path(self) -> Path | None:
        return self.out / FINDINGS_FILE if self.out is not None else None

    def _load(self) -> None:
        path = self.path
        assert path is not None
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text())
            runner = data["runner"]
            items = [Finding.from_dict(d) for d in data["findings"]]
        except (OSError, ValueError, KeyError, TypeError, ScenarioError) as exc:
            raise ExploreInputError(f"--out {self.out}: {FINDINGS_FILE} is unreadable ({exc}); "
                                    "use another --out or remove it") from None
        if runner != self.runner:
            raise ExploreInputError(f"--out {self.out} holds findings of runner {runner!r}, "
                                    f"not {self.runner!r}: use another --out")
        self.examples_before = int(data.get("examples_total", 0))
        for f in items:
            self.findings[f.signature] = f

    def save(self, examples_total: int) -> None:
        if self.out is None:
            return
        data = {
            "runner": self.runner,
            "examples_total": examples_total,
            "findings": [f.to_dict() for f in self.findings.values()],
        }
        assert self.path is not None
        _write_atomic(self.path, json.dumps(data, indent=2) + "\n")

    def write_scenario(self, f: Finding) -> None:
        if self.out is None:
            return
        name = f"{_slug(f.signature)}.toml"
        head = (f"# moe-twin explore --runner {self.runner}: {f.signature}"
                f"{'' if f.shrunk else ' (not shrunk yet)'}\n"
                f"# {f.detail}\n")
        _write_atomic(self.out / name, head + scenario_to_toml(f.scenario))
        f.scenario_file = (self.out / name).as_posix()


# ---------------------------------------------------------------- shrinking


def _candidates(s: Scenario) -> Iterator[dict[str, Any]]:
    """Simpler variants of s, biggest simplifications first (invalid ones are skipped)."""
    p, m, rt, w = s.parallel, s.model, s.runtime, s.workload
    for tp in (1, 2, 4):
        if tp < p.tp:
            yield {"parallel.tp": tp}
    for dp in (1, 2):
        if dp < p.dp:
            yield {"parallel.dp": dp}
    if p.ep:
        yield {"parallel.ep": False, "parallel.eplb": False, "parallel.backend": "allgather_reducescatter"}
    if p.eplb:
        yield {"parallel.eplb": False}
    if p.backend != "allgather_reducescatter":
        yield {"parallel.backend": "allgather_reducescatter"}
    if p.version != "newest":
        yield {"parallel.version": "newest"}
    if m.num_shared_experts > 1:
        yield {"model.num_shared_experts": 1}
    if m.num_shared_experts:
        yield {"model.num_shared_experts": 0, "model.shared_intermediate": None}
    if m.latent_dim is not None:
        pad = (m.moe_hidden - m.latent_dim) if m.moe_hidden else 0
        yield {"model.latent_dim": None, "model.transform_nonlinear": False,
               "model.moe_hidden": (m.hidden + pad) if pad else None}
    if m.transform_nonlinear:
        yield {"model.transform_nonlinear": False}
    if m.moe_hidden is not None:
        yield {"model.moe_hidden": None}
        if m.moe_hidden > m.routed_width + 8:
            yield {"model.moe_hidden": m.routed_width + 8}
    # Floors are the strategy's own small end (hidden 32, 2 experts, 8 x world
    # intermediate): a minimal scenario is one the strategy could have drawn.
    for hidden in (32, 8 * (m.hidden // 16), m.hidden - 8):
        if 32 <= hidden < m.hidden:
            change: dict[str, Any] = {"model.hidden": hidden}
            if m.latent_dim is None and m.moe_hidden is not None:
                change["model.moe_hidden"] = hidden + (m.moe_hidden - m.hidden)
            yield change
    if m.latent_dim is not None and m.latent_dim > 8:
        change = {"model.latent_dim": 8}
        if m.moe_hidden is not None:
            change["model.moe_hidden"] = 8 + (m.moe_hidden - m.latent_dim)
        yield change
    for e in sorted({2, s.moe_ep, 2 * s.moe_ep, m.num_experts // 2}):
        if 2 <= max(e, m.top_k) < m.num_experts:
            yield {"model.num_experts": max(e, m.top_k)}
    if m.top_k > 1:
        yield {"model.top_k": 1}
    if 8 * s.world < m.moe_intermediate:
        yield {"model.moe_intermediate": 8 * s.world}
    if m.shared_intermediate is not None:
        yield {"model.shared_intermediate": None}
    if m.routed_scaling_factor != 1.0:
        yield {"model.routed_scaling_factor": 1.0}
    if rt.platform != "cpu":
        yield {"runtime.platform": "cpu", "runtime.aux_stream": False}
    if rt.aux_stream:
        yield {"runtime.aux_stream": False}
    if rt.token_threshold != 256:
        yield {"runtime.token_threshold": 256}
    for t in (1, 2, w.tokens // 2, w.tokens - 1):
        if 1 <= t < w.tokens:
            yield {"workload.tokens": t}
    if w.seed:
        yield {"workload.seed": 0}
    if w.skew:
        yield {"workload.skew": 0.0}


def polish(s: Scenario, keep: Callable[[Scenario], bool], max_tries: int = 400) -> Scenario:
    """Greedy field-by-field simplification while `keep` holds (to a fixpoint).

    Hypothesis shrinks within the strategy's draw order; this pass also tries
    cross-field simplifications (fewer ranks with the experts still dividing,
    no latent with the padding kept) that the draw order cannot express."""
    tries = 0
    changed = True
    while changed and tries < max_tries:
        changed = False
        for change in _candidates(s):
            tries += 1
            try:
                cand = s.with_(**change)
            except (ScenarioError, ValueError, TypeError):
                continue
            if keep(cand):
                s, changed = cand, True
                break
            if tries >= max_tries:
                break
    return s


def shrink(
    runner_cls: type[MoERunner],
    signature: str,
    start: Scenario,
    strategy_kwargs: dict[str, Any],
    seed: int | None = None,
    max_examples: int = 300,
) -> Scenario:
    """A minimal scenario on which `signature` occurs: `hypothesis.find` over the
    same strategy, then `polish`; `start` (the scenario the search found) is the
    fallback when find does not meet the signature within its budget."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.errors import NoSuchExample

    from scenarios.strategies import moe_scenarios

    def occurs(s: Scenario) -> bool:
        return signature in trace_findings(simulate_safe(s, runner_cls))

    best = start
    try:
        best = find(
            moe_scenarios(**strategy_kwargs),
            occurs,
            settings=settings(
                settings.get_profile("default"),
                max_examples=max_examples, database=None, deadline=None,
                phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
                suppress_health_check=list(HealthCheck),
            ),
            random=Random(seed if seed is not None else 0),
        )
    except NoSuchExample:
        pass
    best = polish(best, occurs)
    return best.with_(name=f"explore-{_slug(signature)}", runner=start.runner)


# ---------------------------------------------------------------- confirmation


VERDICT_RANK = {"CONFIRMED": 0, "INCONCLUSIVE": 1, "REFUTED": 2}


def _verdict(f: Finding, scenario: Scenario, runner_spec: str, timeout_s: float,
             step: int | None, rank: int | None) -> tuple[str, str | None]:
    from twin.crosscheck import check

    try:
        result = check(scenario, runner_spec, timeout_s=timeout_s)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a real run that cannot be done is a verdict too
        return f"ERROR: {type(exc).__name__}: {exc}".splitlines()[0], None
    items = [v for v in result.verdicts if v.kind == f.kind]
    if not items:
        others = "; ".join(f"{v.kind} {v.verdict.value}" for v in result.verdicts)
        return f"ERROR: the cross-check gave no verdict for {f.kind}", others or None
    # The verdict at the finding's own step and rank, else the most positive one.
    exact = [v for v in items if v.step == step and v.rank == rank]
    best = exact[0] if exact else min(items, key=lambda v: VERDICT_RANK.get(v.verdict.value, 3))
    return best.verdict.value, best.reason


def confirm_finding(f: Finding, runner_spec: str, timeout_s: float = 60.0) -> None:
    """Run the minimal scenario on the real ranks; attach the verdict for the finding's kind.

    A minimal scenario can be too small to measure (e.g. overlap of microsecond
    kernels on CPU threads): an INCONCLUSIVE verdict there is retried on the
    scenario the search found, and the reason says which scenario decided."""
    f.verdict, f.verdict_reason = _verdict(f, f.scenario, runner_spec, timeout_s, f.step, f.rank)
    if f.verdict != "INCONCLUSIVE" or f.found is None or f.found == f.scenario:
        return
    h = trace_findings(simulate_safe(f.found, load_runner(runner_spec))).get(f.signature)
    if h is None:
        return
    verdict, reason = _verdict(f, f.found, runner_spec, timeout_s, h.step, h.rank)
    if verdict in ("CONFIRMED", "REFUTED"):
        f.verdict_reason = (f"{reason} (on the scenario the search found, "
                            f"{f.found.summary_line()}; the minimal one was INCONCLUSIVE: "
                            f"{f.verdict_reason})")
        f.verdict = verdict


# ---------------------------------------------------------------- the search


class _Stop(Exception):
    """Raised in the test body to end the search at the first finding (mutate)."""


def _stop() -> None:
    # One raise site: Hypothesis tells failures apart by where they were raised,
    # and two sites would look like a flaky test.
    raise _Stop


def _db_key(runner_spec: str, strategy_kwargs: dict[str, Any]) -> bytes:
    text = json.dumps({"runner": runner_spec, "strategy": strategy_kwargs}, sort_keys=True)
    return hashlib.sha384(f"moe-twin explore {text}".encode()).digest()


def _rounds(budget: int, size: int | None) -> list[int]:
    if not size or size >= budget:
        return [budget]
    return [size] * (budget // size) + ([budget % size] if budget % size else [])


# Examples per Hypothesis run. After its first 10 examples a run mutates each
# new example up to 5 times (copying choices between spans), so a long run
# spends most of its budget on near-duplicates; a series of short runs from
# fresh seeds over one database met the hard regions about twice as often for
# the same number of examples (benchmarks/bench_explore.py, "round size").
ROUND_SIZE = 20


def explore(
    runner: str,
    budget: int = DEFAULT_BUDGET,
    seed: int | None = None,
    out: Path | str | None = DEFAULT_OUT,
    confirm: bool = False,
    progress: ProgressFn | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    do_shrink: bool = True,
    stop_on_first: bool = False,
    targeting: bool = True,
    round_size: int | None = ROUND_SIZE,
    timeout_s: float = 60.0,
) -> ExploreResult:
    """Search `runner` for hazards over generated scenarios; see the module docstring.

    `out=None` keeps everything in memory (no database, no files)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings, target
    from hypothesis import seed as hseed
    from hypothesis.database import DirectoryBasedExampleDatabase, InMemoryExampleDatabase

    from scenarios.strategies import moe_scenarios

    t0 = time.perf_counter()
    budget = check_budget(budget)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ExploreInputError(f"--seed: must be an integer, got {seed!r}")
    runner_cls, spec = resolve_runner(runner)
    out_path = prepare_out(Path(out)) if out is not None else None
    store = FindingStore(out_path, spec)
    kwargs = dict(strategy_kwargs or {})
    kwargs["runner"] = spec
    say = progress or (lambda _p: None)

    # Findings from an earlier run: still there with today's runner code?
    for f in store.findings.values():
        f.reproduces = f.signature in trace_findings(simulate_safe(f.scenario, runner_cls))

    state: dict[str, Any] = {"examples": 0, "first": None, "confirmed": 0, "stopped": False}

    def report(phase: str, message: str = "") -> None:
        new = sum(1 for f in store.findings.values() if f.new)
        say(Progress(phase, state["examples"], budget, len(store.findings), new,
                     state["confirmed"], message))

    # The body never fails except to stop early, so there is nothing to shrink
    # in-run; findings are shrunk afterwards, one signature at a time.
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if targeting:
        phases.append(Phase.target)
    db = (DirectoryBasedExampleDatabase(str(out_path / DB_DIR)) if out_path is not None
          else InMemoryExampleDatabase())

    def body(s: Scenario) -> None:
        if state["stopped"]:
            # Sticky: Hypothesis replays the "failing" example before raising it.
            _stop()
        state["examples"] += 1
        trace = simulate_safe(s, runner_cls)
        if targeting:
            for label, value in target_signals(trace).items():
                # Only positive observations: a target observed at 0 on every
                # clean run would make the optimiser spend budget climbing a
                # flat plateau (measured: fewer findings per example).
                if value > 0:
                    target(value, label=label)
        fresh = ""
        for sig, h in trace_findings(trace).items():
            if sig in store.findings:
                continue
            named = s.with_(name=f"explore-{_slug(sig)}", summary=str(h))
            f = Finding(h.kind.value, sig, str(h), named, found_at=state["examples"],
                        decisions=dict(trace.decisions), step=h.step, rank=h.rank, found=named)
            store.findings[sig] = f
            if state["first"] is None:
                state["first"] = state["examples"]
            # On disk now: an interrupted search keeps it (shrunk later, on resume).
            store.write_scenario(f)
            store.save(store.examples_before + state["examples"])
            fresh = f"new finding {sig}"
        report("search", fresh)
        if fresh and stop_on_first:
            state["stopped"] = True
            _stop()

    rounds = _rounds(budget, round_size)
    for i, n in enumerate(rounds):
        search = given(moe_scenarios(**kwargs))(body)
        if seed is not None:
            # Seed first: @seed also switches the database off, and the
            # settings applied after it switch it back on (resume needs it).
            search = hseed(seed * 1000 + i)(search)
        search = settings(
            settings.get_profile("default"),  # not the caller's profile (CI derandomize...)
            max_examples=n, database=db, deadline=None, phases=phases,
            suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
            print_blob=False, report_multiple_bugs=False,
        )(search)
        # Scope the database entries by runner and strategy (the default key is
        # the source of `body`, the same for every runner).
        search._hypothesis_internal_database_key = _db_key(spec, kwargs)  # type: ignore[attr-defined]
        try:
            search()
        except _Stop:
            break
    search_s = time.perf_counter() - t0
    store.save(store.examples_before + state["examples"])

    if do_shrink:
        for f in store.findings.values():
            if f.shrunk or not f.reproduces:
                continue
            report("shrink", f"shrinking {f.signature}")
            small = shrink(runner_cls, f.signature, f.scenario, kwargs, seed=seed,
                           max_examples=max(100, min(budget, 500)))
            h = trace_findings(simulate_safe(small, runner_cls)).get(f.signature)
            if h is None:  # the runner changed since the finding was made
                f.reproduces = False
                continue
            f.scenario = small.with_(summary=str(h))
            f.detail, f.step, f.rank, f.shrunk = str(h), h.step, h.rank, True
            store.write_scenario(f)
            store.save(store.examples_before + state["examples"])

    if confirm:
        for f in store.findings.values():
            if not f.reproduces or (f.verdict is not None and not f.verdict.startswith("ERROR")):
                continue
            report("confirm", f"real run of {f.signature}")
            confirm_finding(f, spec, timeout_s=timeout_s)
            if f.verdict == "CONFIRMED":
                state["confirmed"] += 1
            store.save(store.examples_before + state["examples"])
            report("confirm", f"{f.signature}: {f.verdict}")

    findings = sorted(store.findings.values(), key=lambda f: (not f.new, f.signature))
    report("done")
    return ExploreResult(spec, state["examples"], findings, out_path, state["first"],
                         time.perf_counter() - t0, search_s)


__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_OUT",
    "ExploreInputError",
    "ExploreResult",
    "Finding",
    "Progress",
    "check_budget",
    "check_interface",
    "confirm_finding",
    "explore",
    "finding_signature",
    "polish",
    "resolve_runner",
    "shrink",
    "simulate_safe",
    "target_signals",
    "trace_findings",
]
