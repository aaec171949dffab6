"""Runners with a chunked MoE forward (the layer run on a few rows at a time,
as engines do past a chunk size), correct and with the chunk-loop bugs such
loops have: the test_chunked tests load them as module:Class."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner
from scenarios.sglang import SGLangRunner

CHUNK = 3


class Chunked(MoERunner):
    """forward() on rows [0, 3), [3, 6), ...; the chunks' outputs joined."""

    chunk = CHUNK

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk, rows)) for a in range(0, rows, self.chunk)]

    def forward(self, ops: Ops, x: Any) -> Any:
        outs = []
        for a, b in self.chunks(x.shape[0]):
            outs.append(super().forward(ops, ops.take_rows(x, a, b, name=f"chunk_{a}")))
        return ops.cat_rows(outs, name="join_chunks") if len(outs) > 1 else outs[0]


class ChunkedSGLang(SGLangRunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        rows, outs = x.shape[0], []
        for a in range(0, rows, CHUNK):
            outs.append(super().forward(ops, ops.take_rows(x, a, min(a + CHUNK, rows), name=f"chunk_{a}")))
        return ops.cat_rows(outs, name="join_chunks") if len(outs) > 1 else outs[0]


class DropsTheLastChunk(Chunked):
    """The loop bound misses a last, partial chunk."""

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        return [(a, a + self.chunk) for a in range(0, rows - self.chunk + 1, self.chunk)]


class FirstChunkEveryTime(Chunked):
    """The chunk offset is never advanced: every chunk is rows [0, 3)."""

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        return [(0, min(self.chunk, b - a)) for a, b in super().chunks(rows)]


class RoutesOnceChunkRouting(MoERunner):
    """Routes all rows once, then hands each chunk its own rows of the routing (correct)."""

    def routing_rows(self, a: int, b: int) -> tuple[int, int]:
        return a, b

    def forward(self, ops: Ops, x: Any) -> Any:
        rows = x.shape[0]
        routing = ops.router(x)
        outs = []
        for a in range(0, rows, CHUNK):
            b = min(a + CHUNK, rows)
            xc = ops.take_rows(x, a, b, name=f"chunk_{a}")
            rc = ops.take_rows(routing, *self.routing_rows(a, b), name=f"routing_chunk_{a}")
            routed = ops.experts(xc, rc, name="routed_experts")
            joined = ops.add(routed, ops.shared_experts(xc), name="join")
            outs.append(ops.all_reduce(joined, "tp", name="chunk_all_reduce"))
        return ops.cat_rows(outs, name="join_chunks")


class RoutesOnceStaleChunkRouting(RoutesOnceChunkRouting):
    """Hands every chunk the first chunk's routing."""

    def routing_rows(self, a: int, b: int) -> tuple[int, int]:
        return 0, b - a


class ChunkedAcrossDP(Chunked):
    """Every DP rank runs as many chunks as the DP rank with the most rows
    (the chunk loop is a collective loop): a rank out of rows runs empty ones."""

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        s = self.scenario
        per_rank = [-(-s.dp_tokens(d) // (s.parallel.tp if s.sp else 1)) for d in range(s.parallel.dp)]
        n = max(1, -(-max(per_rank) // self.chunk))
        return [(min(i * self.chunk, rows), min((i + 1) * self.chunk, rows)) for i in range(n)]


class DispatchesChunksRoutedOnce(ChunkedAcrossDP):
    """Routes every row once, then dispatches each chunk with its own rows of
    the routing (expert parallelism without TP: the shared MLP is whole)."""

    def routing_rows(self, a: int, b: int) -> tuple[int, int]:
        return a, b

    def forward(self, ops: Ops, x: Any) -> Any:
        routing = ops.router(x)
        outs = []
        for a, b in self.chunks(x.shape[0]):
            xc = ops.take_rows(x, a, b, name=f"chunk_{a}")
            xd, rd = ops.dispatch(xc, ops.take_rows(routing, *self.routing_rows(a, b), name=f"routing_chunk_{a}"))
            routed = ops.combine(ops.experts(xd, rd, name="routed_experts"))
            outs.append(ops.add(routed, ops.shared_experts(xc), name="join"))
        return ops.cat_rows(outs, name="join_chunks")


class DispatchesChunksWithStaleRouting(DispatchesChunksRoutedOnce):
    """Every chunk dispatched with the first chunk's rows of the routing."""

    def routing_rows(self, a: int, b: int) -> tuple[int, int]:
        return 0, b - a


class JoinsRoutingChunks(MoERunner):
    """Routes the rows a chunk at a time, joins the routing handles and runs
    the layer's experts once on every row (correct)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        rows = x.shape[0]
        parts = [ops.router(ops.take_rows(x, a, min(a + CHUNK, rows), name=f"chunk_{a}"))
                 for a in range(0, rows, CHUNK)]
        routed = ops.experts(x, ops.cat_rows(parts, name="join_routing"), name="routed_experts")
        return ops.all_reduce(ops.add(routed, ops.shared_experts(x), name="join"), "tp", name="all_reduce")
