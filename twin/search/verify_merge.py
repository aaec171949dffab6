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
    sets: dict[frozenset[str], int] = {}
    for r in results:
        for f in r.get("findings", []):
            findings.setdefault(f["signature"], dict(f))
        for item in r.get("finding_sets", []):  # shards cover disjoint classes: counts add
            key = frozenset(item["signatures"])
            sets[key] = sets.get(key, 0) + int(item["classes"])
    out = {k: head.get(k) for k in ("runner", "axes", "space", "max_world")}
    for key in ("classes", "pruned", "simulated", "invalid", "opaque", "unsupported"):
        out[key] = sum(int(r.get(key, 0)) for r in results)
    out["findings"] = found_together([findings[k] for k in sorted(findings)], sets)
    out["finding_sets"] = sets_to_json(sets)
    out["proved_clean"] = not findings and all(r.get("complete", True) for r in results)
    out["shards"] = len(results)
    out["complete"] = all(bool(r.get("complete", True)) for r in results)
    out["stopped"] = next((r["stopped"] for r in results if r.get("stopped")), None)
    out["elapsed_s"] = round(sum(float(r.get("elapsed_s", 0.0)) for r in results), 3)
    out["statement"] = statement(out["classes"], len(findings), out["axes"] or {}, out["unsupported"])
    out["held_fixed"] = held_fixed(out["axes"] or {})
    return out


def found_together(findings: list[dict[str, Any]], sets: dict[frozenset[str], int]) -> list[dict[str, Any]]:
    """Each finding's classes_found, found_with (the findings every one of its
    classes showed too: often the step its cause first showed at) and
    same_classes_as (found_with both ways). Facts about the enumeration, not
    a diagnosis. 0 classes: a finding of an earlier run this one did not meet."""
    with_: dict[str, frozenset[str]] = {}
    for f in findings:
        sig = f["signature"]
        having = [k for k in sets if sig in k]
        f["classes_found"] = sum(sets[k] for k in having)
        with_[sig] = frozenset.intersection(*having) - {sig} if having else frozenset()
        f["found_with"] = sorted(with_[sig])
    for f in findings:
        sig = f["signature"]
        f["same_classes_as"] = sorted(o for o in with_[sig] if sig in with_.get(o, ()))
    return findings


def sets_to_json(sets: dict[frozenset[str], int]) -> list[dict[str, Any]]:
    """The finding sets as JSON, most classes first."""
    return [{"signatures": sorted(k), "classes": n}
            for k, n in sorted(sets.items(), key=lambda kv: (-kv[1], sorted(kv[0])))]


__all__ = ["found_together", "merge", "sets_to_json", "statement"]
