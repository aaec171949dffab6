"""The checking commands: simulate, replay, run, check and timeline (whose
--real draws a cross-checked run), registered on cli.py's parser by `add_parsers`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twin.cli_flags import BadInput, add_budgets, add_timeout
from twin.cli_output import (
    EXIT_HAZARD,
    EXIT_OK,
    add_common,
    console,
    emit_json,
    engine_layout,
    load_scenario,
    print_report,
    spinner,
    timeline,
)
from twin.cli_real import (
    add_real_flags,
    add_startup_flag,
    autocalibrate,
    budget_stop,
    real_scenario,
    resolve_runner,
    skipped_real,
    startup_timeout,
)

FOLD_WORLD = 32  # simulate --json folds equivalent ranks beyond this many ranks


def add_parsers(sub: Any) -> None:
    sp = sub.add_parser("simulate", help="predict hazards and the timeline of a runner on a scenario")
    add_common(sp)
    add_budgets(sp)
    sp.add_argument("--profile", help="cost profile: h100, h200, b200, mi300x, mi355x, cpu (default: by platform)")
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when a hazard is predicted")
    sp.add_argument("--all-ranks", action="store_true",
                    help=f"with --json beyond {FOLD_WORLD} ranks: every rank's steps and outputs, "
                         "not each class of equivalent ranks once")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("replay", help="the five historical regressions, before vs fixed")
    sp.add_argument("--real", action="store_true", help="also run every case on real ranks and give verdicts")
    sp.add_argument("--engine", choices=("vllm",),
                    help="the seeds on the engine's own releases (runner ENGINE@X.Y.Z per installed release)")
    add_timeout(sp, 120.0, "a real run (after start-up) counts as hung")
    add_startup_flag(sp)
    add_budgets(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--fail-on-hazard", action="store_true",
                    help="exit 1 when a regression is not caught (or not confirmed with --real)")
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("run", help="run a scenario on real ranks (no simulation verdicts)")
    add_common(sp)
    add_real_flags(sp)
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when the real run shows a problem")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("check", help="simulate and run for real; a verdict per predicted hazard")
    add_common(sp)
    add_real_flags(sp)
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true",
                    help="exit 1 when a hazard is predicted or the real run shows an unpredicted one")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("timeline", help="Gantt view per rank and stream; --real draws sim and real together")
    sp.add_argument("scenario", help="catalog name or path to a scenario .toml")
    sp.add_argument("--runner", help="runner preset or module:Class (default: the scenario's)")
    sp.add_argument("--real", action="store_true", help="also run for real and draw both on one scale")
    sp.add_argument("--ranks", help="comma-separated ranks to draw, e.g. 0,1")
    sp.add_argument("--width", type=int, help="columns (default: terminal width)")
    sp.add_argument("--export", metavar="FILE.json", help="also write a Chrome/Perfetto trace")
    add_real_flags(sp)
    sp.set_defaults(func=cmd_timeline)


def cmd_simulate(args: argparse.Namespace) -> int:
    s = load_scenario(args.scenario)  # bad input is refused before numpy and the simulator load
    resolve_runner(args, s)
    from sim import simulate

    trace = simulate(s, args.runner, profile=args.profile)
    engine = engine_layout(s, args.runner or s.runner)
    if args.json:
        # Wide worlds list each class of equivalent ranks once (--all-ranks: every rank).
        fold = s.world > FOLD_WORLD and not args.all_ranks
        doc = {"scenario": s.name, "summary": s.summary_line(), "derived": s.derived()}
        if engine is not None:
            doc["engine_layout"] = engine
        emit_json({**doc, **(trace.to_folded_dict() if fold else trace.to_dict(with_steps=True))})
    else:
        from twin.check.report import simulate_report

        print_report(simulate_report(s, trace, timeline(trace, args.width), engine))
    return EXIT_HAZARD if (args.fail_on_hazard and trace.hazards) else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from twin.check.report import replay_table

    out = console()
    results = _replay_results(args)
    if args.json:
        doc: dict[str, Any] = {"cases": [r.to_dict() for r in results]}
        if args.engine:
            doc["engine"] = args.engine
            doc["skipped"] = sum(1 for r in results if r.skipped)
        emit_json(doc)
    else:
        from twin.check.report import replay_details

        print_report(replay_table(results, real=args.real, engine=args.engine))
        print_report(replay_details(results, real=args.real, width=out.width))
    failed = any(not r.caught for r in results) or (args.real and any(not r.real_ok for r in results))
    return EXIT_HAZARD if (args.fail_on_hazard and failed) else EXIT_OK


def _replay_results(args: argparse.Namespace) -> list[Any]:
    """The twin's historical runners, or with --engine the engine's releases;
    --real also runs each case on real ranks."""
    if args.real:
        startup_timeout(args)
        autocalibrate(args)
        with spinner("replaying on real ranks...") as status:
            def progress(msg: str) -> None:
                status.update(f"real: {msg}")

            if args.engine:
                from twin.check.replay_engine import replay_engine_real

                return replay_engine_real(args.engine, progress=progress, timeout_s=args.timeout)
            from twin.check.replay_real import replay_real

            return replay_real(progress=progress, timeout_s=args.timeout)
    if args.engine:
        from twin.check.replay_engine import replay_engine_sim

        return replay_engine_sim(args.engine)
    from twin.check.replay import replay_sim

    return replay_sim()


def _parse_ranks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--ranks: expected a comma-separated list of rank numbers, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    s = real_scenario(args)
    from sim import simulate

    # Simulated first: a runner stopped by a budget there is not run for real
    # (nor is the cpu profile calibrated for a run that does not happen).
    with spinner(f"simulating {s.name} before its real run..."):
        prediction = simulate(s, args.runner)  # shapes of async ops and the values to fit
    stop = budget_stop(prediction)
    if stop is None:
        from real.runner import run_real

        autocalibrate(args)
        with spinner(f"running {s.name} on {s.world} real rank(s)..."):
            res = run_real(s, args.runner, prediction=prediction, timeout_s=args.timeout)
        trace, errors, failures = res.trace, res.errors, res.failures
    else:  # the runner would loop on the ranks too: report the simulator's stop
        trace, errors, failures = skipped_real(s, prediction, stop), {}, {}
        trace.hazards = list(prediction.hazards)
    if args.json:
        emit_json({"scenario": s.name, **trace.to_dict(with_steps=True),
                    "errors": {str(r): {"step": st, "error": e} for r, (st, e) in errors.items()},
                    "failures": {str(r): f for r, f in failures.items()}})
    else:
        from twin.check.report import real_report

        print_report(real_report(s, trace, timeline(trace, args.width), engine_layout(s, args.runner or s.runner)))
    return EXIT_HAZARD if (args.fail_on_hazard and trace.hazards) else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    s = real_scenario(args)
    from sim import simulate
    from twin.check.crosscheck import CheckResult, VerdictItem, check
    from twin.check.report import check_report

    with spinner(f"checking {s.name}: simulating..."):
        sim = simulate(s, args.runner)
    stop = budget_stop(sim)
    # A calibration just made re-times a cpu-profile scenario: check() then simulates again.
    stale = stop is None and autocalibrate(args) and s.cost_profile == "cpu"
    with spinner(f"checking {s.name}: simulate, then run on {s.world} real rank(s)...") as status:
        if stop is None:
            result = check(s, args.runner, timeout_s=args.timeout, progress=lambda m: status.update(m),
                           prediction=None if stale else sim)
        else:  # the runner would loop on the ranks too: no real run, say why
            from scenarios.trace import Verdict

            result = CheckResult(s, sim, skipped_real(s, sim, stop))
            result.verdicts = [VerdictItem(h.kind.value, Verdict.INCONCLUSIVE,
                                           f"not run on real ranks: stopped by a budget in the simulator ({stop})",
                                           h.step, h.rank) for h in sim.hazards]
    if args.json:
        emit_json(result.to_dict())
    else:
        div = result.divergence[:2] if result.divergence else None
        compare = result.real if result.real.steps else None
        tl = timeline(result.timeline_sim or result.sim, args.width, compare=compare, first_divergence=div)
        print_report(check_report(result, tl, engine_layout(s, args.runner or s.runner)))
    # Predicted (whatever the verdict) or found by the real run alone.
    found = bool(result.sim.hazards) or any(v.verdict.value == "UNPREDICTED" for v in result.verdicts)
    return EXIT_HAZARD if (args.fail_on_hazard and found) else EXIT_OK


def cmd_timeline(args: argparse.Namespace) -> int:
    s = real_scenario(args, real=args.real)
    ranks = _parse_ranks(args.ranks)
    if ranks is not None:
        bad = [r for r in ranks if not 0 <= r < s.world]
        if bad:
            raise BadInput(f"--ranks: {bad} not in this scenario's ranks 0..{s.world - 1}")
    from sim import simulate

    sim_trace = simulate(s, args.runner)
    real_trace = None
    div = None
    stop = budget_stop(sim_trace) if args.real else None
    if stop is not None:
        print(f"moe-twin: real run skipped: the runner was stopped by a budget in the simulator ({stop})",
              file=sys.stderr)
    elif args.real:
        from real.runner import run_real
        from twin.check.crosscheck import first_divergence

        if autocalibrate(args) and s.cost_profile == "cpu":
            sim_trace = simulate(s, args.runner)  # timed with the profile just calibrated
        with spinner(f"running {s.name} on {s.world} real rank(s)..."):
            real_trace = run_real(s, args.runner, prediction=sim_trace, timeout_s=args.timeout).trace
        d = first_divergence(sim_trace, real_trace, s.model.routed_scaling_factor)
        div = d[:2] if d else None
        from twin.check.crosscheck import cpu_timeline

        sim_trace = cpu_timeline(s, args.runner, sim_trace)  # comparable with the CPU run
    if args.export:
        from twin.view.export import write_chrome_trace

        try:
            path = write_chrome_trace([sim_trace] + ([real_trace] if real_trace else []), args.export)
        except OSError as exc:
            raise BadInput(f"--export: cannot write {args.export}: {exc.strerror or exc}") from None
        from twin.textsafe import printable

        print(f"wrote {printable(path, one_line=True)}", file=sys.stderr)
    from twin.view.timeline import render_text, terminal_width

    width = args.width or terminal_width()
    view = timeline(sim_trace, width, compact=False, ranks=ranks, compare=real_trace, first_divergence=div)
    sys.stdout.write(render_text(view, width=width, color=sys.stdout.isatty()) + "\n")
    return EXIT_OK


__all__ = ["FOLD_WORLD", "add_parsers", "cmd_check", "cmd_replay", "cmd_run", "cmd_simulate", "cmd_timeline"]
