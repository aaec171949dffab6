"""`replay --real`: each historical regression's before runner and the fixed
runner checked on real ranks against the exact reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scenarios.loader import load
from scenarios.trace import Verdict
from twin.check.crosscheck import CheckResult, check
from twin.check.replay import CaseResult
from twin.check.verdicts import output_summary, wrong_ranks


@dataclass
class RealCaseResult(CaseResult):
    check_before: CheckResult | None = None
    check_fixed: CheckResult | None = None

    @property
    def fixed_real_ok(self) -> bool:
        """The fixed runner ran clean and every rank's output equals the reference."""
        return (not self.check_fixed.real.hazards and not wrong_ranks(self.check_fixed.real)
                and not any(v.verdict == Verdict.UNPREDICTED for v in self.check_fixed.verdicts))

    @property
    def expected_verdict(self) -> Verdict | None:
        vs = [v.verdict for v in self.check_before.verdicts if v.kind == self.case.expected]
        if not vs:
            return None
        for want in (Verdict.CONFIRMED, Verdict.INCONCLUSIVE, Verdict.REFUTED):
            if want in vs:
                return want
        return vs[0]

    @property
    def real_ok(self) -> bool:
        # R5 may honestly be INCONCLUSIVE on CPU stand-ins; anything REFUTED is not ok.
        v = self.expected_verdict
        return self.fixed_real_ok and v in (Verdict.CONFIRMED, Verdict.INCONCLUSIVE)

    def real_cells(self) -> list[Any]:
        from rich.text import Text

        v = self.expected_verdict
        style = {Verdict.CONFIRMED: "bold green", Verdict.INCONCLUSIVE: "yellow"}.get(v, "bold red")
        before = Text(v.value if v else "no verdict", style=style)
        fixed = Text("ok", style="green") if self.fixed_real_ok else Text("NOT CLEAN", style="bold red")
        return [before, fixed]

    def real_lines(self) -> list[str]:
        lines = []
        seen = set()
        for v in self.check_before.verdicts:
            key = (v.kind, v.verdict, v.reason)
            if key in seen:
                continue
            seen.add(key)
            ranks = sorted({x.rank for x in self.check_before.verdicts if (x.kind, x.verdict, x.reason) == key})
            lines.append(f"real: {v.kind} {v.verdict.value} (ranks {','.join(map(str, ranks))}): {v.reason}")
        if self.check_before.divergence:
            r, i, what = self.check_before.divergence
            lines.append(f"first divergence: rank {r} step {i}: {what}")
        lines.append(f"real before: {output_summary(self.check_before.real)}")
        fo = self.check_fixed.real
        ov = ", ".join(f"r{r} {v:.0f} us" for r, v in sorted(fo.overlap_us.items()) if v > 0)
        lines.append(f"real fixed: {'clean' if self.fixed_real_ok else 'NOT CLEAN'}; "
                     + output_summary(fo)
                     + (f"; measured shared/routed overlap {ov}" if ov else ""))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "verdicts": [v.to_dict() for v in self.check_before.verdicts],
            "fixed_real_ok": self.fixed_real_ok,
            "fixed_verdicts": [v.to_dict() for v in self.check_fixed.verdicts],
            "measured": {
                "before_outputs": {str(r): c for r, c in self.check_before.real.outputs.items()},
                "fixed_outputs": {str(r): c for r, c in self.check_fixed.real.outputs.items()},
                "before_overlap_us": {str(r): round(v, 1) for r, v in self.check_before.real.overlap_us.items()},
                "fixed_overlap_us": {str(r): round(v, 1) for r, v in self.check_fixed.real.overlap_us.items()},
            },
            "real_output": self.check_before.real.real_output(),
            "fixed_real_output": self.check_fixed.real.real_output(),
            "first_divergence": self.check_before.to_dict()["first_divergence"],
            "stand_ins": [n for n in self.check_before.real.notes if n.startswith("stand-in")],
        }


def replay_real(progress: Callable[[str], None] | None = None, timeout_s: float = 120.0) -> list[RealCaseResult]:
    from twin.check.replay import CASES

    out = []
    for case in CASES:
        s = load(case.scenario)
        if progress:
            progress(f"{case.regression} {case.runner} on {case.scenario}")
        fixed_check = check(s, "fixed", timeout_s=timeout_s, progress=progress)
        before_check = check(s, case.runner, timeout_s=timeout_s, progress=progress, fixed_real=fixed_check.real)
        out.append(RealCaseResult(case, before_check.sim, fixed_check.sim, before_check, fixed_check))
    return out


__all__ = ["RealCaseResult", "replay_real"]
