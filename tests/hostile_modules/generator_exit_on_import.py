"""Importing this module raises GeneratorExit (a BaseException, not an Exception)."""

raise GeneratorExit
