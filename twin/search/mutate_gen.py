"""Mutants of a runner's decision points, generated from its source.

Two targets: `fixed` (scenarios.runner_base.MoERunner, mutants `M_*`) and
`sglang` (scenarios.sglang.SGLangRunner, mutants `S_*`). Operators:

- negate: every decision method annotated `-> bool` returns the opposite.
- always/never: the `if` test of a decision method (or of a helper function
  of the order) is replaced by True / False.
- dropcond: one operand of a compound condition (`and`/`or`, nested too) is
  removed: in decision methods, in helper functions (the order's disable
  rule, SGLang's alternate-stream and all-to-all rules), and in the guards
  of collectives inside the program.
- order: the rules of the shared-experts order function are swapped pairwise
  or dropped one at a time, or the order is a constant.
- dropop: one collective, stream wait or padding/trim op of the program is
  removed (the op's result becomes its input).

A mutant of a module-level function is installed by recompiling, against a
globals table holding the mutated function, every function of that module
and every method of the runner that (transitively) names it; the engine's
rules (EngineRules), the yardstick of the simulator, keep the originals.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from scenarios import runner_base, sglang
from scenarios.runner_base import MoERunner, Order
from twin.search import mutate_ast as A


@dataclass(frozen=True)
class MutantInfo:
    name: str
    operator: str  # negate, always, never, dropcond, order, dropop
    target: str  # the method (or function) mutated
    description: str
    runner: str = "fixed"  # the runner mutated: fixed or sglang


@dataclass(frozen=True)
class Target:
    """One runner whose decision points are mutated."""

    key: str  # fixed / sglang
    prefix: str  # M / S
    base: type[MoERunner]
    module: ModuleType  # where its order function and helpers live
    program: tuple[str, ...]  # methods holding the program (ops are issued there)
    not_decisions: tuple[str, ...]  # own methods that are neither decisions nor mutated
    order_fn: str  # the module's order function
    helpers: tuple[str, ...]  # module functions mutated (dropcond, always/never)
    own_only: bool  # only methods defined on `base` itself (not inherited)

    def method(self, name: str) -> Callable[..., Any]:
        return getattr(self.base, name)

    def decision_methods(self) -> list[str]:
        members = vars(self.base) if self.own_only else {
            k: v for c in reversed(self.base.__mro__) for k, v in vars(c).items()}
        return [name for name, m in members.items()
                if inspect.isfunction(m) and name not in self.not_decisions and not name.startswith("_")
                and name not in self.program]

    def globs(self, **overrides: Any) -> dict[str, Any]:
        return {**self.module.__dict__, **overrides} if overrides else self.module.__dict__


FIXED_PROGRAM = ("model_forward", "forward", "routed_path", "overlapped_routed_path",
                 "routed_input", "shared_before_routed", "shared_after_routed_path", "run_shared",
                 "launch_shared_on_aux", "finish_routed", "join_outputs", "trim_output",
                 "final_reduce", "maybe_reduce_shared", "next_layer_fused_reduce")
FIXED = Target(
    "fixed", "M", MoERunner, runner_base, FIXED_PROGRAM,
    ("__init__", "process_weights", "shared_input", "decide_order", "shared_inside_routed",
     "before_aux_fork", "unsupported"),
    "reference_order", ("overlap_disabled", "multi_stream_platform"), own_only=True)
# maybe_reduce_shared is a decision too (its guard is mutated as one).
FIXED_DECISIONS_ALSO = ("maybe_reduce_shared",)
SGLANG = Target(
    "sglang", "S", sglang.SGLangRunner, sglang,
    ("model_forward", "prepare_mlp", "postprocess_layer", "next_layer_fused_reduce", "final_reduce",
     "routed_path"),
    # unsupported says what the reference models, not a decision of the block.
    ("unsupported",),
    "reference_order", ("a2a_backend", "has_alt_stream"), own_only=True)
TARGETS = {"fixed": FIXED, "sglang": SGLANG}

MUTANTS: dict[str, type[MoERunner]] = {}
INFO: dict[str, MutantInfo] = {}
_HOME: dict[str, Any] = {}  # the module namespace mutants are published in (twin.search.mutate)


def publish(namespace: dict[str, Any], module_name: str) -> None:
    """Make every mutant resolvable as `<module_name>:<name>` (rank and worker
    processes re-import it and get the same classes)."""
    _HOME.update(namespace=namespace, module=module_name)
    for name, cls in MUTANTS.items():
        cls.__module__ = module_name
        namespace[name] = cls


def _reference_unsupported(self: MoERunner) -> str | None:
    # A mutant models exactly the scenarios its reference models: the
    # reference runner's own `unsupported`, not one built on mutated rules.
    ref = TARGETS[self.mutant_of].base  # type: ignore[attr-defined]
    return ref(self.scenario).unsupported()


def _register(t: Target, name: str, operator: str, target: str, description: str,
              attrs: dict[str, Any]) -> None:
    if name in MUTANTS:
        raise RuntimeError(f"duplicate mutant name {name}")
    extra = {"unsupported": _reference_unsupported} if t.key != "fixed" else {}
    # Both runners share method names: the runner's name keeps descriptions distinct.
    if t.key != "fixed":
        description = f"{t.key}: {description}"
    cls = type(name, (t.base,), {
        **extra, **attrs, "name": name, "description": description, "mutant_of": t.key,
        "__module__": _HOME.get("module", __name__), "__qualname__": name,
    })
    MUTANTS[name] = cls
    INFO[name] = MutantInfo(name, operator, target, description, t.key)


def _suffix(items: list[Any], i: int) -> str:
    return f"_{i + 1}" if len(items) > 1 else ""


def _decisions(t: Target) -> list[str]:
    out = t.decision_methods()
    if t.key == "fixed":
        out += [m for m in FIXED_DECISIONS_ALSO if m not in out]
        # Keep the historical order of the fixed mutants (class order).
        order = list(vars(MoERunner))
        out.sort(key=order.index)
    return out


# ---------------------------------------------------------------- operators


def _negate(t: Target) -> None:
    for name in _decisions(t):
        if inspect.signature(t.method(name)).return_annotation not in ("bool", bool):
            continue
        base = t.method(name)

        def negated(self: MoERunner, *args: Any, _base: Any = base, **kwargs: Any) -> bool:
            return not _base(self, *args, **kwargs)

        _register(t, f"{t.prefix}_negate_{name}", "negate", name, f"{name} returns the opposite", {name: negated})


def _ifs(t: Target, name: str, fn: Callable[..., Any], install: Callable[[ast.FunctionDef, str], dict[str, Any]],
         what: str) -> None:
    ifs = A.nodes(A.parse(fn), ast.If)
    for i, node in enumerate(ifs):
        body_is_collective = any(A.has_collective(stmt) for stmt in node.body)
        for value, word in ((True, "always"), (False, "never")):
            if not value and body_is_collective:
                continue  # same as dropping the collective (dropop)

            def pick(tree: ast.FunctionDef, i: int = i, value: bool = value) -> tuple[ast.AST, ast.AST]:
                return A.nodes(tree, ast.If)[i].test, ast.Constant(value)

            mname = f"{t.prefix}_{word}_{name}{_suffix(ifs, i)}"
            _register(t, mname, word, name, f"{what}: `if {A.src(node.test)}` replaced by `if {value}`",
                      install(A.mutated(fn, pick), mname))


def _method_install(t: Target, name: str) -> Callable[[ast.FunctionDef, str], dict[str, Any]]:
    return lambda tree, label: {name: A.compile_fn(tree, t.globs(), label)}


def _if_mutants(t: Target) -> None:
    for name in _decisions(t):
        fn = t.method(name)
        if not A.uses_super(fn):
            _ifs(t, name, fn, _method_install(t, name), name)


def _dropcond_in(t: Target, fn: Callable[..., Any], method: str, prefix: str, boolops: list[ast.BoolOp],
                 install: Callable[[ast.FunctionDef, str], dict[str, Any]], what: str | None = None) -> None:
    """One mutant per operand of every BoolOp in `boolops` (nodes of a parse of fn)."""
    all_ops = A.nodes(A.parse(fn), ast.BoolOp)
    k = 0
    for op in boolops:
        idx = [i for i, n in enumerate(all_ops) if ast.dump(n) == ast.dump(op)][0]
        for j, operand in enumerate(op.values):
            k += 1
            mname = f"{prefix}_{k}"
            word = "and" if isinstance(op.op, ast.And) else "or"
            _register(t, mname, "dropcond", method,
                      f"{what or method}: drop `{A.src(operand)}` from `{A.src(op)}` ({word})",
                      install(A.mutated(fn, lambda tree, idx=idx, j=j: A.drop_operand(tree, idx, j)), mname))


def _dropcond_mutants(t: Target) -> None:
    decisions = _decisions(t)
    for name in decisions:
        fn = t.method(name)
        if A.uses_super(fn):
            continue
        ops = A.nodes(A.parse(fn), ast.BoolOp)
        if ops:
            _dropcond_in(t, fn, name, f"{t.prefix}_dropcond_{name}", ops, _method_install(t, name))
    # Guards of collectives in the program (a decision inlined in the program).
    for name in t.program:
        fn = t.method(name)
        if A.uses_super(fn) or name in decisions:
            continue
        guards = [n for n in A.nodes(A.parse(fn), ast.If) if any(A.has_collective(s) for s in n.body)]
        ops = [b for g in guards for b in A.nodes(g.test, ast.BoolOp)]
        if ops:
            _dropcond_in(t, fn, name, f"{t.prefix}_dropcond_{name}", ops, _method_install(t, name))


def function_install(t: Target, fname: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """The runner attributes that install module function `fname` := fn:
    every module function and own method naming it (transitively) is
    recompiled against one globals table holding the mutated versions."""
    globs = dict(t.module.__dict__)
    globs[fname] = fn
    changed = {fname}
    functions = {n: f for n, f in vars(t.module).items()
                 if inspect.isfunction(f) and f.__module__ == t.module.__name__ and n != fname}
    grew = True
    while grew:
        grew = False
        for n, f in functions.items():
            if n not in changed and A.global_names(f) & changed:
                globs[n] = A.compile_fn(A.parse(f), globs, f"{fname}->{n}")
                changed.add(n)
                grew = True
    attrs: dict[str, Any] = {}
    for n, m in vars(t.base).items():
        if inspect.isfunction(m) and n != "unsupported" and not A.uses_super(m) and A.global_names(m) & changed:
            attrs[n] = A.compile_fn(A.parse(m), globs, f"{fname}->{t.base.__name__}.{n}")
    return attrs


def _helper_mutants(t: Target) -> None:
    for fname in t.helpers:
        fn = getattr(t.module, fname)
        what = f"{fname} (a rule of the order)" if fname == "overlap_disabled" else fname

        def install(tree: ast.FunctionDef, label: str, fname: str = fname) -> dict[str, Any]:
            return function_install(t, fname, A.compile_fn(tree, t.globs(), label))

        if fname == "overlap_disabled":  # historical names: M_dropcond_overlap_disabled_<op>_<operand>
            for i, op in enumerate(A.nodes(A.parse(fn), ast.BoolOp)):
                for k, operand in enumerate(op.values):
                    name = f"{t.prefix}_dropcond_{fname}_{i + 1}_{k + 1}"
                    tree = A.mutated(fn, lambda tr, i=i, k=k: A.drop_operand(tr, i, k))
                    _register(t, name, "dropcond", fname,
                              f"overlap_disabled (the order's disable rule): drop `{A.src(operand)}` "
                              f"from `{A.src(op)}`", install(tree, name))
            continue
        _ifs(t, fname, fn, install, what)
        ops = A.nodes(A.parse(fn), ast.BoolOp)
        if ops:
            _dropcond_in(t, fn, fname, f"{t.prefix}_dropcond_{fname}", ops, install, what)


def _order_method(order_fn: Callable[..., Any]) -> Callable[..., Any]:
    def shared_experts_order(self: MoERunner, num_tokens: int) -> Any:
        return order_fn(self.scenario, num_tokens)

    return shared_experts_order


def _rule_label(node: ast.If) -> str:
    ret = node.body[0]
    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Attribute):
        return ret.value.attr
    return A.src(node.test)


def _short(label: str) -> str:
    return {"NO_OVERLAP": "disable", "MK_INTERNAL_OVERLAPPED": "mk",
            "MULTI_STREAM_OVERLAPPED": "multistream"}.get(label, label.lower())


def _inline_body(t: Target, fn: Callable[..., Any]) -> list[ast.stmt]:
    """fn's statements, with a tail call `return g(<same parameters>)` to another
    function of the module replaced by g's statements (the order function is
    split over helpers; its rules are mutated as one list)."""
    tree = A.parse(fn)
    params = [a.arg for a in tree.args.args]
    out: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        call = stmt.value if isinstance(stmt, ast.Return) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and [a.id for a in call.args if isinstance(a, ast.Name)] == params
                and inspect.isfunction(getattr(t.module, call.func.id, None))):
            callee = getattr(t.module, call.func.id)
            if [a.arg for a in A.parse(callee).args.args] == params:
                out.extend(_inline_body(t, callee))
                continue
        out.append(stmt)
    return out


def _order_mutants(t: Target) -> None:
    ref = getattr(t.module, t.order_fn)
    body = _inline_body(t, ref)
    # Hoist plain assignments (`rt = s.runtime`) so that moving rules keeps them defined.
    assigns = [s for s in body if isinstance(s, ast.Assign)]
    rules = [s for s in body if isinstance(s, ast.If)]
    tail = [s for s in body if not isinstance(s, (ast.Assign, ast.If))]
    P = t.prefix

    def build(new_rules: list[ast.stmt], label: str) -> dict[str, Any]:
        tree = A.parse(ref)
        tree.body = [*assigns, *new_rules, *tail]
        return {"shared_experts_order": _order_method(A.compile_fn(tree, t.globs(), label))}

    for a in range(len(rules)):
        for b in range(a + 1, len(rules)):
            moved = list(rules)
            moved.insert(a, moved.pop(b))
            la, lb = _rule_label(rules[a]), _rule_label(rules[b])
            name = f"{P}_order_{_short(lb)}_before_{_short(la)}"
            _register(t, name, "order", "shared_experts_order",
                      f"shared_experts_order: the {lb} rule (`{A.src(rules[b].test)}`) is checked "
                      f"before the {la} rule (`{A.src(rules[a].test)}`)", build(moved, name))
    for a, rule in enumerate(rules):
        label = _rule_label(rule)
        name = f"{P}_order_drop_{_short(label)}_rule"
        _register(t, name, "order", "shared_experts_order",
                  f"shared_experts_order: the {label} rule (`{A.src(rule.test)}`) is missing",
                  build([r for i, r in enumerate(rules) if i != a], name))
        for j, op in enumerate(A.nodes(rule.test, ast.BoolOp)):
            for k, operand in enumerate(op.values):
                rest = [v for n, v in enumerate(op.values) if n != k]
                repl = rest[0] if len(rest) == 1 else ast.BoolOp(op.op, rest)
                t_rule = ast.parse(A.src(rule)).body[0]
                t_rule = A.Replace(A.nodes(t_rule, ast.BoolOp)[j], repl).visit(t_rule)
                new_rules = [t_rule if i == a else r for i, r in enumerate(rules)]
                name = f"{P}_dropcond_order_{_short(label)}_{k + 1}"
                _register(t, name, "dropcond", "shared_experts_order",
                          f"shared_experts_order: drop `{A.src(operand)}` from the {label} rule "
                          f"`{A.src(op)}`", build(new_rules, name))
    orders = list(Order) if t.key == "fixed" else [Order.NO_OVERLAP, Order.MULTI_STREAM_OVERLAPPED]
    for order in orders:
        def constant(self: MoERunner, num_tokens: int, _o: Any = order) -> Any:
            return _o

        _register(t, f"{P}_order_always_{order.name.lower()}", "order", "shared_experts_order",
                  f"shared_experts_order always returns {order.value}", {"shared_experts_order": constant})


def _dropop_mutants(t: Target) -> None:
    for name in t.program:
        fn = t.method(name)
        if A.uses_super(fn):
            continue
        calls = [c for c in A.nodes(A.parse(fn), ast.Call) if A.op_name(c)]
        for i, call in enumerate(calls):
            step = A.op_name(call)
            is_wait = isinstance(call.func, ast.Attribute) and call.func.attr == "wait_event"

            def pick(tree: ast.FunctionDef, i: int = i, is_wait: bool = is_wait) -> tuple[ast.AST, ast.AST | None]:
                c = [c for c in A.nodes(tree, ast.Call) if A.op_name(c)][i]
                if is_wait:
                    # The statement `ops.wait_event(...)`: replace it with `pass`.
                    stmt = next(s for s in ast.walk(tree) if isinstance(s, ast.Expr) and s.value is c)
                    return stmt, ast.Pass()
                return c, c.args[0]  # the op's result becomes its input

            mname = f"{t.prefix}_dropop_{step}"
            what = "stream wait" if is_wait else "op"
            _register(t, mname, "dropop", name, f"{name}: the {what} `{step}` (`{A.src(call)}`) is removed",
                      {name: A.compile_fn(A.mutated(fn, pick), t.globs(), mname)})


def build(t: Target) -> None:
    _negate(t)
    _if_mutants(t)
    _dropcond_mutants(t)
    _order_mutants(t)
    _helper_mutants(t)
    _dropop_mutants(t)


for _t in TARGETS.values():
    build(_t)


__all__ = ["FIXED", "INFO", "MUTANTS", "SGLANG", "TARGETS", "MutantInfo", "Target", "function_install", "publish"]
