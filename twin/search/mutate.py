"""Mutation analysis of the runners' decision logic: the mutants, the kill
report, and `run_mutation` (the `moe-twin mutate` verb).

Mutants are generated in twin/mutate_gen.py (of `fixed`, `M_*`, and of
`sglang`, `S_*`) and published here, so rank and worker processes
re-importing `twin.search.mutate:<name>` get the same class; `MUTANTS` is the
registry. Two ways to kill them:

- `verify` (the default): each mutant is enumerated over a decision space
  beside its reference runner (twin/mutate_kill.py): killed when it shows a
  finding the reference's own verify of the space does not have; a survivor
  is equivalent or a blind spot by comparing both runs class by class (a
  priority change that is never slower is equivalent: decided by simulating
  both). With the pool check, a survivor equivalent on the space is also
  compared on generated scenarios, the catalog and the corner grid
  (twin/mutate_equiv.py), where the space does not reach.
- `search`: explore with a Hypothesis budget per mutant (budget luck).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scenarios.runners import MoERunner
from twin.search import mutate_gen
from twin.search.mutate_equiv import behaviour, check_equivalence, equivalence_pool
from twin.search.mutate_gen import INFO, MUTANTS, MutantInfo

mutate_gen.publish(globals(), __name__)

# Hand-checked reasons for mutants that cannot change behaviour; the report
# still verifies them against the reference's traces before using them.
_NOOP_TRIM_HIDDEN = (
    "trims to `hidden` only where the result is already `hidden` wide: without padding the "
    "routed output has the routed width and a latent one is up-projected to hidden, so the "
    "trim added or removed is a no-op view"
)
_ONE_RANK = (
    "moe_tp and moe_ep are both 1 only with a single rank, where the tp all-reduce it adds "
    "is over a one-rank group (the identity)"
)
KNOWN_EQUIVALENT: dict[str, str] = {
    "M_always_post_trim_width": _NOOP_TRIM_HIDDEN,
    "M_dropcond_post_trim_width_2": _NOOP_TRIM_HIDDEN,
    "M_dropcond_post_trim_width_3": _NOOP_TRIM_HIDDEN,
    "M_dropcond_post_trim_width_4": _NOOP_TRIM_HIDDEN,
    "M_dropcond_pre_trim_width_1": (
        "without padding the routed output already has the routed width, so the early trim "
        "it adds keeps the shape (a no-op view)"
    ),
    "M_dropcond_fused_output_is_reduced_2": (
        "the kernel exists only with all-to-all kernels; its one non-reducing backend "
        "(allgather_reducescatter) is sequence parallel whenever tp > 1 (no final or shared "
        "reduce either way), and with tp = 1 every reduction it skips is over a one-rank tp group"
    ),
    "M_dropcond_needs_final_reduce_2": _ONE_RANK,
    "M_dropcond_needs_pre_transform_reduce_5": _ONE_RANK,
    "M_dropcond_needs_pre_transform_reduce_1": (
        "transform_nonlinear implies has_transform (the spec rejects a non-linear transform "
        "without latent_dim)"
    ),
    "M_dropcond_routed_output_padded_1": (
        "without padding every trim it adds keeps the shape (the routed output already has "
        "the routed width) and the declared width is the kernel width = hidden"
    ),
    "M_dropcond_order_mk_1": (
        "without all-to-all kernels the effective backend is `none` or allgather_reducescatter, "
        "neither supports async shared overlap, so the rule fires exactly where it did"
    ),
}
KILL_MODES = ("verify", "search")
RUNNER_CHOICES = ("fixed", "sglang", "all")


@dataclass
class MutantResult:
    mutant: str
    description: str
    killed: bool
    signature: str | None = None
    verdict: str | None = None
    equivalent: bool | None = None
    reason: str = ""
    examples: int = 0
    scenario: str | None = None  # summary line of the scenario that killed it
    # killed; equivalent; blind_spot (differs, no hazard predicted anywhere);
    # missed (search: the twin predicts a hazard on a pool scenario, the search
    # did not reach it); outside_space (verify: the same on every class of the
    # space, different on a pool scenario the space does not contain); with
    # confirm: refuted (the real run contradicts the prediction) or
    # unconfirmed (INCONCLUSIVE, e.g. a race the CPU stand-ins cannot provoke)
    status: str = "survived"
    runner: str = "fixed"  # the reference runner mutated
    classes: int = 0  # verify: classes enumerated (up to the kill)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mutant": self.mutant,
            "description": self.description,
            "killed": self.killed,
            "signature": self.signature,
            "verdict": self.verdict,
            "equivalent": self.equivalent,
            "reason": self.reason,
            "examples": self.examples,
            "scenario": self.scenario,
            "status": self.status,
            "runner": self.runner,
            "classes": self.classes,
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass
class MutationReport:
    results: list[MutantResult]
    budget: int
    confirm: bool
    elapsed_s: float = 0.0
    equivalence_scenarios: int = 0
    kill: str = "search"
    space: str | None = None
    reference_findings: dict[str, list[str]] | None = None  # runner -> its verify signatures

    @property
    def killed(self) -> int:
        return sum(r.killed for r in self.results)

    @property
    def kill_rate(self) -> float:
        return self.killed / len(self.results) if self.results else 0.0

    @property
    def survivors(self) -> list[MutantResult]:
        return [r for r in self.results if not r.killed]

    def to_dict(self) -> dict[str, Any]:
        equivalent = sum(1 for r in self.results if r.equivalent)
        killable = len(self.results) - equivalent
        return {
            "mutants": len(self.results),
            "killed": self.killed,
            "kill_rate": round(self.kill_rate, 4),
            "equivalent": equivalent,
            "blind_spots": sum(1 for r in self.results if r.status == "blind_spot"),
            "missed": sum(1 for r in self.results if r.status == "missed"),
            "outside_space": sum(1 for r in self.results if r.status == "outside_space"),
            "refuted": sum(1 for r in self.results if r.status == "refuted"),
            "unconfirmed": sum(1 for r in self.results if r.status == "unconfirmed"),
            "kill_rate_non_equivalent": round(self.killed / killable, 4) if killable else None,
            "budget": self.budget,
            "confirm": self.confirm,
            "equivalence_scenarios": self.equivalence_scenarios,
            "elapsed_s": round(self.elapsed_s, 3),
            "kill": self.kill,
            "space": self.space,
            "reference_findings": self.reference_findings,
            "results": [r.to_dict() for r in self.results],
        }


def select(only: list[str] | None, runner: str = "all") -> list[str]:
    """Mutant names of `runner` ("fixed", "sglang" or "all") matching the globs."""
    import fnmatch

    from twin.search.explore import ExploreInputError

    if runner not in RUNNER_CHOICES:
        raise ExploreInputError(f"--runner: one of {', '.join(RUNNER_CHOICES)}, got {runner!r}")
    names = [n for n in MUTANTS if runner == "all" or INFO[n].runner == runner]
    if only:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(n, f"M_{p}")
                                         or fnmatch.fnmatch(n, f"S_{p}") for p in only)]
        if not names:
            raise ExploreInputError(f"--mutant: no mutant matches {', '.join(only)} "
                                    f"(e.g. {', '.join(list(MUTANTS)[:3])})")
    return names


def run_mutation(
    budget: int = 200,
    confirm: bool = False,
    seed: int = 0,
    only: list[str] | None = None,
    equivalence_examples: int = 300,
    progress: Callable[[str], None] | None = None,
    timeout_s: float = 60.0,
    kill: str = "search",
    space: Any = "default",
    max_world: int | None = None,
    jobs: int = 1,
    runner: str = "fixed",
    pool: bool = True,
) -> MutationReport:
    """The kill report of the selected mutants (see the module docstring).
    `kill="search"` explores each mutant with `budget` examples; `"verify"`
    enumerates `space` (`jobs` mutants at once)."""
    from twin.search.explore import ExploreInputError

    if kill not in KILL_MODES:
        raise ExploreInputError(f"--kill: one of {', '.join(KILL_MODES)}, got {kill!r}")
    names = select(only, runner)
    if kill == "verify":
        from twin.search.mutate_run import run_verify_mutation

        return run_verify_mutation(names, space, max_world, jobs, equivalence_examples if pool else None,
                                   seed, progress)
    from twin.search.mutate_run import run_search_mutation

    return run_search_mutation(names, budget, confirm, seed, equivalence_examples, progress, timeout_s)


__all__ = [
    "INFO",
    "KILL_MODES",
    "KNOWN_EQUIVALENT",
    "MUTANTS",
    "MutantInfo",
    "MutantResult",
    "MutationReport",
    "MoERunner",
    "behaviour",
    "check_equivalence",
    "equivalence_pool",
    "run_mutation",
    "select",
]
