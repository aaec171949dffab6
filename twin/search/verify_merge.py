"""verify's statement of what was proved, and the merge of its shards' --json outputs."""

from __future__ import annotations

from typing import Any

from scenarios.space import held_fixed
from twin.search.explore_store import ExploreInputError


def statement(classes: int, findings: int, axes: dict[str, list[Any]], unsupported: int = 0) -> str:
    """What was proved (no finding) or found, over which axes and values."""
    over = "{" + ", ".join(f"{k}: {'/'.join(map(str, v))}" for k, v in axes.items()) + "}"
    refused = f" ({unsupported} more refused by the runner as out of its scope)" if unsupported else ""
    # A proof covers the axes only: say what every class held fixed (a bug
    # that needs routed scaling is outside a space that never scales).
    held = held_fixed(axes)
    fixed = f"; held fixed: {', '.join(f'{k} {v}' for k, v in held.items())}" if held and axes else ""
    if not findings:
        return f"no hazard in {classes} decision classes over {over}{refused}{fixed}"
    return f"{findings} distinct finding(s) in {classes} decision classes over {over}{refused}{fixed}"


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the --json outputs of the shards of one space: counts
    added, findings merged by signature (the first shard's minimal scenario)."""
    if not results:
        raise ExploreInputError("--merge: no shard outputs given")
    head = results[0]
    for r in results[1:]:
        for key in ("runner", "axes"):
            if r.get(key) != head.get(key):
                raise ExploreInputError(f"--merge: shards disagree on {key!r}: {r.get(key)!r} vs {head.get(key)!r}")
    findings: dict[str, Any] = {}
    for r in results:
        for f in r.get("findings", []):
            findings.setdefault(f["signature"], f)
    out = {k: head.get(k) for k in ("runner", "axes", "space", "max_world")}
    for key in ("classes", "pruned", "simulated", "invalid", "opaque", "unsupported"):
        out[key] = sum(int(r.get(key, 0)) for r in results)
    out["findings"] = [findings[k] for k in sorted(findings)]
    out["proved_clean"] = not findings and all(r.get("complete", True) for r in results)
    out["shards"] = len(results)
    out["complete"] = all(bool(r.get("complete", True)) for r in results)
    out["stopped"] = next((r["stopped"] for r in results if r.get("stopped")), None)
    out["elapsed_s"] = round(sum(float(r.get("elapsed_s", 0.0)) for r in results), 3)
    out["statement"] = statement(out["classes"], len(findings), out["axes"] or {}, out["unsupported"])
    out["held_fixed"] = held_fixed(out["axes"] or {})
    return out


__all__ = ["merge", "statement"]
