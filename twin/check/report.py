"""Human-readable reports (rich) for the CLI. JSON shapes live with the data."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from scenarios.spec import Scenario, scenario_to_toml
from scenarios.trace import Hazard, HazardKind, Trace
from twin.textsafe import printable

# Every string here that comes from a scenario file or from runner code (names,
# summaries, step names, decisions, exception messages, notes) goes into a Text
# through `printable`: never parsed as markup, control characters shown escaped.

KIND_STYLE = {
    "DOUBLE_REDUCTION": "bold red",
    "MISSING_REDUCTION": "bold red",
    "SHAPE_MISMATCH": "bold magenta",
    "LOST_OVERLAP": "bold yellow",
    "REDUNDANT_COLLECTIVE": "bold yellow",
    "UNSAFE_OVERLAP": "bold red",
    "HANG": "bold red",
    "RUNNER_ERROR": "bold red",
    "MISSING_STREAM": "bold red",
    "WRONG_TOKENS": "bold red",
    "WRONG_INPUT": "bold red",
    "WRONG_OUTPUT": "bold red",
}


def hazard_lines(hazards: Iterable[Hazard], fold_ranks: bool = True) -> list[Text]:
    """One line per hazard; identical hazards on several ranks are folded."""
    groups: dict[tuple[str, int, str, str], list[int]] = {}
    for h in hazards:
        detail = h.detail
        if h.cost_us is not None:
            detail += f" [+{h.cost_us:.1f} us]"
        key = (h.kind.value, h.step, h.step_name, detail) if fold_ranks else (h.kind.value, h.step, h.step_name, f"{detail}#{h.rank}")
        groups.setdefault(key, []).append(h.rank)
    lines = []
    for (kind, step, name, detail), ranks in groups.items():
        detail = detail.split("#")[0]
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, sorted(ranks)))}"
        t = Text()
        t.append(kind, style=KIND_STYLE.get(kind, "bold"))
        t.append(f" at step {step} {printable(name, one_line=True)} ({who}): {printable(detail, one_line=True)}")
        lines.append(t)
    return lines


def scenario_panel(s: Scenario, engine: dict[str, Any] | None = None) -> RenderableType:
    """`engine`: the runner's dispatch layout where it differs from vLLM's
    (`engine_layout`): the derived row prints the engine's values."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("scenario", Text(printable(s.name)))
    if s.summary:
        t.add_row("summary", Text(printable(s.summary)))
    t.add_row("shape", Text(printable(s.summary_line())))
    values = s.derived()
    if engine is not None:
        values.update((k, v) for k, v in engine.items() if k in values)
    derived = ", ".join(f"{k}={v}" for k, v in values.items())
    t.add_row("derived", Text(printable(derived)))
    if engine is not None:
        t.add_row("layout", Text(printable(engine_line(s, engine))))
    for note in scenario_notes(s, engine):
        t.add_row("note", Text(printable(note)))
    return t


def engine_line(s: Scenario, engine: dict[str, Any]) -> str:
    """Which derived values are the engine's, and vLLM's where they differ."""
    vllm = s.derived()
    changed = [f"{k}={vllm[k]}" for k, v in engine.items() if k in vllm and vllm[k] != v]
    head = f"derived dispatch values follow {engine['engine']}'s layout"
    return head + (f" (vLLM's: {', '.join(changed)})" if changed else " (the same as vLLM's here)")


def scenario_notes(s: Scenario, engine: dict[str, Any] | None = None) -> list[str]:
    """One line per engine rule that changes the configuration as written."""
    notes = []
    backend = s.parallel.backend
    if s.parallel.backend_ignored:
        notes.append(f"backend {backend} ignored: needs parallel.ep")
    bw, kw = (s.backend_width, s.kernel_width) if engine is None else (engine["backend_kernel_width"],
                                                                       engine["kernel_width"])
    if bw is not None and bw != s.model.routed_width:
        notes.append(f"backend {backend} rounds the routed rows' width {s.model.routed_width} -> {bw}; "
                     f"the routed kernel works in width {kw}")
    if engine is not None and engine.get("library_width_note"):
        notes.append(engine["library_width_note"])
    return notes


def show_scenario(s: Scenario, engine: dict[str, Any] | None = None) -> RenderableType:
    return Group(scenario_panel(s, engine), Text(""), Text(printable(scenario_to_toml(s).rstrip())))


def outputs_table(trace: Trace) -> RenderableType:
    """Output coefficients per rank, ranks with identical coefficients folded:
    predicted for a simulated trace, least-squares fits of the real outputs
    for a real one (the title says which).
    Every expected source is listed (a missing one as 0); shards of one
    component with one coefficient are folded into a range (routed@ep0..ep63=1)."""
    groups: dict[tuple, list[int]] = {}
    for r, coeffs in sorted(trace.outputs.items()):
        groups.setdefault((tuple(sorted(coeffs.items())), unexplained(trace, r)), []).append(r)
    whose = "fitted to the real outputs" if trace.source == "real" else "predicted"
    t = Table(title=f"output coefficients, {whose} (1 = once, 0 = missing)", title_justify="left")
    t.add_column("ranks")
    t.add_column("sources")
    for (coeffs, residual), ranks in groups.items():
        if residual is not None:  # a least-squares fit of what is no combination of them: meaningless numbers
            t.add_row(",".join(map(str, ranks)), Text(
                f"not a combination of the expected sources (fit residual {residual:.2g}): no coefficients",
                style="bold red"))
            continue
        parts = Text("no rows (an idle DP rank)" if not coeffs else "")
        for i, (label, c) in enumerate(fold_sources(dict(coeffs))):
            if i:
                parts.append("  ")
            ok = isinstance(c, float) and math.isfinite(c) and abs(c - 1.0) < 1e-6
            parts.append(f"{printable(label)}={c:g}", style="green" if ok else "bold red")
        t.add_row(",".join(map(str, ranks)), parts)
    if not groups:
        t.add_row("-", "no fitted coefficients (no output, or no prediction to fit against)")
    return t


def unexplained(trace: Trace, rank: int) -> float | None:
    """The residual of a real rank's output fit when it explains nothing
    (the output is no combination of the sources), else None."""
    from twin.check.verdicts import RESIDUAL_OK

    fit = trace.outputs.get(rank)
    for st in reversed(trace.steps.get(rank, [])):
        if st.value is not None and st.value == fit:
            return st.residual if st.residual is not None and st.residual > RESIDUAL_OK else None
    return None


_LABEL = re.compile(r"^([^@\[]+)(?:@([A-Za-z]*)(\d*))?(\[tokens [^\]]+\])?$")


def fold_sources(coeffs: dict[str, float]) -> list[tuple[str, float]]:
    """[("routed@ep0", 1), ("routed@ep1", 1), ("shared@full", 0)] ->
    [("routed@ep0,ep1", 1), ("shared@full", 0)]: consecutive shards of one
    component (same foreign tokens) with the same coefficient are one entry."""
    rows: list[tuple[tuple[str, str, str, int], str, float]] = []
    for label, c in coeffs.items():
        m = _LABEL.match(label)
        if m is None or not m.group(3):  # "x", "shared@full": nothing to fold
            rows.append(((label, "", "", -1), label, c))
        else:
            rows.append(((m.group(1), m.group(4) or "", m.group(2), int(m.group(3))), label, c))
    rows.sort(key=lambda r: r[0])
    out: list[tuple[str, float]] = []
    run: list[tuple[tuple[str, str, str, int], str, float]] = []

    def flush() -> None:
        if len(run) == 1:
            out.append((run[0][1], run[0][2]))
        elif run:
            (comp, foreign, prefix, lo), _label, c = run[0]
            hi = run[-1][0][3]
            sep = ".." if len(run) > 2 else ","
            out.append((f"{comp}@{prefix}{lo}{sep}{prefix}{hi}{foreign}", c))
        run.clear()

    for key, label, c in rows:
        if run:
            prev, _pl, pc = run[-1]
            if not (key[3] >= 0 and key[:3] == prev[:3] and key[3] == prev[3] + 1 and _same_coef(c, pc)):
                flush()
        run.append((key, label, c))
    flush()
    return out


def _same_coef(a: float, b: float) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        return abs(a - b) < 1e-9
    return str(a) == str(b)


def _trace_report(s: Scenario, trace: Trace, timeline: RenderableType | None, real: bool,
                  engine: dict[str, Any] | None = None) -> RenderableType:
    """The body shared by `simulate` (predicted) and `run` (measured)."""
    parts: list[RenderableType] = [scenario_panel(s, engine), Text("")]
    if real:
        head = Text(f"real run of {printable(trace.runner)}", style="bold")
        skipped = any(n.startswith("real run skipped") for n in trace.notes)
        head.append("   not run (see the notes below)" if skipped else f"   measured latency {trace.latency_us:.0f} us")
    else:
        head = Text(f"runner {printable(trace.runner)}", style="bold")
        head.append(f"   latency {trace.latency_us:.1f} us")
    if trace.decisions:
        head.append("   " + printable(", ".join(f"{k}={v}" for k, v in trace.decisions.items())))
    parts.append(head)
    what = "problem(s) observed" if real else "hazard(s) predicted"
    if trace.hazards:
        parts.append(Text(f"{len(trace.hazards)} {what}:", style="bold"))
        parts.extend(hazard_lines(trace.hazards))
    elif real and trace.output_checks and all(c.correct for c in trace.output_checks.values()):
        parts.append(Text("no problem observed: every rank's output equals the exact reference, no exception",
                          style="bold green"))
    elif real:
        parts.append(Text("no problem observed, but the output was not judged against the reference", style="bold yellow"))
    else:
        parts.append(Text("no hazard predicted", style="bold green"))
    parts.append(Text(""))
    if real:
        parts.append(real_output_table(trace))
    parts.append(outputs_table(trace))
    if trace.overlap_us:
        ov = ", ".join(f"r{r} {v:.1f} us" for r, v in sorted(trace.overlap_us.items()))
        parts.append(Text(f"{'measured ' if real else ''}shared/routed overlap: {ov}"))
    if timeline is not None:
        parts.append(Text(""))
        parts.append(timeline)
    for note in trace.notes:
        parts.append(Text(printable(note), style="dim"))
    return Group(*parts)


def simulate_report(s: Scenario, trace: Trace, timeline: RenderableType | None,
                    engine: dict[str, Any] | None = None) -> RenderableType:
    return _trace_report(s, trace, timeline, real=False, engine=engine)


def real_report(s: Scenario, trace: Trace, timeline: RenderableType | None,
                engine: dict[str, Any] | None = None) -> RenderableType:
    return _trace_report(s, trace, timeline, real=True, engine=engine)


def replay_table(results: list[Any], real: bool = False, engine: str | None = None) -> RenderableType:
    """Summary: one row per regression (with `engine`: per release of the
    engine); details follow in replay_details."""
    from rich import box

    title = ("moe-twin replay: historical regressions, before vs fixed runner" if not engine
             else f"moe-twin replay --engine {engine}: seeds on releases")
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("case", no_wrap=True)
    t.add_column("expected", no_wrap=True)
    t.add_column("sim", no_wrap=True)
    if real:
        t.add_column("real", no_wrap=True)
    t.add_column("result", no_wrap=True)
    for res in results:
        c = res.case
        if res.skipped:
            t.add_row(*_skipped_row(res, real))
            continue
        hit = res.hit
        sim = Text("hit" if hit else "MISS", style="green" if hit else "bold red")
        sim.append("/")
        sim.append("ok" if not res.fixed.hazards else "ALARM", style="green" if not res.fixed.hazards else "bold red")
        row: list[Any] = [Text(printable(f"{c.regression} {c.runner}")), Text(c.expected, style=KIND_STYLE.get(c.expected, "bold")), sim]
        if real:
            before, fixed = res.real_cells()
            cell = Text()
            cell.append_text(before)
            cell.append("/")
            cell.append_text(fixed)
            row.append(cell)
        ok = res.caught if not real else res.caught and res.real_ok
        row.append(Text("CAUGHT" if ok else "MISSED", style="bold green" if ok else "bold red"))
        t.add_row(*row)
    t.caption = ("sim: hit = expected hazard predicted for the before runner, ok = none for the fixed runner"
                 + ("; real: verdict of the real run, ok = fixed runner measured clean" if real else "")
                 + ("; a release's hit also needs its routed coefficients and the twin's runner for the same "
                    "code to agree (expected clean: nothing predicted)" if engine else ""))
    t.caption_justify = "left"
    return t


def _skipped_row(res: Any, real: bool) -> list[Any]:
    """A case that cannot run here (release not installed, runner not loadable): reported, not a miss."""
    c = res.case
    row: list[Any] = [Text(printable(f"{c.regression} {c.runner}")),
                      Text(c.expected, style=KIND_STYLE.get(c.expected, "bold")), Text("-", style="dim")]
    if real:
        row.append(Text("-", style="dim"))
    row.append(Text("SKIPPED", style="yellow"))
    return row


def replay_details(results: list[Any], real: bool = False, width: int = 80) -> RenderableType:
    from twin.view.timeline import render_timeline

    parts: list[RenderableType] = []
    for r in results:
        c = r.case
        parts.append(Text(""))
        head = Text(printable(f"{c.regression} {c.runner}"), style="bold")
        head.append(printable(f" on {c.scenario}: {c.what}"))
        parts.append(head)
        if r.skipped:
            parts.append(Text(f"  skipped: {printable(r.skipped)}", style="yellow"))
            continue
        parts.append(Text("  sim before: ", style="dim"))
        for line in hazard_lines(r.before.hazards):
            parts.append(Text("    ").append_text(line))
        fixed = "clean" if not r.fixed.hazards else ", ".join(sorted(r.fixed.hazard_kinds()))
        parts.append(Text(f"  sim fixed:  {fixed}", style="green" if not r.fixed.hazards else "bold red"))
        for line in r.detail_lines():
            parts.append(Text(f"  {printable(line)}"))
        if real:
            for line in r.real_lines():
                parts.append(Text(f"  {printable(line)}"))
        # The same renderer as simulate/check/timeline: rank 0, before above fixed.
        parts.append(render_timeline(r.before, width=width, ranks=[0], compare=r.fixed, compact=True))
    return Group(*parts)


def agreement_line(result: Any, ran: bool = True) -> Text:
    """Sim vs real in one line; never "agree" while a rank's output is wrong
    and unaccounted for (the verdicts say which)."""
    from twin.check.verdicts import wrong_ranks

    if result.divergence:
        r, i, what = result.divergence
        return Text(f"first divergence: rank {r} step {i}: {printable(what)}", style="bold yellow")
    if not ran:
        return Text("no real run to compare with (see the notes below)", style="yellow")
    bad = wrong_ranks(result.real)
    ranks = ",".join(map(str, bad))
    if result.confirmed_as_predicted:
        return Text(f"prediction confirmed: the real output is wrong on ranks {ranks}, as predicted "
                    "(see the verdicts)", style="bold yellow")
    if not result.agree:
        what = f"real output wrong on ranks {ranks}" if bad else "verdicts disagree with the prediction"
        return Text(f"sim and real do NOT agree: {what} (see the verdicts)", style="bold red")
    steps = sum(len(v) for v in result.real.steps.values())
    fitted = sum(1 for v in result.real.steps.values() for st in v if st.value is not None)
    line = (f"sim and real agree at every step compared: op, shape and error at {steps} steps, "
            f"coefficients at the {fitted} fitted ones; every rank's output equals the exact reference")
    raced = sorted({h.rank for h in result.real.hazards if h.kind == HazardKind.UNSAFE_OVERLAP})
    if raced:  # predicted (else not agree) and seen, but held by the stand-in: not a clean bill
        return Text(f"{line}, but the real run observed the predicted race on ranks "
                    f"{','.join(map(str, raced))} (the CPU stand-in held the early reads; see the verdicts)",
                    style="bold yellow")
    return Text(line, style="green")


def real_output_table(trace: Trace) -> RenderableType:
    """Each rank's real output against the exact reference."""
    t = Table(title="real output vs the exact reference", title_justify="left")
    t.add_column("rank")
    t.add_column("output")
    t.add_column("max abs err")
    t.add_column("wrong rows")
    t.add_column("cause")
    for r in sorted(trace.output_checks):
        c = trace.output_checks[r]
        verdict = Text("correct", style="green") if c.correct else Text("WRONG", style="bold red")
        err = "-" if c.max_abs_err is None else f"{c.max_abs_err:.2e}"
        t.add_row(str(r), verdict, err, f"{c.wrong_rows}/{c.rows}", Text(printable(c.cause or "")))
    if not trace.output_checks:
        t.add_row("-", "not judged", "-", "-", "")
    return t


def check_report(result: Any, timeline: RenderableType | None, engine: dict[str, Any] | None = None) -> RenderableType:
    s = result.scenario
    parts: list[RenderableType] = [scenario_panel(s, engine), Text("")]
    ran = any(result.real.steps.values())
    real = f"real {result.real.latency_us:.0f} us (CPU)" if ran else "real: not run"
    parts.append(Text(f"runner {printable(result.sim.runner)}: sim latency {result.sim.latency_us:.1f} us "
                      f"(profile), {real}", style="bold"))
    if result.sim.hazards:
        parts.append(Text("predicted:", style="bold"))
        parts.extend(hazard_lines(result.sim.hazards))
    else:
        parts.append(Text("predicted: no hazard", style="bold green"))
    t = Table(title="verdicts", title_justify="left")
    t.add_column("kind")
    t.add_column("rank")
    t.add_column("verdict")
    t.add_column("evidence")
    styles = {"CONFIRMED": "bold green", "REFUTED": "bold red", "INCONCLUSIVE": "yellow", "UNPREDICTED": "bold red"}
    for v in result.verdicts:
        t.add_row(Text(printable(v.kind)), str(v.rank), Text(v.verdict.value, style=styles.get(v.verdict.value, "")),
                  Text(printable(v.reason)))
    if not result.verdicts:
        t.add_row("-", "-", Text("nothing to judge", style="green"), "no hazard predicted and none observed")
    parts.append(t)
    parts.append(agreement_line(result, ran))
    parts.append(real_output_table(result.real))
    parts.append(outputs_table(result.real))
    if timeline is not None:
        parts.append(timeline)
    for note in result.real.notes:
        parts.append(Text(printable(note), style="dim"))
    return Group(*parts)
