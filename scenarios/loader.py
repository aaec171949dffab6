"""Loading scenarios: catalog names, TOML files, TOML text."""

from __future__ import annotations

import errno
import os
import stat
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


MAX_FILE_BYTES = 1 << 20  # a scenario is a few hundred bytes; more is not a scenario


def parse_toml(text: str, source: str = "<text>", default_name: str = "scenario") -> Scenario:
    try:
        data = tomllib.loads(text)
        if not data:
            raise ScenarioError("scenario", f"{source} is empty (no settings): a scenario names at least "
                                            "its [model] or [parallel] settings")
        return scenario_from_dict(data, default_name=default_name)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("toml", f"{source} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ScenarioError("toml", f"{source} nests tables or arrays too deeply") from None


def file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def _read_scenario_bytes(p: Path) -> bytes:
    """The file's bytes; never blocks on a FIFO (opened non-blocking, then
    checked to be a regular file), never reads more than MAX_FILE_BYTES."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ScenarioError("scenario", f"no such file {p}") from None
        raise ScenarioError("scenario", f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        what = file_kind(os.fstat(fd).st_mode)
        if what is not None:
            raise ScenarioError("scenario", f"{p} is {what}, not a scenario file")
        raw = b""
        while len(raw) <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as exc:
        raise ScenarioError("scenario", f"cannot read {p}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError("scenario", f"{p} is larger than {MAX_FILE_BYTES >> 20} MiB: not a scenario file")
    return raw


def load_file(path: str | Path) -> Scenario:
    p = Path(path)
    raw = _read_scenario_bytes(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError("scenario", f"{p} is not UTF-8 text (byte {exc.start}: "
                                        f"{raw[exc.start:exc.start + 1]!r})") from None
    # A byte-order mark (some editors write one) is not TOML, but says nothing: dropped.
    return parse_toml(text.removeprefix("\ufeff"), source=str(p), default_name=p.stem)


def catalog() -> list[CatalogEntry]:
    entries = []
    for f in sorted(CATALOG_DIR.glob("*.toml")):
        s = load_file(f)
        entries.append(CatalogEntry(s.name, f, s.summary or s.summary_line()))
    return entries


def load(name_or_file: str) -> Scenario:
    """A catalog scenario by name, or a TOML file by path."""
    p = Path(name_or_file)
    if p.suffix == ".toml" or os.sep in name_or_file or p.is_file():
        return load_file(p)  # says what it is if it is not a readable regular file
    direct = CATALOG_DIR / f"{name_or_file}.toml"
    if direct.is_file():
        return load_file(direct)
    for entry in catalog():
        if entry.name == name_or_file:
            return load_file(entry.file)
    names = ", ".join(e.name for e in catalog())
    try:
        what = file_kind(os.stat(p).st_mode) or "a file not named .toml"
    except OSError:
        what = None
    if what is not None:
        raise ScenarioError("scenario", f"{name_or_file} is neither a catalog scenario nor a scenario "
                                        f"file: it is {what}")
    raise ScenarioError("scenario", f"unknown scenario {name_or_file!r} (catalog: {names}; or a .toml file)")
