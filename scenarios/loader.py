"""Loading scenarios: catalog names, TOML files, TOML text."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from scenarios.spec import Scenario, ScenarioError, scenario_from_dict

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: Path
    summary: str


def parse_toml(text: str, source: str = "<text>", default_name: str = "scenario") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("toml", f"{source} is not valid TOML: {exc}") from None
    return scenario_from_dict(data, default_name=default_name)


def load_file(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ScenarioError("scenario", f"cannot read {p}: {exc.strerror or exc}") from None
    return parse_toml(text, source=str(p), default_name=p.stem)


def catalog() -> list[CatalogEntry]:
    entries = []
    for f in sorted(CATALOG_DIR.glob("*.toml")):
        s = load_file(f)
        entries.append(CatalogEntry(s.name, f, s.summary or s.summary_line()))
    return entries


def load(name_or_file: str) -> Scenario:
    """A catalog scenario by name, or a TOML file by path."""
    p = Path(name_or_file)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ScenarioError("scenario", f"no such file {name_or_file}")
        return load_file(p)
    direct = CATALOG_DIR / f"{name_or_file}.toml"
    if direct.is_file():
        return load_file(direct)
    for entry in catalog():
        if entry.name == name_or_file:
            return load_file(entry.file)
    names = ", ".join(e.name for e in catalog())
    raise ScenarioError("scenario", f"unknown scenario {name_or_file!r} (catalog: {names}; or a .toml file)")
