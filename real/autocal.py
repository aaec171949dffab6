"""The cpu profile is calibrated when it is first used.

Every command that runs real ranks on this CPU (check, run, timeline --real,
replay --real, bench real) first makes sure this machine has a calibrated
`cpu` profile: without one, the simulated CPU timeline drawn beside the real
one is an order of magnitude off. Calibration runs once per machine key (see
sim/cost.py) and is stored; a failed calibration never costs the command its
result (it goes on with the defaults and says so).

`MOE_TWIN_NO_AUTOCALIBRATE=1` turns it off (the test suite sets it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

OPT_OUT = "MOE_TWIN_NO_AUTOCALIBRATE"
AUTO_REPEATS = 5  # real runs per calibration scenario (median of 5 per step)

Calibrate = Callable[..., tuple[Any, dict[str, float]]]


def reason_to_calibrate() -> str | None:
    """Why this command should calibrate first (one line), or None: opted
    out, already calibrated here, or the ranks run on a GPU."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return None
    from sim.cost import DEFAULT_CPU, load_profile, machine_key, machine_label

    prof = load_profile("cpu")
    if prof.calibrated:
        return None
    if _cuda():
        return None  # the real run is not on this CPU: its timeline is not the cpu profile's
    if prof.source == DEFAULT_CPU.source:
        why = "no cpu profile calibrated on this machine yet"
    else:  # e.g. only profiles fitted on other machines (never used here)
        why = prof.source.removeprefix("uncalibrated defaults (").split("; run ")[0]
    return f"{why}, {machine_label(machine_key())}"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def calibrate_now(progress: Callable[[str], None] | None = None, timeout_s: float = 120.0,
                  calibrate_fn: Calibrate | None = None) -> str:
    """Calibrate and store this machine's profile; one line saying what
    happened. Any failure is that line (the caller goes on with the defaults);
    only the user's Ctrl-C propagates."""
    from sim.cost import save_cpu_profile

    if calibrate_fn is None:
        from real.calibrate import calibrate as calibrate_fn
    t0 = time.monotonic()
    try:
        profile, _figures = calibrate_fn(world_size=2, repeats=AUTO_REPEATS, timeout_s=timeout_s, progress=progress)
        path = save_cpu_profile(profile)
    except Exception as exc:  # infrastructure (ranks that cannot start), a full disk, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        return (f"calibration failed ({type(exc).__name__}: {first}); "
                "the simulated cpu timeline uses the uncalibrated defaults")
    return f"cpu profile calibrated in {time.monotonic() - t0:.0f} s and saved to {path}"
