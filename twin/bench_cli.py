"""`calibrate` (the cpu cost profile) and `bench` (medians and ratios),
registered on cli.py's parser by `add_parsers`.
"""

from __future__ import annotations

import argparse
from typing import Any

from twin.cli_flags import BadInput
from twin.cli_output import EXIT_OK, console, emit_json, spinner
from twin.cli_real import add_startup_flag, autocalibrate, startup_timeout


def add_parsers(sub: Any) -> None:
    sp = sub.add_parser("calibrate", help="fit the cpu cost profile on this machine")
    sp.add_argument("--world", type=int, default=2, help="ranks used to time gloo collectives")
    sp.add_argument("--repeats", type=int, default=5, help="real runs per calibration scenario")
    add_startup_flag(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("bench", help="benchmarks (medians and ratios)")
    sp.add_argument("what", choices=["sim", "real"], help="which side to benchmark")
    sp.add_argument("--repeats", type=int, default=5, help="repeats per figure (median reported)")
    sp.add_argument("--json", action="store_true", help="a flat object of named figures")
    sp.set_defaults(func=cmd_bench)


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise BadInput(f"--repeats: at least 1, got {args.repeats}")
    if args.world < 2:
        raise BadInput(f"--world: collectives need at least 2 ranks, got {args.world}")
    startup_timeout(args)
    from real.calibrate import calibrate
    from sim.cost import save_cpu_profile

    out = console()
    with spinner("calibrating the cpu profile (microbenchmarks, then real runs of calibration scenarios)...") as status:
        profile, figures = calibrate(world_size=args.world, repeats=args.repeats,
                                     progress=lambda m: status.update(f"calibrating the cpu profile: {m}"))
    path = save_cpu_profile(profile)
    if args.json:
        emit_json({"profile": path.as_posix(), **figures})
    else:
        from twin.textsafe import printable

        out.print(f"cpu profile saved to {printable(path)}")
        for k, v in figures.items():
            out.print(f"  {k:32s} {v}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise BadInput(f"--repeats: at least 1, got {args.repeats}")
    if args.what == "sim":
        from twin.bench import bench_sim

        figures = bench_sim(repeats=args.repeats)
    else:
        from real.bench import bench_real

        autocalibrate(args)
        figures = bench_real(repeats=args.repeats)
    if args.json:
        emit_json(figures)
    else:
        from rich.text import Text

        out = console()
        out.print(Text(f"moe-twin bench {args.what}", style="bold"),
                  f"(medians of {args.repeats} repeats)")
        for k, v in figures.items():
            out.print(f"  {k:44s} {v}")
    return EXIT_OK


__all__ = ["add_parsers", "cmd_bench", "cmd_calibrate"]
