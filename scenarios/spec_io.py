"""Scenario <-> TOML-shaped dicts: reading with named errors, writing back.

Split from scenarios/spec.py (which re-exports these names)."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from scenarios.spec_sections import ModelTraits, ParallelConfig, Runtime, ScenarioError, Workload

if TYPE_CHECKING:
    from scenarios.spec import Scenario

SECTIONS = {
    "model": ModelTraits,
    "parallel": ParallelConfig,
    "runtime": Runtime,
    "workload": Workload,
}
TOP_LEVEL = ("name", "summary", "kernel", "runner")
TOP_LEVEL_FLAGS = ("kernel_writes_unpadded",)
# Fields added later, written only when set: existing scenarios serialise as before.
_DEFAULTS_LEFT_OUT = {("model", "latent_up_parallel", "replicated")}


def scenario_from_dict(data: dict[str, Any], default_name: str = "scenario") -> Scenario:
    """Build a Scenario from a TOML-shaped dict, rejecting unknown keys by name."""
    # Imported here: scenarios.spec re-exports this module's names, so a
    # module-level import would be circular when this module is imported first.
    from scenarios.spec import Scenario

    if not isinstance(data, dict):
        raise ScenarioError("scenario", "must be a table")
    kwargs: dict[str, Any] = {"name": default_name}
    for key, value in data.items():
        if key in SECTIONS:
            cls = SECTIONS[key]
            if not isinstance(value, dict):
                raise ScenarioError(key, "must be a table")
            known = {f.name: f for f in fields(cls)}
            for sub, subval in value.items():
                if sub not in known:
                    raise ScenarioError(
                        f"{key}.{sub}", f"unknown field (known: {', '.join(known)})"
                    )
                _check_type(f"{key}.{sub}", subval, known[sub].type)
            kwargs[key] = cls(**value)
        elif key in TOP_LEVEL:
            if not isinstance(value, str):
                raise ScenarioError(key, f"must be a string, got {value!r}")
            kwargs[key] = value
        elif key in TOP_LEVEL_FLAGS:
            _check_type(key, value, "bool")
            kwargs[key] = value
        else:
            raise ScenarioError(
                key, f"unknown field (known: {', '.join(TOP_LEVEL + TOP_LEVEL_FLAGS + tuple(SECTIONS))})"
            )
    return Scenario(**kwargs)


def _check_type(name: str, value: Any, annotation: Any) -> None:
    ann = str(annotation)
    if value is None:
        if "None" not in ann:
            raise ScenarioError(name, "must not be empty")
        return
    if "tuple" in ann:  # an int, or a list of them (checked by validate)
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    elif ann.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif ann.startswith("bool"):
        ok = isinstance(value, bool)
    elif ann.startswith("str"):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        what = "an int or a list of ints" if "tuple" in ann else ann.split(" ")[0]
        raise ScenarioError(name, f"must be {what}, got {value!r}")


def scenario_to_toml(s: Scenario) -> str:
    """Serialise a Scenario as TOML that scenario_from_dict reads back."""
    lines = [f"name = {_toml_value(s.name)}"]
    if s.summary:
        lines.append(f"summary = {_toml_value(s.summary)}")
    lines.append(f"runner = {_toml_value(s.runner)}")
    lines.append(f"kernel = {_toml_value(s.kernel)}")
    if s.kernel_writes_unpadded:  # only when set: existing scenarios serialise as before
        lines.append("kernel_writes_unpadded = true")
    for section, cls in SECTIONS.items():
        lines.append("")
        lines.append(f"[{section}]")
        obj = getattr(s, section)
        for f in fields(cls):
            value = getattr(obj, f.name)
            if value is None or (section, f.name, value) in _DEFAULTS_LEFT_OUT:
                continue
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    text = str(v).replace("\\", "\\\\").replace('"', '\\"')
    # TOML basic strings may not hold control characters raw.
    text = re.sub("[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", text)
    return f'"{text}"'
