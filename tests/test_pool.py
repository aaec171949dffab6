"""Tests for real.pool (RankPool) and real.launch (torchrun entry point).

Rank functions are module-level so spawned ranks can unpickle them by name.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from real import launch
from real.pool import (
    MAX_RANKS_PER_CPU,
    PoolError,
    RankFailure,
    RankPool,
    fresh_run,
    last_note,
    max_world_size,
    note,
)

REPO = Path(__file__).resolve().parents[1]


# -- rank functions -----------------------------------------------------------


def all_reduce_sum(rank: int, world_size: int, base: float) -> dict:
    t = torch.tensor([base + rank])
    note("step 1 all_reduce")
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": t.item(), "threads": torch.get_num_threads()}


def whoami(rank: int, world_size: int) -> tuple[int, int]:
    return rank, os.getpid()


def raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("bad expert count 7")
    return rank * 10


def kill_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        note("about to die")
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def rank1_skips_all_reduce(rank: int, world_size: int) -> str:
    for step in range(12):
        note(f"step {step} dispatch")
    if rank == 1:
        note("step 12 skipped final_all_reduce")
        return "skipped"
    note("step 12 final_all_reduce")
    dist.all_reduce(torch.ones(4))
    return "done"


def rank1_raises_mid_collective(rank: int, world_size: int) -> str:
    if rank == 1:
        raise RuntimeError("combine failed")
    note("step 3 combine all_reduce")
    dist.all_reduce(torch.ones(2))
    return "done"


def unpicklable_result(rank: int, world_size: int) -> object:
    return (lambda: rank) if rank == 0 else rank


# -- helpers ------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if pid is a running (non-zombie) process."""
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    try:
        # kill(pid, 0) succeeds on zombies, so read the state from /proc too.
        # A killed multi-threaded process shows a zombie leader while its other
        # threads still exit; it is gone (and reapable) only when they are.
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z" or len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pids: list[int], within_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


@pytest.fixture(scope="module")
def pool2():
    with RankPool(2, timeout_s=30.0) as pool:
        yield pool


# -- fast tests -----------------------------------------------------------------


def test_too_large_world_size_refused_before_starting() -> None:
    limit = max_world_size("gloo")
    assert limit == MAX_RANKS_PER_CPU * len(os.sched_getaffinity(0))
    before = set(mp.active_children())
    with pytest.raises(PoolError) as info:
        RankPool(limit + 1, backend="gloo")
    msg = str(info.value)
    assert str(limit + 1) in msg and str(limit) in msg and "larger than" in msg
    assert set(mp.active_children()) == before
    with pytest.raises(PoolError):
        RankPool(0, backend="gloo")


def test_unpicklable_fn_rejected_without_starting() -> None:
    pool = RankPool(2, backend="gloo")
    with pytest.raises(PoolError, match="cannot send"):
        pool.run(lambda rank, world: rank)
    assert pool.pids == [] and pool.starts == 0
    pool.close()
    with pytest.raises(PoolError, match="closed"):
        pool.run(whoami)


def test_rank_failure_message_and_pickling() -> None:
    err = RankFailure(
        {1: "raised ValueError: x\nTraceback ...", 2: "timed out after 3.0 s"},
        {0: 5},
        {2: "step 12 final_all_reduce"},
    )
    text = str(err)
    assert "rank 1: raised ValueError: x" in text and "Traceback" not in text
    assert "rank 2: timed out after 3.0 s [last note: 'step 12 final_all_reduce']" in text
    assert isinstance(err, PoolError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.failures, back.partial, back.notes) == (err.failures, err.partial, err.notes)


def test_note_outside_a_pool_is_local() -> None:
    note("step 3 local")
    assert last_note() == "step 3 local"


# -- multi-process tests ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_results_by_rank(world_size: int) -> None:
    with RankPool(world_size, backend="gloo") as pool:
        out = pool.run(all_reduce_sum, 1.0)
        pids = pool.pids
    expected = sum(1.0 + r for r in range(world_size))
    assert [o["rank"] for o in out] == list(range(world_size))
    assert all(o["sum"] == expected and o["world"] == world_size for o in out)
    # Ranks share the cores instead of each grabbing all of them.
    assert all(o["threads"] == max(1, len(os.sched_getaffinity(0)) // world_size) for o in out)
    assert wait_dead(pids) == []


@pytest.mark.slow
def test_pool_is_reused_across_calls(pool2: RankPool) -> None:
    first = pool2.run(whoami)
    second = pool2.run(whoami)
    assert [r for r, _ in first] == [0, 1]
    assert first == second
    assert [pid for _, pid in first] == pool2.pids
    assert pool2.run(all_reduce_sum, 0.5)[1]["sum"] == 0.5 + 1.5


@pytest.mark.slow
def test_rank_that_raises(pool2: RankPool) -> None:
    old_pids = pool2.run(whoami)
    with pytest.raises(RankFailure) as info:
        pool2.run(raise_on_rank1)
    err = info.value
    assert list(err.failures) == [1]
    assert err.failures[1].startswith("raised ValueError: bad expert count 7")
    assert "Traceback" in err.failures[1] and "raise_on_rank1" in err.failures[1]
    assert err.partial == {0: 0}
    assert "rank 1: raised ValueError: bad expert count 7" in str(err)
    # Torn down, then rebuilt lazily by the next call.
    assert pool2.pids == []
    assert wait_dead([pid for _, pid in old_pids]) == []
    again = pool2.run(whoami)
    assert [r for r, _ in again] == [0, 1] and again != old_pids


@pytest.mark.slow
def test_peer_stuck_in_collective_after_a_raise(pool2: RankPool) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        pool2.run(rank1_raises_mid_collective, timeout_s=20.0)
    # The peer gets the short failure grace, not the 20 s run timeout.
    assert time.monotonic() - t0 < 10.0
    err = info.value
    assert list(err.failures) == [1, 0]
    assert err.failures[1].startswith("raised RuntimeError: combine failed")
    assert "after rank 1 failed" in err.failures[0]
    assert err.notes[0] == "step 3 combine all_reduce"
    assert pool2.run(whoami)[1][0] == 1


@pytest.mark.slow
def test_rank_killed_by_signal(pool2: RankPool) -> None:
    with pytest.raises(RankFailure) as info:
        pool2.run(kill_rank1)
    err = info.value
    assert err.failures[1].startswith("died with exit code -9")
    assert err.partial == {0: 0}
    assert err.notes[1] == "about to die"
    assert pool2.run(all_reduce_sum, 0.0)[0]["sum"] == 1.0


@pytest.mark.slow
def test_hang_times_out_naming_rank_and_note(pool2: RankPool) -> None:
    pids = pool2.pids or [pid for _, pid in pool2.run(whoami)]
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        pool2.run(rank1_skips_all_reduce, timeout_s=3.0)
    took = time.monotonic() - t0
    assert 3.0 <= took < 8.0
    err = info.value
    assert err.failures == {0: "timed out after 3.0 s"}
    assert err.notes == {0: "step 12 final_all_reduce"}
    assert err.partial == {1: "skipped"}
    assert "rank 0: timed out after 3.0 s [last note: 'step 12 final_all_reduce']" in str(err)
    assert wait_dead(pids) == []  # the hung rank was killed and reaped
    assert pool2.run(whoami)[0][0] == 0


@pytest.mark.slow
def test_unpicklable_result_is_a_rank_failure(pool2: RankPool) -> None:
    with pytest.raises(RankFailure) as info:
        pool2.run(unpicklable_result)
    assert "not picklable" in info.value.failures[0]
    assert info.value.partial == {1: 1}


@pytest.mark.slow
def test_rank_dying_while_idle_is_replaced(pool2: RankPool) -> None:
    pids = [pid for _, pid in pool2.run(whoami)]
    os.kill(pids[1], signal.SIGKILL)
    assert wait_dead([pids[1]]) == []
    with pytest.warns(UserWarning, match="idle"):
        again = pool2.run(whoami)
    assert [r for r, _ in again] == [0, 1] and again[0][1] != pids[0]
    assert wait_dead(pids) == []


@pytest.mark.slow
def test_close_leaves_no_processes_and_frees_the_port() -> None:
    before = set(mp.active_children())
    pool = RankPool(2, backend="gloo")
    pool.start()
    pids, port = pool.pids, pool.port
    assert all(pid_alive(p) for p in pids)
    pool.close()
    assert wait_dead(pids, within_s=0.5) == []  # close() joins: dead on return
    assert set(mp.active_children()) <= before
    with socket.socket() as s:  # the store's listening socket is gone
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_fresh_run() -> None:
    before = set(mp.active_children())
    out = fresh_run(2, all_reduce_sum, 2.0)
    assert [o["sum"] for o in out] == [5.0, 5.0]
    assert set(mp.active_children()) <= before


@pytest.mark.slow
def test_garbage_collected_pool_kills_its_ranks() -> None:
    pool = RankPool(2, backend="gloo")
    pool.start()
    pids = pool.pids
    del pool
    gc.collect()
    assert wait_dead(pids, within_s=1.0) == []


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from real.pool import RankPool
    from test_pool import whoami
    pool = RankPool(2)
    print(" ".join(str(pid) for _, pid in pool.run(whoami)), flush=True)
    if sys.argv[1] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all
    # else: exit normally without closing the pool
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["forget", "sigkill"])
def test_no_orphans_when_parent_forgets_or_dies(how: str) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    proc = subprocess.run(
        [sys.executable, "-c", ORPHAN_SCRIPT, how],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    if how == "forget":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert wait_dead(pids, within_s=5.0) == []


@pytest.mark.slow
def test_launch_under_torchrun() -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "real.launch",
            "--fn",
            "test_pool:all_reduce_sum",
            "--args-json",
            "[1.5]",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rank"] == 0 and result["world"] == 2 and result["sum"] == 1.5 + 2.5


def test_launch_main_world_size_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        assert launch.main(["--fn", "test_pool:all_reduce_sum", "--args-json", "[4]"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() tunes threads for this process
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sum"] == 4.0 and result["world"] == 1
    assert not dist.is_initialized()
