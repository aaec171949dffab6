"""The import graph points down: cli.py -> twin/ -> sim/, real/ -> scenarios/.

Inside twin/ the jobs point down too: search/ (may confirm on real ranks
through check/) -> check/ (draws through view/) -> view/. A lazy re-export in
scenarios/strategies.py is the one allowed reference upward: it keeps
`from scenarios.strategies import assert_no_hazard` working and runs on that
access only, never while scenarios/ is imported (checked in a fresh process).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("scenarios", "sim", "real", "moe_twin_kernels", "twin")

# (file, enclosing function, imported module): references upward on purpose.
ALLOWED_UPWARD = {("scenarios/strategies.py", "__getattr__", "twin.search.asserts")}

# Modules still at their old place whose imports follow when they move.
NOT_YET_MOVED: set[str] = set()


def _imports(path: Path, with_names: bool = False) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function or None at import time) of a file;
    `with_names`: also X.y for each `from X import y` (y may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, func))
                if with_names:
                    found.extend((f"{child.module}.{a.name}", func) for a in child.names)
            visit(child, func)

    visit(tree, None)
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _top(module: str) -> str:
    return module.split(".")[0]


def _violations(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for package in packages:
        for path in _files(package):
            for module, func in _imports(path):
                hit = _top(module) in forbidden or any(module.startswith(f + ".") or module == f
                                                       for f in forbidden if "." in f)
                if hit and (_rel(path), func, module) not in ALLOWED_UPWARD:
                    bad.append(f"{_rel(path)}{f' ({func})' if func else ''} imports {module}")
    return bad


def test_scenarios_is_the_bottom_layer():
    assert _violations(("scenarios",), ("sim", "real", "twin", "cli", "moe_twin_kernels")) == []


def test_sim_and_real_never_import_twin_or_cli():
    assert _violations(("sim", "real", "moe_twin_kernels"), ("twin", "cli")) == []


def test_nothing_under_twin_imports_cli():
    assert _violations(("twin",), ("cli",)) == []


def test_twin_jobs_point_down():
    assert _violations(("twin/view",), ("twin.check", "twin.search")) == []
    assert _violations(("twin/check",), ("twin.search",)) == []


def test_the_allowed_upward_reference_exists():
    # An allowance for a reference that is gone would hide a new one.
    for file, func, module in ALLOWED_UPWARD:
        assert (module, func) in _imports(ROOT / file)


def test_the_code_here_imports_twin_modules_by_their_new_names():
    from twin import OLD_PATHS

    bad = []
    for path in [ROOT / "cli.py", *(p for d in (*LAYERS, "tests", "benchmarks", "scripts") for p in _files(d))]:
        if _rel(path) in NOT_YET_MOVED:
            continue
        bad += [f"{_rel(path)} imports {m}" for m, _ in _imports(path, with_names=True) if m in OLD_PATHS]
    assert bad == []


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    return out.split()


def _modules(package: str) -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in _files(package)]


def test_importing_scenarios_loads_nothing_above_it():
    loaded = _loaded_after("\n".join(f"import {m}" for m in _modules("scenarios")))
    assert [m for m in loaded if _top(m) in ("sim", "real", "twin", "cli", "moe_twin_kernels")] == []


@pytest.mark.parametrize("module", _modules("scenarios"))
def test_each_scenarios_module_imports_first_in_a_fresh_process(module):
    # Modules that re-export each other's names must not need a particular
    # import order: a cycle shows only when the other side is imported first.
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]


def test_importing_sim_loads_neither_twin_nor_cli():
    loaded = _loaded_after("\n".join(f"import {m}" for m in _modules("sim")))
    assert [m for m in loaded if _top(m) in ("twin", "cli", "real")] == []


def test_old_import_paths_still_work():
    """Users' test files: the helpers and modules under the names they had."""
    code = ("from scenarios.strategies import assert_no_hazard\n"
            "from twin.verify import assert_verified\n"
            "import twin.search.asserts as a, twin.search.verify as v, twin.verify as old\n"
            "assert assert_no_hazard is a.assert_no_hazard and assert_verified is v.assert_verified\n"
            "assert old is v, 'an old name is the same module object'\n"
            "from twin.explore import explore\n"
            "from twin.timeline import render_timeline\n"
            "print('ok')")
    assert "ok" in _loaded_after(code)


def test_assert_no_hazard_from_its_old_place_still_fails_on_a_hazard():
    from scenarios.loader import load
    from scenarios.strategies import assert_no_hazard

    assert_no_hazard("fixed", load("r3-tp-decode"))
    with pytest.raises(AssertionError, match="LOST_OVERLAP"):
        assert_no_hazard("before-38990", load("glm5-tp8-decode"), profile="h100")


def test_subcommand_modules_register_without_cli():
    import argparse

    import cli

    for module in cli.SUBCOMMANDS:
        path = ROOT / (module.replace(".", "/") + ".py")
        assert "cli" not in {_top(m) for m, _ in _imports(path)}, module
        sub = argparse.ArgumentParser().add_subparsers()
        __import__(module, fromlist=["add_parsers"]).add_parsers(sub)
        assert sub.choices, f"{module}.add_parsers registered nothing"
