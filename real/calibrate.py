"""`moe-twin calibrate`: fit the simulator's `cpu` profile on this machine.

Two sources, both in the way the ranks run (one intra-op thread):
- microbenchmarks in this process: GEMM throughput, memory bandwidth, the
  fixed cost of a small op and of a small GEMM, the per-expert cost of the
  torch routed kernel's loop, and gloo all-reduce bus bandwidth;
- real runs of calibration scenarios on the rank pool: every measured step is
  matched against the cost model's terms for it (by finite differences of the
  model), which gives the fixed costs as the ranks see them (contention with
  the other ranks, Python dispatch, gloo wake-ups), the collectives' latency
  and the host time between ops.

`measure_runs` runs ranks; `fit_profile` only computes (testable on any traces).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

from scenarios.spec import Scenario
from scenarios.trace import COLLECTIVE, Step, Trace
from sim.cost import Profile, usable_cores

Say = Callable[[str], None]

# Scenarios the real runner executes to fit the fixed costs: TP-only (world 2),
# token-routing all-to-all over 4 ranks, shared experts; CPU platform, small
# dims. The other six r1..r5 scenarios (SP, the one-sided all-to-all, r3's
# large shapes, latent projections, all-to-all over 2 ranks) stay out:
# `bench real` checks the fit on them out of sample.
CALIBRATION_SCENARIOS = ("r4-gpt-oss-padded", "r1-stale-cache", "r2-fi-two-sided", "r4-nemotron-padded")

# Fixed-cost terms of the cost model, in the order of the feature vectors.
TERMS = ("kernel_us", "elementwise_us", "coll_alpha_us", "a2a_alpha_us", "expert_active_us", "expert_idle_us")


# ---- microbenchmarks (this process, one intra-op thread) ----


def sample_s(fn: Callable[[], Any], min_samples: int = 15, min_time_s: float = 0.0, max_samples: int = 10_000) -> float:
    """Median seconds of `fn` over at least `min_samples` calls and at least
    `min_time_s` of calls (after one warm-up call)."""
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < max_samples and (len(times) < min_samples or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compute_figures(budget_s: float = 0.2) -> dict[str, float]:
    """Rates and fixed costs of torch eager ops on one core, as a rank runs them."""
    import torch

    from real.reference import one_thread

    with one_thread():
        a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
        gemm = sample_s(lambda: a @ b, 5, budget_s)
        big = torch.randn(8 * 2**20)  # 32 MiB
        copy = sample_s(lambda: big.clone(), 5, budget_s)
        small_a, small_b = torch.randn(8, 128), torch.randn(8, 128)
        small = sample_s(lambda: small_a + small_b, 200, budget_s)
        x, w = torch.randn(4, 128), torch.randn(128, 128)
        tiny_gemm = sample_s(lambda: x @ w, 200, budget_s)
        active, idle = _expert_loop_us(budget_s)
    return {
        "flops": 2 * 256 * 1024 * 1024 / gemm,
        "mem_bw": 2 * big.numel() * 4 / copy,
        "elementwise_us": small * 1e6,
        "kernel_us": tiny_gemm * 1e6,
        "expert_active_us": active,
        "expert_idle_us": idle,
    }


def _expert_loop_us(budget_s: float) -> tuple[float, float]:
    """Per-expert cost of the torch routed kernel's loop, on tiny shapes (so
    the roofline term is negligible): an expert no token picked (the slope
    over 8 -> 64 idle experts), and an expert with one token."""
    import torch

    from moe_twin_kernels.torch_ref import fused_moe_torch

    n, h, i = 64, 64, 32
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(n, 2 * i, h, generator=gen), torch.randn(n, h, i, generator=gen)
    x = torch.randn(16, h, generator=gen)
    wts = torch.ones(16, 1)

    def run(local: int, ids: torch.Tensor) -> float:
        return sample_s(lambda: fused_moe_torch(x, ids, wts, w13[:local], w2[:local]), 20, budget_s) * 1e6

    elsewhere = torch.full((16, 1), 10 * n)  # every token routed to another rank: all idle
    idle_8 = run(8, elsewhere)
    idle_16, idle_64 = run(16, elsewhere), run(n, elsewhere)
    idle = max(0.0, (idle_64 - idle_8) / (n - 8))
    one_each = torch.arange(16).unsqueeze(1)  # token j picks expert j: 16 active
    active = idle + max(0.0, (run(16, one_each) - idle_16) / 16)
    return active, idle


def _bus_rank(rank: int, world: int, n: int, iters: int) -> float:
    """Amortised time of one large all-reduce (bandwidth term)."""
    import torch
    import torch.distributed as dist

    t = torch.randn(n)
    dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    return (time.perf_counter() - t0) / iters


# ---- real runs ----


@dataclass
class Runs:
    """Measured traces of one calibration scenario (the fixed runner)."""

    scenario: Scenario
    traces: list[Trace] = field(default_factory=list)


def calibration_scenario(name: str) -> Scenario:
    from scenarios.loader import load

    return load(name).with_(**{"runtime.platform": "cpu", "runtime.aux_stream": False})


def measure_runs(names: tuple[str, ...], base: Profile, repeats: int, timeout_s: float,
                 say: Say | None = None) -> dict[str, Runs]:
    from real.runner import run_real
    from sim import simulate

    out: dict[str, Runs] = {}
    for k, name in enumerate(names):
        if say:
            say(f"real runs {k + 1}/{len(names)}: {name}")
        s = calibration_scenario(name)
        pred = simulate(s, "fixed", profile=base)
        run_real(s, "fixed", prediction=pred, timeout_s=timeout_s)  # warm-up: threads, lazy imports
        runs = out[name] = Runs(s)
        for _ in range(repeats):
            runs.traces.append(run_real(s, "fixed", prediction=pred, timeout_s=timeout_s).trace)
    return out


# ---- the fit ----


def features(s: Scenario, base: Profile) -> dict[tuple[int, int], tuple[float, ...]]:
    """Per (rank, step): the duration the model gives with every fixed-cost
    term at 0, then the duration each term adds per microsecond (so the
    model's step duration is var + sum(f_k * term_k))."""
    from sim import simulate

    zero = replace(base, **{t: 0.0 for t in TERMS}, host_gap_us=0.0)
    probes = [zero] + [replace(zero, **{t: 1.0}) for t in TERMS]
    durs = [simulate(s, "fixed", profile=p, what_if=False).steps for p in probes]
    out: dict[tuple[int, int], tuple[float, ...]] = {}
    for r, steps in durs[0].items():
        for st in steps:
            var = st.duration
            out[(r, st.index)] = (var, *(d[r][st.index].duration - var for d in durs[1:]))
    return out


def _issue(steps: list[Step]) -> dict[int, float]:
    """When each step was issued: the end of the previous step on its stream."""
    last: dict[str, float] = {}
    out = {}
    for st in steps:
        if st.stream in last:
            out[st.index] = last[st.stream]
        last[st.stream] = st.end
    return out


def host_gaps(runs: dict[str, Runs]) -> list[float]:
    """Host time between consecutive non-collective ops of a stream (runner
    Python, the real Ops' bookkeeping)."""
    gaps = []
    for rs in runs.values():
        for tr in rs.traces:
            for steps in tr.steps.values():
                issue = _issue(steps)
                gaps.extend(max(0.0, st.start - issue[st.index]) for st in steps
                            if st.index in issue and not st.waits and st.category != COLLECTIVE and st.end > 0)
    return gaps


def _skew(steps: dict[int, list[Step]], st: Step) -> float:
    """How much later than its members' median issue the last member issues
    `st`, in `steps` (a simulated trace: the wait the model itself predicts)."""
    group = st.group or (st.rank,)
    issued = [_issue(steps[m]).get(st.index) for m in group if m in steps]
    times = [t for t in issued if t is not None]
    return max(times) - statistics.median(times) if times else 0.0


def _effective(st: Step, issued: dict[int, dict[int, float]], predicted_skew: float) -> float | None:
    """A collective's time from its members' median issue to its end, less the
    wait for the last member that the model predicts itself (unequal expert
    loads): what the model's collective step stands for. On CPU this includes
    the members' agreement exchange before the collective and the wait for a
    member that is late by chance (the simulated ranks are median ranks, and
    the layer waits for the slowest at each collective)."""
    group = st.group or (st.rank,)
    starts = [issued.get(m, {}).get(st.index) for m in group]
    if any(t is None for t in starts) or st.end <= 0:
        return None
    return st.end - statistics.median(t for t in starts if t is not None) - predicted_skew


def step_samples(runs: dict[str, Runs], host_gap_us: float,
                 predicted: dict[str, Trace] | None = None) -> dict[tuple[str, int, int], list[float]]:
    """Measured durations per (scenario, rank, step): a compute step's own
    time; a collective's effective time less one host gap (and less the skew
    `predicted` gives, when given)."""
    out: dict[tuple[str, int, int], list[float]] = {}
    for name, rs in runs.items():
        pred = predicted.get(name) if predicted else None
        for tr in rs.traces:
            issued = {r: _issue(steps) for r, steps in tr.steps.items()}
            for r, steps in tr.steps.items():
                for st in steps:
                    if st.end <= 0 or st.error:
                        continue
                    if st.category == COLLECTIVE:
                        skew = _skew(pred.steps, st) if pred is not None else 0.0
                        eff = _effective(st, issued, skew)
                        if eff is not None:
                            out.setdefault((name, r, st.index), []).append(max(0.0, eff - host_gap_us))
                    else:
                        out.setdefault((name, r, st.index), []).append(st.duration)
    return out


def fit_terms(runs: dict[str, Runs], base: Profile, host_gap_us: float,
              predicted: dict[str, Trace] | None = None) -> dict[str, float]:
    """Each fixed-cost term from the steps that carry that term alone (the
    median of (measured - variable part) / count); the expert loop, whose
    steps always carry kernel launches too, as a scale on its microbenchmarked
    costs after the fitted launches are taken off."""
    samples = step_samples(runs, host_gap_us, predicted)
    single: dict[int, list[float]] = {k: [] for k in range(len(TERMS))}
    loops: list[tuple[float, float, float]] = []  # (measured, var, loop feature)
    for name, rs in runs.items():
        for (r, i), f in features(rs.scenario, base).items():
            got = samples.get((name, r, i))
            if not got:
                continue
            measured = statistics.median(got)
            var, per = f[0], f[1:]
            active = [k for k, v in enumerate(per) if v > 1e-9]
            if len(active) == 1:
                k = active[0]
                single[k].append(max(0.0, (measured - var) / per[k]))
            elif set(active) <= {0, 4, 5} and (4 in active or 5 in active):
                loop = per[4] * base.expert_active_us + per[5] * base.expert_idle_us
                loops.append((measured - var, per[0], loop))
    fitted = {TERMS[k]: statistics.median(v) for k, v in single.items() if v}
    kernel = fitted.get("kernel_us", base.kernel_us)
    scales = [max(0.0, (m - n_k * kernel) / loop) for m, n_k, loop in loops if loop > 0]
    if scales:
        scale = statistics.median(scales)
        fitted["expert_active_us"] = base.expert_active_us * scale
        fitted["expert_idle_us"] = base.expert_idle_us * scale
    return fitted


def fit_profile(base: Profile, runs: dict[str, Runs]) -> Profile:
    """The calibrated profile: `base` (microbenchmarks) with the fixed costs
    and the host gap fitted on the measured runs."""
    gaps = host_gaps(runs)
    gap = statistics.median(gaps) if gaps else base.host_gap_us
    fitted = fit_terms(runs, base, gap)
    # Again, with the collectives' waits the first fit predicts taken off:
    # the model times unequal loads itself.
    from sim import simulate
    from sim.cost import machine_key, machine_label

    first = replace(base, host_gap_us=gap, **fitted)
    predicted = {n: simulate(rs.scenario, "fixed", profile=first, what_if=False) for n, rs in runs.items()}
    fitted = fit_terms(runs, base, gap, predicted)

    return replace(
        base, calibrated=True, host_gap_us=gap, machine=machine_label(machine_key()), **fitted,
        source=f"calibrated on this machine ({date.today().isoformat()}: microbenchmarks + "
               f"{len(runs)} real scenarios)",
    )


def base_profile(comp: dict[str, float], bus_bw: float) -> Profile:
    return Profile(
        name="cpu", flops=comp["flops"], mem_bw=comp["mem_bw"], kernel_us=comp["kernel_us"],
        coll_alpha_us=100.0, bus_bw=bus_bw, a2a_alpha_us=100.0, bytes_per_elem=4,
        elementwise_us=comp["elementwise_us"], calibrated=False, source="microbenchmarks",
        expert_active_us=comp["expert_active_us"], expert_idle_us=comp["expert_idle_us"], alpha_per_peer=True,
        cores=usable_cores(),
    )


def calibrate(world_size: int = 2, repeats: int = 5, timeout_s: float = 120.0,
              progress: Say | None = None) -> tuple[Profile, dict[str, float]]:
    """Microbenchmarks give the compute and memory rates, the expert loop and
    the collective bus bandwidth; real runs of the calibration scenarios give
    the fixed per-step costs as the ranks see them."""
    from real.runner import get_pool

    say = progress or (lambda _m: None)
    load = os.getloadavg()[0]
    say("microbenchmarks (one thread)")
    comp = compute_figures()
    say(f"gloo bus bandwidth ({world_size} ranks)")
    n_elems = 4 * 1024 * 1024
    per = get_pool(world_size, timeout_s).run(_bus_rank, n_elems, 10, timeout_s=timeout_s)
    bus_bw = 2 * (world_size - 1) / world_size * n_elems * 4 / max(per)
    base = base_profile(comp, bus_bw)
    runs = measure_runs(CALIBRATION_SCENARIOS, base, repeats, timeout_s, say)
    profile = replace(fit_profile(base, runs), calibration_load=round((load + os.getloadavg()[0]) / 2, 2))
    return profile, figures_of(profile)


def figures_of(profile: Profile) -> dict[str, float]:
    return {
        "gemm_gflops": round(profile.flops / 1e9, 2),
        "mem_bw_gbs": round(profile.mem_bw / 1e9, 2),
        "gloo_allreduce_busbw_gbs": round(profile.bus_bw / 1e9, 3),
        "fitted_kernel_us": round(profile.kernel_us, 1),
        "fitted_elementwise_us": round(profile.elementwise_us, 1),
        "fitted_collective_alpha_us": round(profile.coll_alpha_us, 1),
        "fitted_all_to_all_alpha_us": round(profile.a2a_alpha_us, 1),
        "fitted_expert_active_us": round(profile.expert_active_us, 1),
        "fitted_expert_idle_us": round(profile.expert_idle_us, 1),
        "fitted_host_gap_us": round(profile.host_gap_us, 1),
        "load_average_1min": profile.calibration_load,
    }
