"""Stream and collective programs for tests/test_stream_verdicts.py."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.sglang import SGLangRunner


class SglangJoinsAtOnce(SGLangRunner):
    """The overlap order is chosen, but the main stream joins the aux stream
    right after launching it: nothing overlaps."""

    def launch_shared_on_aux(self, ops: Ops, x: Any, sharded: bool) -> tuple[Any, Any]:
        shared, done = super().launch_shared_on_aux(ops, x, sharded)
        ops.wait_event(done, name="join_at_once")
        return shared, done


class SglangGathersTwice(SGLangRunner):
    """After the attention-TP all-gather, the rows are gathered over tp once
    more and trimmed back: either gather alone can go, not both."""

    def postprocess_layer(self, ops: Ops, out: Any, tokens: int) -> Any:
        out = super().postprocess_layer(ops, out, tokens)
        g = ops.all_gather(out, "tp", name="extra_all_gather")
        return ops.trim_rows(g, tokens, name="extra_trim_rows")

