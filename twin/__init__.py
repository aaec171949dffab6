"""The twin: checking (check/), searching (search/), viewing (view/).

- check/: the cross-check of a simulated run with a real one (crosscheck.py,
  the verdict rules verdicts.py, races.py), the historical regressions
  (replay.py, replay_real.py) and the reports of simulate/run/check/replay.
- search/: explore (Hypothesis search, shrink, findings on disk), verify (the
  enumeration of the decision space), detection rates and the assert helpers
  for users' test files (asserts.py).
- view/: the terminal timeline and the Chrome/Perfetto export.
- here: what the jobs and cli.py share (textsafe.py, cli_flags.py) and
  `moe-twin bench sim` (bench.py).

The modules once lived directly under twin/. Their old dotted names keep
importing (the same module object, so patching either name patches both) for
users' scripts and test files, e.g. `from twin.verify import assert_verified`;
code in this repository imports the new names (tests/test_layering.py).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

OLD_PATHS = {
    "twin.crosscheck": "twin.check.crosscheck",
    "twin.verdicts": "twin.check.verdicts",
    "twin.races": "twin.check.races",
    "twin.replay": "twin.check.replay",
    "twin.replay_real": "twin.check.replay_real",
    "twin.report": "twin.check.report",
    "twin.explore": "twin.search.explore",
    "twin.explore_cli": "twin.search.explore_cli",
    "twin.explore_oracle": "twin.search.explore_oracle",
    "twin.explore_shrink": "twin.search.explore_shrink",
    "twin.explore_store": "twin.search.explore_store",
    "twin.verify": "twin.search.verify",
    "twin.verify_cli": "twin.search.verify_cli",
    "twin.verify_record": "twin.search.verify_record",
    "twin.detection": "twin.search.detection",
    "twin.mutate": "twin.search.mutate",
    "twin.timeline": "twin.view.timeline",
    "twin.export": "twin.view.export",
}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old dotted name to the module at its new place (imported
    only when the old name is)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in OLD_PATHS:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(OLD_PATHS[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module has run already."""


# First: a finder of an editable install could otherwise hand out a stale copy at the old path.
if not any(isinstance(f, _OldPath) for f in sys.meta_path):
    sys.meta_path.insert(0, _OldPath())
