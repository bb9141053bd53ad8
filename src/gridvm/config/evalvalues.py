"""The values the xm config evaluator works with: limits, the config's own functions, its
declared variables, what an evaluation returns, and the operator and builtin tables."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Limits:
    """Bounds on one evaluation."""

    # characters of config text: real configs are a few KiB; parsing costs ~0.5 KiB of
    # memory and ~2 us per character at worst (1 MB took 1.8 s and 550 MB)
    max_source: int = 256 * 1024
    max_steps: int = 100_000  # evaluated nodes (work on big values counts extra)
    max_size: int = 1_000_000  # size of any value: characters + elements, recursively
    max_int_bits: int = 4096
    max_depth: int = 32  # nested function calls
    max_nesting: int = 64  # nested lists, tuples and dicts
    max_width: int = 10_000  # width/precision in a format spec


@dataclass(frozen=True)
class Function:
    """A function defined by the config (`def vmid_check(var, val): ...`)."""

    name: str
    params: tuple[str, ...]
    defaults: tuple[object, ...]
    body: tuple[ast.stmt, ...]
    line: int

    def __repr__(self) -> str:
        return f"<function {self.name}>"


@dataclass(frozen=True)
class Declared:
    """A variable declared with `xm_vars.var`."""

    name: str
    use: str | None
    check: object
    line: int


@dataclass
class EvalResult:
    """The names a config file leaves behind."""

    values: dict[str, object]  # every top-level name, including command-line variables
    lines: dict[str, int]  # names the file assigned at top level -> line of the last assignment
    used: set[str]  # names the file reads somewhere
    declared: dict[str, Declared] = field(default_factory=dict)


class _Measure(NamedTuple):
    size: int  # characters + elements, recursively
    depth: int  # container nesting
    items: int  # elements, recursively


class _XmVars:
    def __repr__(self) -> str:
        return "<xm_vars>"


class _Env:
    def __repr__(self) -> str:
        return "<xm_vars.env>"


@dataclass(frozen=True)
class _Method:
    name: str  # "var", "check", "env.get"

    def __repr__(self) -> str:
        return f"<xm_vars.{self.name}>"


@dataclass(frozen=True)
class _Builtin:
    name: str
    fn: Callable[..., Any]

    def __repr__(self) -> str:
        return f"<builtin {self.name}>"


XM_VARS = _XmVars()
_ENV = _Env()
PREDEFINED = frozenset({"xm_vars", "xm_file", "xm_help"})


class _Failure(Exception):
    """A run-time error of the config's own logic (what would be a Python exception)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _Return(Exception):
    def __init__(self, value: object) -> None:
        super().__init__()
        self.value = value


_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_EXCEPTIONS = frozenset({"ValueError", "TypeError"})
_PY_ERRORS = (TypeError, ValueError, ZeroDivisionError, OverflowError, IndexError, KeyError)
_PERCENT_SPEC = re.compile(
    r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?([diouxXeEfFgGcrsa%])?"
)
_DIGITS = re.compile(r"\d+")
_CONSTANT_TYPES = (str, int, float, bool, type(None))

_STATEMENT_NAMES = {
    ast.For: "'for' loops",
    ast.While: "'while' loops",
    ast.With: "'with' statements",
    ast.Try: "'try' statements",
    ast.ClassDef: "classes",
    ast.Global: "'global' statements",
    ast.Nonlocal: "'nonlocal' statements",
    ast.Delete: "'del' statements",
    ast.Assert: "'assert' statements",
    ast.AsyncFunctionDef: "async functions",
}
_EXPRESSION_NAMES = {
    ast.Lambda: "lambda expressions",
    ast.GeneratorExp: "generator expressions",
    ast.SetComp: "set comprehensions",
    ast.DictComp: "dict comprehensions",
    ast.Set: "set literals",
    ast.NamedExpr: "':=' assignments",
    ast.Await: "'await' expressions",
    ast.Yield: "'yield' expressions",
    ast.YieldFrom: "'yield' expressions",
    ast.Starred: "starred ('*') expressions",
}


def _range(*args: int) -> list[int]:
    return list(range(*args))


_BUILTIN_FNS: dict[str, Callable[..., Any]] = {
    "int": int,
    "str": str,
    "float": float,
    "bool": bool,
    "len": len,
    "range": _range,
    "max": max,
    "min": min,
    "abs": abs,
    "list": list,
}
BUILTINS = {name: _Builtin(name, fn) for name, fn in _BUILTIN_FNS.items()}
