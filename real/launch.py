"""The pool's rank entry point for processes started by torchrun (env:// init).

    torchrun --standalone --nproc-per-node 2 -m real.launch \\
        --fn package.module:function --args-json '[1, "x"]'

Every rank calls `function(rank, world_size, *args)` exactly as a `RankPool`
rank would; rank 0 prints its result as one line of JSON. Rendezvous, multiple
nodes and restarts are torchrun's job, not this module's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from real.pool import (
    default_backend,
    last_note,
    load_callable,
    setup_rank_runtime,
    usable_cpu_count,
)


def _jsonable(obj: Any) -> Any:
    # Rank results are often tensors or dataclass-like objects; JSON has neither.
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return repr(obj)


def main(argv: list[str] | None = None) -> int:
    """Run one function on this rank; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m real.launch", description=__doc__)
    parser.add_argument("--fn", required=True, help="module:function to call on every rank")
    parser.add_argument("--args-json", default="[]", help="JSON list of extra positional arguments")
    parser.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    opts = parser.parse_args(argv)

    args = json.loads(opts.args_json)
    if not isinstance(args, list):
        args = [args]
    fn = load_callable(opts.fn)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = opts.backend or default_backend()

    # Same per-rank set-up as a pool rank: share this node's cores, pick a GPU.
    setup_rank_runtime(backend, local_rank, max(1, usable_cpu_count() // local_world))
    dist.init_process_group(
        backend, init_method="env://", timeout=timedelta(seconds=opts.timeout_s)
    )
    try:
        result = fn(rank, world_size, *args)
    except Exception:
        print(f"rank {rank} failed (last note: {last_note()!r}):", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result, default=_jsonable), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
