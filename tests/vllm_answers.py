"""A VllmRunner whose engine answer is a given trace, for every rank: the
replay tested without a probe process."""

from __future__ import annotations

from typing import Any

from engines.vllm.runner import VllmRunner

# The decisions of a plain TP layer (what the probe answers beside the trace).
PLAIN = {"accepted": True, "sp": False, "fused_output_is_reduced": False, "shared_experts_order": "NO_OVERLAP"}


def runner_answering(trace: dict[str, Any], **decisions: Any) -> type[VllmRunner]:
    ans = {**PLAIN, **decisions, "trace": trace}

    class Answering(VllmRunner):
        def _not_expressible(self) -> str | None:
            return None

        def _answer(self, d: int = 0) -> dict[str, Any]:
            return ans

    return Answering
