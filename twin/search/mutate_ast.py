"""AST helpers of mutant generation: parse a function, replace one node on a
fresh parse, compile the result in a runner module's globals."""

from __future__ import annotations
import __future__

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv",
               "dp_gather", "dp_scatter")
DROPPABLE_OPS = (*COLLECTIVES, "wait_event", "pad", "trim", "trim_rows", "view", "sp_slice")


def parse(fn: Callable[..., Any]) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def compile_fn(fn: ast.FunctionDef, globs: dict[str, Any], label: str) -> Callable[..., Any]:
    module = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    # The runner modules use postponed annotations; keep them unevaluated here too.
    code = compile(module, f"<mutant {label}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    ns: dict[str, Any] = {}
    exec(code, globs, ns)  # noqa: S102 - our own source, mutated
    return ns[fn.name]


def src(node: ast.AST) -> str:
    return ast.unparse(node)


class Replace(ast.NodeTransformer):
    """Replace one node (by identity) with another (or remove it: None)."""

    def __init__(self, target: ast.AST, replacement: ast.AST | None) -> None:
        self.target = target
        self.replacement = replacement

    def visit(self, node: ast.AST) -> Any:
        if node is self.target:
            return self.replacement
        return super().visit(node)


Pick = Callable[[ast.FunctionDef], tuple[ast.AST, ast.AST | None]]


def mutated(fn: Callable[..., Any], pick: Pick) -> ast.FunctionDef:
    """A fresh parse of fn with one node replaced (`pick` finds it on that parse)."""
    tree = parse(fn)
    target, replacement = pick(tree)
    out = Replace(target, replacement).visit(tree)
    assert isinstance(out, ast.FunctionDef)
    return out


def nodes(tree: ast.AST, kind: type) -> list[Any]:
    return [n for n in ast.walk(tree) if isinstance(n, kind)]


def op_name(call: ast.Call) -> str | None:
    """The step name of `ops.<op>(..., name="...")` calls we may drop."""
    f = call.func
    if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "ops"):
        return None
    if f.attr not in DROPPABLE_OPS:
        return None
    for kw in call.keywords:
        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
            return str(kw.value.value)
    return None


def has_collective(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in COLLECTIVES
        for n in ast.walk(node)
    )


def uses_super(fn: Callable[..., Any]) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "super" for n in ast.walk(parse(fn)))


def global_names(fn: Callable[..., Any]) -> set[str]:
    """Names a function reads (a superset of the globals it uses)."""
    return {n.id for n in ast.walk(parse(fn)) if isinstance(n, ast.Name)}


def drop_operand(tree: ast.FunctionDef, idx: int, j: int) -> tuple[ast.AST, ast.AST]:
    """(the idx-th BoolOp of tree, the same without its j-th operand)."""
    node = nodes(tree, ast.BoolOp)[idx]
    rest = [v for n, v in enumerate(node.values) if n != j]
    return node, rest[0] if len(rest) == 1 else ast.BoolOp(node.op, rest)


__all__ = ["COLLECTIVES", "DROPPABLE_OPS", "Pick", "Replace", "compile_fn", "drop_operand", "global_names",
           "has_collective", "mutated", "nodes", "op_name", "parse", "src", "uses_super"]
