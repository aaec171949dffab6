"""Mutants of the fixed runner, generated from its source, and the kill report.

Mutation operators (all applied to `scenarios.runners.MoERunner`, the fixed logic):

- negate: every decision point annotated `-> bool` returns the opposite.
- always/never: the `if` test of a decision method is replaced by True / False
  (pre_trim_width always trims, post_trim_width never does, ...).
- dropcond: one operand of a compound condition (`and`/`or`, nested too) is
  removed: in decision methods, in the order function and its disable rule,
  and in the guards of collectives inside the program (the pre-transform
  all-reduce).
- order: the rules of the shared-experts order function are swapped pairwise
  or dropped one at a time, or the order is a constant.
- dropop: one collective, stream wait or padding/trim op of the program is
  removed (the op's result becomes its input).

Mutants are module-level classes built when this module is imported (the
source is parsed with `ast`), so rank processes re-importing
`twin.mutate:<name>` get the same class; `MUTANTS` is the registry.
"""

from __future__ import annotations
import __future__

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scenarios import runner_base as _runners
from scenarios.runners import MoERunner

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv")
DROPPABLE_OPS = (*COLLECTIVES, "wait_event", "pad", "trim", "trim_rows", "view")
# Methods holding the program (ops are issued here); the rest are decisions.
PROGRAM_METHODS = ("model_forward", "forward", "routed_path", "overlapped_routed_path",
                   "routed_input", "shared_before_routed", "shared_after_routed_path", "run_shared",
                   "launch_shared_on_aux", "finish_routed", "join_outputs", "trim_output",
                   "final_reduce", "maybe_reduce_shared", "next_layer_fused_reduce")
NOT_DECISIONS = ("__init__", "process_weights", "shared_input", "decide_order",
                 "shared_inside_routed", "before_aux_fork",
                 *(m for m in PROGRAM_METHODS if m != "maybe_reduce_shared"))


@dataclass(frozen=True)
class MutantInfo:
    name: str
    operator: str  # negate, always, never, dropcond, order, dropop
    target: str  # the method (or function) mutated
    description: str


MUTANTS: dict[str, type[MoERunner]] = {}
INFO: dict[str, MutantInfo] = {}

# Hand-checked reasons for mutants that cannot change behaviour; the report
# still verifies them against the fixed runner's traces before using them.
_NOOP_TRIM_HIDDEN = (
    "trims to `hidden` only where the result is already `hidden` wide: without padding the "
    "routed output has the routed width and a latent one is up-projected to hidden, so the "
    "trim added or removed is a no-op view"
)
_ONE_RANK = (
    "moe_tp and moe_ep are both 1 only with a single rank, where the tp all-reduce it adds "
    "is over a one-rank group (the identity)"
)
KNOWN_EQUIVALENT: dict[str, str] = {
    "M_always_post_trim_width": _NOOP_TRIM_HIDDEN,
    "M_dropcond_post_trim_width_2": _NOOP_TRIM_HIDDEN,
    "M_dropcond_post_trim_width_3": _NOOP_TRIM_HIDDEN,
    "M_dropcond_post_trim_width_4": _NOOP_TRIM_HIDDEN,
    "M_dropcond_pre_trim_width_1": (
        "without padding the routed output already has the routed width, so the early trim "
        "it adds keeps the shape (a no-op view)"
    ),
    "M_dropcond_fused_output_is_reduced_2": (
        "the kernel exists only with all-to-all kernels; its one non-reducing backend "
        "(allgather_reducescatter) is sequence parallel whenever tp > 1 (no final or shared "
        "reduce either way), and with tp = 1 every reduction it skips is over a one-rank tp group"
    ),
    "M_dropcond_needs_final_reduce_2": _ONE_RANK,
    "M_dropcond_needs_pre_transform_reduce_5": _ONE_RANK,
    "M_dropcond_needs_pre_transform_reduce_1": (
        "transform_nonlinear implies has_transform (the spec rejects a non-linear transform "
        "without latent_dim)"
    ),
    "M_dropcond_routed_output_padded_1": (
        "without padding every trim it adds keeps the shape (the routed output already has "
        "the routed width) and the declared width is the kernel width = hidden"
    ),
    "M_dropcond_order_mk_1": (
        "without all-to-all kernels the effective backend is `none` or allgather_reducescatter, "
        "neither supports async shared overlap, so the rule fires exactly where it did"
    ),
}


def _register(name: str, operator: str, target: str, description: str,
              attrs: dict[str, Any]) -> None:
    if name in MUTANTS:
        raise RuntimeError(f"duplicate mutant name {name}")
    cls = type(name, (MoERunner,), {
        **attrs, "name": name, "description": description,
        "__module__": __name__, "__qualname__": name,
    })
    MUTANTS[name] = cls
    INFO[name] = MutantInfo(name, operator, target, description)
    globals()[name] = cls  # `twin.mutate:<name>` resolves by attribute


# ---------------------------------------------------------------- ast helpers


def _parse(fn: Callable[..., Any]) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def _compile(fn: ast.FunctionDef, globs: dict[str, Any], label: str) -> Callable[..., Any]:
    module = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    # The runners module uses postponed annotations; keep them unevaluated here too.
    code = compile(module, f"<mutant {label}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    ns: dict[str, Any] = {}
    exec(code, globs, ns)  # noqa: S102 - our own source, mutated
    return ns[fn.name]


def _src(node: ast.AST) -> str:
    return ast.unparse(node)


class _Replace(ast.NodeTransformer):
    """Replace one node (by identity) with another (or remove it: None)."""

    def __init__(self, target: ast.AST, replacement: ast.AST | None) -> None:
        self.target = target
        self.replacement = replacement

    def visit(self, node: ast.AST) -> Any:
        if node is self.target:
            return self.replacement
        return super().visit(node)


def _mutated(fn: Callable[..., Any], pick: Callable[[ast.FunctionDef], tuple[ast.AST, ast.AST | None]]) -> ast.FunctionDef:
    """A fresh parse of fn with one node replaced (`pick` finds it on that parse)."""
    tree = _parse(fn)
    target, replacement = pick(tree)
    out = _Replace(target, replacement).visit(tree)
    assert isinstance(out, ast.FunctionDef)
    return out


def _nodes(tree: ast.AST, kind: type) -> list[Any]:
    return [n for n in ast.walk(tree) if isinstance(n, kind)]


def _op_name(call: ast.Call) -> str | None:
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


def _has_collective(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in COLLECTIVES
        for n in ast.walk(node)
    )


def _uses_super(fn: Callable[..., Any]) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "super" for n in ast.walk(_parse(fn)))


def _method(name: str) -> Callable[..., Any]:
    return getattr(MoERunner, name)


def _runner_globals(**overrides: Any) -> dict[str, Any]:
    if not overrides:
        return _runners.__dict__
    return {**_runners.__dict__, **overrides}


# ---------------------------------------------------------------- operators


def _decision_methods() -> list[str]:
    out = []
    for name, member in vars(MoERunner).items():
        if callable(member) and name not in NOT_DECISIONS and not name.startswith("_"):
            out.append(name)
    return out


def _negate_mutants() -> None:
    for name in _decision_methods():
        if inspect.signature(_method(name)).return_annotation not in ("bool", bool):
            continue
        base = _method(name)

        def negated(self: MoERunner, *args: Any, _base: Any = base, **kwargs: Any) -> bool:
            return not _base(self, *args, **kwargs)

        _register(f"M_negate_{name}", "negate", name, f"{name} returns the opposite", {name: negated})


def _suffix(items: list[Any], i: int) -> str:
    return f"_{i + 1}" if len(items) > 1 else ""


def _if_mutants() -> None:
    for name in _decision_methods():
        fn = _method(name)
        if _uses_super(fn):
            continue
        ifs = _nodes(_parse(fn), ast.If)
        for i, node in enumerate(ifs):
            body_is_collective = any(_has_collective(stmt) for stmt in node.body)
            for value, word in ((True, "always"), (False, "never")):
                if not value and body_is_collective:
                    continue  # same as dropping the collective (dropop)

                def pick(tree: ast.FunctionDef, i: int = i, value: bool = value) -> tuple[ast.AST, ast.AST]:
                    return _nodes(tree, ast.If)[i].test, ast.Constant(value)

                mname = f"M_{word}_{name}{_suffix(ifs, i)}"
                mfn = _compile(_mutated(fn, pick), _runner_globals(), mname)
                _register(mname, word, name,
                          f"{name}: `if {_src(node.test)}` replaced by `if {value}`", {name: mfn})


def _dropcond_in(fn: Callable[..., Any], method: str, prefix: str, boolops: list[ast.BoolOp],
                 install: Callable[[ast.FunctionDef, str], dict[str, Any]]) -> None:
    """One mutant per operand of every BoolOp in `boolops` (nodes of a parse of fn)."""
    tree0 = _parse(fn)
    all_ops = _nodes(tree0, ast.BoolOp)
    k = 0
    for op in boolops:
        idx = [i for i, n in enumerate(all_ops) if ast.dump(n) == ast.dump(op)][0]
        for j, operand in enumerate(op.values):
            k += 1

            def pick(tree: ast.FunctionDef, idx: int = idx, j: int = j) -> tuple[ast.AST, ast.AST]:
                node = _nodes(tree, ast.BoolOp)[idx]
                rest = [v for n, v in enumerate(node.values) if n != j]
                return node, rest[0] if len(rest) == 1 else ast.BoolOp(node.op, rest)

            mname = f"{prefix}_{k}"
            word = "and" if isinstance(op.op, ast.And) else "or"
            _register(mname, "dropcond", method,
                      f"{method}: drop `{_src(operand)}` from `{_src(op)}` ({word})",
                      install(_mutated(fn, pick), mname))


def _dropcond_mutants() -> None:
    for name in _decision_methods():
        fn = _method(name)
        if _uses_super(fn):
            continue
        ops = _nodes(_parse(fn), ast.BoolOp)
        if ops:
            _dropcond_in(fn, name, f"M_dropcond_{name}", ops,
                         lambda t, m, name=name: {name: _compile(t, _runner_globals(), m)})
    # Guards of collectives in the program (a decision inlined in the program).
    for name in PROGRAM_METHODS:
        fn = _method(name)
        tree = _parse(fn)
        guards = [n for n in _nodes(tree, ast.If) if any(_has_collective(s) for s in n.body)]
        ops = [b for g in guards for b in _nodes(g.test, ast.BoolOp)]
        if ops and name not in _decision_methods():
            _dropcond_in(fn, name, f"M_dropcond_{name}", ops,
                         lambda t, m, name=name: {name: _compile(t, _runner_globals(), m)})


def _order_method(order_fn: Callable[..., Any]) -> Callable[..., Any]:
    def shared_experts_order(self: MoERunner, num_tokens: int) -> Any:
        return order_fn(self.scenario, num_tokens)

    return shared_experts_order


def _rule_label(node: ast.If) -> str:
    ret = node.body[0]
    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Attribute):
        return ret.value.attr
    return _src(node.test)


def _short(label: str) -> str:
    return {"NO_OVERLAP": "disable", "MK_INTERNAL_OVERLAPPED": "mk",
            "MULTI_STREAM_OVERLAPPED": "multistream"}.get(label, label.lower())


def _inline_body(fn: Callable[..., Any]) -> list[ast.stmt]:
    """fn's statements, with a tail call `return g(<same parameters>)` to another
    function of the runners module replaced by g's statements (the order
    function is split over helpers; its rules are mutated as one list)."""
    tree = _parse(fn)
    params = [a.arg for a in tree.args.args]
    out: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        call = stmt.value if isinstance(stmt, ast.Return) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and [a.id for a in call.args if isinstance(a, ast.Name)] == params
                and inspect.isfunction(getattr(_runners, call.func.id, None))):
            callee = getattr(_runners, call.func.id)
            if [a.arg for a in _parse(callee).args.args] == params:
                out.extend(_inline_body(callee))
                continue
        out.append(stmt)
    return out


def _order_mutants() -> None:
    ref = _runners.reference_order
    body = _inline_body(ref)
    # Hoist plain assignments (`rt = s.runtime`) so that moving rules keeps them defined.
    assigns = [s for s in body if isinstance(s, ast.Assign)]
    rules = [s for s in body if isinstance(s, ast.If)]
    tail = [s for s in body if not isinstance(s, (ast.Assign, ast.If))]

    def build(new_rules: list[ast.stmt], label: str, globs: dict[str, Any] | None = None) -> dict[str, Any]:
        t = _parse(ref)
        t.body = [*assigns, *new_rules, *tail]
        fn = _compile(t, globs or _runner_globals(), label)
        return {"shared_experts_order": _order_method(fn)}

    for a in range(len(rules)):
        for b in range(a + 1, len(rules)):
            moved = list(rules)
            moved.insert(a, moved.pop(b))
            la, lb = _rule_label(rules[a]), _rule_label(rules[b])
            name = f"M_order_{_short(lb)}_before_{_short(la)}"
            _register(name, "order", "shared_experts_order",
                      f"shared_experts_order: the {lb} rule (`{_src(rules[b].test)}`) is checked "
                      f"before the {la} rule (`{_src(rules[a].test)}`)", build(moved, name))
    for a, rule in enumerate(rules):
        label = _rule_label(rule)
        name = f"M_order_drop_{_short(label)}_rule"
        _register(name, "order", "shared_experts_order",
                  f"shared_experts_order: the {label} rule (`{_src(rule.test)}`) is missing",
                  build([r for i, r in enumerate(rules) if i != a], name))
        for j, op in enumerate(_nodes(rule.test, ast.BoolOp)):
            for k, operand in enumerate(op.values):
                rest = [v for n, v in enumerate(op.values) if n != k]
                repl = rest[0] if len(rest) == 1 else ast.BoolOp(op.op, rest)
                t_rule = ast.parse(_src(rule)).body[0]
                t_op = _nodes(t_rule, ast.BoolOp)[j]
                t_rule = _Replace(t_op, repl).visit(t_rule)
                new_rules = [t_rule if i == a else r for i, r in enumerate(rules)]
                name = f"M_dropcond_order_{_short(label)}_{k + 1}"
                _register(name, "dropcond", "shared_experts_order",
                          f"shared_experts_order: drop `{_src(operand)}` from the {label} rule "
                          f"`{_src(op)}`", build(new_rules, name))
    # The disable rule lives in its own function: mutate it and rebuild the order on it.
    dis = _runners.overlap_disabled
    for i, op in enumerate(_nodes(_parse(dis), ast.BoolOp)):
        for k, operand in enumerate(op.values):
            def pick(tree: ast.FunctionDef, i: int = i, k: int = k) -> tuple[ast.AST, ast.AST]:
                node = _nodes(tree, ast.BoolOp)[i]
                rest = [v for n, v in enumerate(node.values) if n != k]
                return node, rest[0] if len(rest) == 1 else ast.BoolOp(node.op, rest)

            name = f"M_dropcond_overlap_disabled_{i + 1}_{k + 1}"
            mdis = _compile(_mutated(dis, pick), _runner_globals(), name)
            _register(name, "dropcond", "overlap_disabled",
                      f"overlap_disabled (the order's disable rule): drop `{_src(operand)}` "
                      f"from `{_src(op)}`", build(rules, name, _runner_globals(overlap_disabled=mdis)))
    for order in _runners.Order:
        def constant(self: MoERunner, num_tokens: int, _o: Any = order) -> Any:
            return _o

        _register(f"M_order_always_{order.name.lower()}", "order", "shared_experts_order",
                  f"shared_experts_order always returns {order.value}",
                  {"shared_experts_order": constant})


def _dropop_mutants() -> None:
    for name in PROGRAM_METHODS:
        fn = _method(name)
        tree = _parse(fn)
        calls = [c for c in _nodes(tree, ast.Call) if _op_name(c)]
        for i, call in enumerate(calls):
            step = _op_name(call)
            is_wait = isinstance(call.func, ast.Attribute) and call.func.attr == "wait_event"

            def pick(tree: ast.FunctionDef, i: int = i, is_wait: bool = is_wait) -> tuple[ast.AST, ast.AST | None]:
                c = [c for c in _nodes(tree, ast.Call) if _op_name(c)][i]
                if is_wait:
                    # The statement `ops.wait_event(...)`: replace it with `pass`.
                    stmt = next(s for s in ast.walk(tree) if isinstance(s, ast.Expr) and s.value is c)
                    return stmt, ast.Pass()
                return c, c.args[0]  # the op's result becomes its input

            mname = f"M_dropop_{step}"
            what = "stream wait" if is_wait else "op"
            _register(mname, "dropop", name,
                      f"{name}: the {what} `{step}` (`{_src(call)}`) is removed",
                      {name: _compile(_mutated(fn, pick), _runner_globals(), mname)})


def _build() -> None:
    _negate_mutants()
    _if_mutants()
    _dropcond_mutants()
    _order_mutants()
    _dropop_mutants()


_build()


# ---------------------------------------------------------------- the kill report


@dataclass
class MutantResult:
    mutant: str
    description: str
    killed: bool
    signature: str | None = None
    verdict: str | None = None
    equivalent: bool | None = None
    reason: str = ""
    examples: int = 0
    scenario: str | None = None  # summary line of the scenario that killed it
    # killed; equivalent; blind_spot (differs, no hazard predicted anywhere);
    # missed (the twin predicts a hazard on a pool scenario, the search did not
    # reach it); with confirm: refuted (the real run contradicts the prediction)
    # or unconfirmed (INCONCLUSIVE, e.g. a race the CPU stand-ins cannot provoke)
    status: str = "survived"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mutant": self.mutant,
            "description": self.description,
            "killed": self.killed,
            "signature": self.signature,
            "verdict": self.verdict,
            "equivalent": self.equivalent,
            "reason": self.reason,
            "examples": self.examples,
            "scenario": self.scenario,
            "status": self.status,
        }


@dataclass
class MutationReport:
    results: list[MutantResult]
    budget: int
    confirm: bool
    elapsed_s: float = 0.0
    equivalence_scenarios: int = 0

    @property
    def killed(self) -> int:
        return sum(r.killed for r in self.results)

    @property
    def kill_rate(self) -> float:
        return self.killed / len(self.results) if self.results else 0.0

    @property
    def survivors(self) -> list[MutantResult]:
        return [r for r in self.results if not r.killed]

    def to_dict(self) -> dict[str, Any]:
        equivalent = sum(1 for r in self.results if r.equivalent)
        killable = len(self.results) - equivalent
        return {
            "mutants": len(self.results),
            "killed": self.killed,
            "kill_rate": round(self.kill_rate, 4),
            "equivalent": equivalent,
            "blind_spots": sum(1 for r in self.results if r.status == "blind_spot"),
            "missed": sum(1 for r in self.results if r.status == "missed"),
            "refuted": sum(1 for r in self.results if r.status == "refuted"),
            "unconfirmed": sum(1 for r in self.results if r.status == "unconfirmed"),
            "kill_rate_non_equivalent": round(self.killed / killable, 4) if killable else None,
            "budget": self.budget,
            "confirm": self.confirm,
            "equivalence_scenarios": self.equivalence_scenarios,
            "elapsed_s": round(self.elapsed_s, 3),
            "results": [r.to_dict() for r in self.results],
        }


def behaviour(trace: Any) -> tuple[Any, ...]:
    """What a run observably does: decisions, the steps that change something
    (op, name, stream, shapes), output coefficients, hazards. Zero-effect steps
    (lifecycle marks, a pad or trim that keeps the shape, a collective over one
    rank) are left out, so a mutant differing only by those counts as equivalent."""
    from scenarios.trace import DECISION, LIFECYCLE

    def effective(st: Any) -> bool:
        if st.category in (LIFECYCLE, DECISION):
            return False
        if st.op in ("pad", "trim", "trim_rows", "view") and st.in_shapes and st.out_shape is not None:
            return tuple(st.in_shapes[0]) != tuple(st.out_shape)
        if st.group is not None and len(st.group) == 1:
            return False
        return True

    steps = tuple(
        (r, tuple((st.op, st.name, st.stream, tuple(map(tuple, st.in_shapes)),
                   tuple(st.out_shape or ())) for st in trace.steps[r] if effective(st)))
        for r in sorted(trace.steps)
    )
    outputs = tuple((r, tuple(sorted((k, round(v, 9)) for k, v in c.items())))
                    for r, c in sorted(trace.outputs.items()))
    hazards = tuple(sorted(h.signature for h in trace.hazards))
    return (tuple(sorted(trace.decisions.items())), steps, outputs, hazards)


def first_difference(a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
    """Where behaviour a (the mutant) first differs from b (fixed), in words."""
    if a[0] != b[0]:
        da, db = dict(a[0]), dict(b[0])
        k = next(k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k))
        return f"{k} {da.get(k)} instead of {db.get(k)}"
    if a[1] != b[1]:
        for (r, sa), (_r, sb) in zip(a[1], b[1]):
            if sa != sb:
                i = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
                mine = f"{sa[i][1]} on {sa[i][2]} {list(sa[i][4])}" if i < len(sa) else "nothing"
                ref = f"{sb[i][1]} on {sb[i][2]} {list(sb[i][4])}" if i < len(sb) else "nothing"
                return f"rank {r}: step {mine} where fixed has {ref}"
    if a[2] != b[2]:
        return f"output coefficients {dict(a[2][0][1]) if a[2] else {}} vs {dict(b[2][0][1]) if b[2] else {}}"
    return "hazards differ"


def corner_grid() -> list[Any]:
    """Every combination of the features the control logic branches on, at the
    smallest sizes: (tp, dp) in {1, 2}^2; no EP, or EP with each backend, with
    and without EPLB (both engine versions where SP depends on it); no/one
    shared expert x plain / padded / latent (linear, non-linear) / latent
    padded; CPU with and without an aux stream, CUDA with an aux stream under
    and over the token threshold.
    Odd token counts exercise the SP padding rows. ~3000 scenarios, ~1 ms each."""
    from scenarios.backends import BACKENDS
    from scenarios.spec import (
        ModelTraits,
        ParallelConfig,
        Runtime,
        Scenario,
        ScenarioError,
        Workload,
    )

    parallel: list[dict[str, Any]] = []
    for tp, dp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        parallel.append({"tp": tp, "dp": dp})
        for backend in BACKENDS:
            for eplb in (False, True):
                parallel.append({"tp": tp, "dp": dp, "ep": True, "backend": backend, "eplb": eplb})
                if tp == 2 and dp == 2:
                    parallel.append({"tp": tp, "dp": dp, "ep": True, "backend": backend,
                                     "eplb": eplb, "version": "previous"})
    models = []
    for shared in (0, 1):
        for latent, nonlinear, pad in ((None, False, 0), (None, False, 8), (16, False, 0),
                                       (16, True, 0), (16, False, 8), (16, True, 8)):
            models.append({"hidden": 32, "moe_intermediate": 32, "num_experts": 4, "top_k": 2,
                           "num_shared_experts": shared, "latent_dim": latent,
                           "transform_nonlinear": nonlinear,
                           "moe_hidden": (latent or 32) + pad if pad else None})
    # The order function reads the platform, aux stream and token threshold only
    # when there are shared experts: the other models get two runtimes, not four.
    runtimes = (({"platform": "cpu"}, 3), ({"platform": "cuda", "aux_stream": True,
                                            "token_threshold": 4}, 8))
    shared_runtimes = (*runtimes, ({"platform": "cpu", "aux_stream": True}, 3),
                       ({"platform": "cuda", "aux_stream": True}, 3))
    out = []
    for p in parallel:
        for m in models:
            for rt, tokens in (shared_runtimes if m["num_shared_experts"] else runtimes):
                try:
                    out.append(Scenario(name="corner", model=ModelTraits(**m),
                                        parallel=ParallelConfig(**p), runtime=Runtime(**rt),
                                        workload=Workload(tokens=tokens)))
                except ScenarioError:
                    continue
    return out


def equivalence_pool(n: int, seed: int = 0) -> list[Any]:
    """Scenarios to compare a surviving mutant with fixed on: n generated ones
    (seeded), the catalog (real model shapes) and the corner grid."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    from scenarios.loader import catalog, load_file
    from scenarios.strategies import moe_scenarios

    pool: list[Any] = []

    @hseed(seed)
    @settings(settings.get_profile("default"), max_examples=max(n, 1), database=None,
              deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(moe_scenarios())
    def collect(s: Any) -> None:
        pool.append(s)

    if n > 0:
        collect()
    pool.extend(load_file(e.file) for e in catalog())
    pool.extend(corner_grid())
    return pool


def check_equivalence(cls: type[MoERunner], pool: list[Any],
                      fixed: list[tuple[Any, ...]]) -> tuple[str, str]:
    """("equivalent", "") or ("missed" | "blind_spot", where and how it differs).

    missed: on some pool scenario the twin predicts a hazard for the mutant (the
    search did not get there); blind_spot: it behaves differently from fixed
    but the twin predicts nothing anywhere in the pool."""
    from twin.explore import simulate_safe, trace_findings

    first_diff = ""
    outputs_differ = False
    for s, ref in zip(pool, fixed):
        trace = simulate_safe(s, cls)
        if trace.hazards:
            h = next(iter(trace_findings(trace).values()))
            return "missed", f"on {s.summary_line()}: {h}"
        mine = behaviour(trace)
        if mine != ref:
            first_diff = first_diff or f"on {s.summary_line()}: {first_difference(mine, ref)}"
            outputs_differ = outputs_differ or mine[2] != ref[2]
    if first_diff:
        what = ("the output coefficients differ somewhere" if outputs_differ else
                "the output coefficients are the same everywhere (a different schedule)")
        return "blind_spot", f"{first_diff}; {what}"
    return "equivalent", ""


def run_mutation(
    budget: int = 200,
    confirm: bool = False,
    seed: int = 0,
    only: list[str] | None = None,
    equivalence_examples: int = 300,
    progress: Callable[[str], None] | None = None,
    timeout_s: float = 60.0,
) -> MutationReport:
    """Explore every mutant with `budget` examples; the survivors are checked for
    equivalence with fixed on a pool of scenarios (equivalent, or a blind spot)."""
    import fnmatch
    import time

    from twin.explore import check_budget, explore, simulate_safe

    t0 = time.perf_counter()
    budget = check_budget(budget)
    names = list(MUTANTS)
    if only:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(n, f"M_{p}") for p in only)]
        if not names:
            from twin.explore import ExploreInputError

            raise ExploreInputError(f"--mutant: no mutant matches {', '.join(only)} "
                                    f"(e.g. {', '.join(list(MUTANTS)[:3])})")
    say = progress or (lambda _m: None)
    results: list[MutantResult] = []
    pool: list[Any] | None = None
    fixed: list[tuple[Any, ...]] = []
    for i, name in enumerate(names):
        info = INFO[name]
        say(f"[{i + 1}/{len(names)}] {name}")
        res = explore(f"{__name__}:{name}", budget=budget, seed=seed, out=None, confirm=confirm,
                      stop_on_first=True, do_shrink=confirm, timeout_s=timeout_s)
        r = MutantResult(name, info.description, False, examples=res.examples)
        if res.findings:
            f = res.findings[0]
            r.signature, r.verdict, r.scenario = f.signature, f.verdict, f.scenario.summary_line()
            r.killed = (f.verdict == "CONFIRMED") if confirm else True
            r.status = ("killed" if r.killed else
                        "refuted" if f.verdict == "REFUTED" else "unconfirmed")
            r.reason = f.detail if r.killed else (
                f"predicted {f.signature} but the real run says {f.verdict}"
                + (f": {f.verdict_reason}" if f.verdict_reason else ""))
        if not r.killed and r.signature is None:
            if pool is None:
                say("equivalence pool: simulating fixed")
                pool = equivalence_pool(equivalence_examples, seed)
                fixed = [behaviour(simulate_safe(s, MoERunner)) for s in pool]
            r.status, where = check_equivalence(MUTANTS[name], pool, fixed)
            r.equivalent = r.status == "equivalent"
            if r.status == "equivalent":
                checked = (f"no observable difference from fixed on {len(pool)} scenarios (same "
                           "decisions, steps, shapes, streams and output coefficients)")
                why = KNOWN_EQUIVALENT.get(name)
                r.reason = f"equivalent: {why} ({checked})" if why else f"equivalent: {checked}"
            elif r.status == "missed":
                r.reason = (f"missed by the search ({budget} examples): the twin predicts a hazard "
                            f"{where}")
            else:
                r.reason = (f"blind spot: behaves differently from fixed {where}; "
                            f"no hazard is predicted on any of the {len(pool)} scenarios")
        elif not r.killed:
            r.equivalent = False
        say(f"{name}: {'killed' if r.killed else 'survived'}")
        results.append(r)
    return MutationReport(results, budget, confirm, time.perf_counter() - t0,
                          len(pool) if pool is not None else 0)


__all__ = [
    "INFO",
    "KNOWN_EQUIVALENT",
    "MUTANTS",
    "MutantInfo",
    "MutantResult",
    "MutationReport",
    "behaviour",
    "check_equivalence",
    "equivalence_pool",
    "run_mutation",
]
