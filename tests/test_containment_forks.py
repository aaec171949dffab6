"""Processes runner code forks and leaves running end with the command, in
the tool's own process and in verify's worker processes alike."""

from __future__ import annotations

import json
import os
import time

from test_containment import HOSTILE, moe_twin


def test_children_runner_code_left_in_verify_workers_hold_no_pipe_open():
    # Each child sleeps 120 s; the reader of stderr waits for all of them to end.
    t0 = time.monotonic()
    p = moe_twin("verify", "--runner", f"{HOSTILE}:ForkedChildSleeps", "--max-world", "1", "--jobs", "2", "--json",
                 timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["complete"]
    assert time.monotonic() - t0 < 90


def test_a_child_runner_code_reaped_itself_is_left_alone():
    """Its pid may belong to another process by the end: the pidfd taken at
    the fork says it is gone, and nothing is signalled."""
    from scenarios import contain, contain_forks

    with contain.RunnerGuard(None):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
    os.waitpid(pid, 0)  # runner code reaps its own child
    sent = []
    real_kill = os.kill
    try:
        os.kill = lambda p, s: sent.append((p, s))  # type: ignore[assignment]
        assert contain_forks.end_forked() == []
    finally:
        os.kill = real_kill
    assert sent == []
