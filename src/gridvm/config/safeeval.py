"""A restricted evaluator for xm config files: Python syntax read as data, never executed.

Xen's `xm create` ran config files with `execfile`; gridvm parses them with `ast` and walks
the tree itself. What a config may contain:

* statements: `name = expr` (also `a = b = expr`, `a, b = expr`), `name += expr` (and the
  other arithmetic augmented assignments), `if/elif/else`, `def` of small functions (check
  functions; their bodies may use assignments, `if`, `return`, `raise ValueError(...)`),
  `pass`, docstrings, and expression statements that are calls (`xm_vars.var(...)`,
  `xm_vars.check()`);
* expressions: literals, lists, tuples, dicts, names, f-strings, `+ - * / // % **`,
  `%` formatting, comparisons, `and/or/not`, `x if c else y`, subscripts and slices, list
  comprehensions, and calls of `int str float bool len range max min abs list`, of functions
  the file defines, and of `xm_vars.var`, `xm_vars.check`, `xm_vars.env.get`;
* `import os, re` at the top level, as in Xen's examples: the names get stand-ins that answer
  `os.uname()`, `re.search()` and `re.match()` (`gridvm.config.xmsandbox`), nothing more.

Everything else (any other `import`, other attribute access, dunder names, `lambda`, loops, unknown
calls such as `open` or `exec`) is a `ConfigError` naming file:line. Evaluation is bounded in
steps, call depth, value size (characters plus elements) and integer size, so a hostile file
cannot hang or exhaust the reader.

`xm_vars` follows Xen's `xen.xm.help.Vars`: `xm_vars.var(name, use, check)` declares a
variable; `xm_vars.check()` calls `check(name, value)` for each declared variable, with the
string given on the command line (or None), and the returned value replaces the variable.
"""

from __future__ import annotations

import ast
import keyword
from collections.abc import Mapping
from typing import NoReturn

from gridvm.config import xmsandbox
from gridvm.config.evalexpr import ExprEvaluator, _is_dunder
from gridvm.config.evalvalues import (
    _EXCEPTIONS,
    _STATEMENT_NAMES,
    PREDEFINED,
    EvalResult,
    Function,
    Limits,
    _Failure,
    _Return,
)
from gridvm.errors import ConfigError

__all__ = [
    "EvalResult",
    "Limits",
    "Function",
    "evaluate",
    "first_code_statement",
    "parse_source",
]


def parse_source(source: str, filename: str, limits: Limits | None = None) -> ast.Module:
    """Parse config text into an AST; a syntax error is a `ConfigError` at its line."""
    limits = limits or Limits()
    if len(source) > limits.max_source:
        raise ConfigError(
            f"config is too large (over {limits.max_source} characters)", file=filename
        )
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as exc:
        raise ConfigError(f"syntax error: {exc.msg}", file=filename, line=exc.lineno) from None
    except (RecursionError, MemoryError) as exc:
        # CPython's parser gives up on deep nesting with these (often with no message)
        raise ConfigError("cannot parse config: expressions nested too deeply "
                          f"({type(exc).__name__})", file=filename) from None
    except ValueError as exc:  # e.g. a NUL character
        raise ConfigError(f"cannot parse config: {exc}", file=filename) from None


def _is_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str | int | float) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = node.operand
        return isinstance(operand, ast.Constant) and isinstance(operand.value, int | float)
    if isinstance(node, ast.List | ast.Tuple):
        return all(_is_literal(e) for e in node.elts)
    return False


def first_code_statement(tree: ast.Module) -> ast.stmt | None:
    """The first statement that is not plain `KEY = literal` / `KEY += literal` data.

    xl files hold only such settings; anything else marks an xm (Python) config.
    """
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and _is_literal(stmt.value)
        ):
            continue
        if (
            isinstance(stmt, ast.AugAssign)
            and isinstance(stmt.op, ast.Add)
            and isinstance(stmt.target, ast.Name)
            and _is_literal(stmt.value)
        ):
            continue
        return stmt
    return None


def _used_names(tree: ast.Module) -> set[str]:
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            used.add(node.id)
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            if (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in ("var", "get")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                used.add(first.value)
    return used


class _Evaluator(ExprEvaluator):
    """The statement half: assignments, if, def, import, raise, return."""

    def run(self, tree: ast.Module) -> None:
        scope = [self.globals]
        try:
            self.exec_block(tree.body, scope, in_function=False)
        except _Failure as exc:
            raise ConfigError(exc.message, file=self.filename, line=exc.line) from None
        except RecursionError:
            self.reject("config is nested too deeply", None)

    def exec_block(self, body: list[ast.stmt], scope: list[dict[str, object]], *,
                   in_function: bool) -> None:
        for stmt in body:
            self.exec_stmt(stmt, scope, in_function=in_function)

    def exec_stmt(self, stmt: ast.stmt, scope: list[dict[str, object]], *,
                  in_function: bool) -> None:
        self.tick(stmt)
        if isinstance(stmt, ast.Assign):
            value = self.eval(stmt.value, scope)
            for target in stmt.targets:
                self.assign(target, value, scope, stmt)
        elif isinstance(stmt, ast.AugAssign):
            if not isinstance(stmt.target, ast.Name):
                self.reject("only plain names can be assigned", stmt)
            current = self.lookup(stmt.target.id, scope, stmt.target)
            value = self.binop(stmt.op, current, self.eval(stmt.value, scope), stmt)
            self.assign(stmt.target, value, scope, stmt)
        elif isinstance(stmt, ast.If):
            branch = stmt.body if self.truth(self.eval(stmt.test, scope)) else stmt.orelse
            self.exec_block(branch, scope, in_function=in_function)
        elif isinstance(stmt, ast.Expr):
            if isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                return  # docstring
            if not isinstance(stmt.value, ast.Call):
                self.reject("an expression on its own line has no effect; only calls are allowed",
                            stmt)
            self.eval(stmt.value, scope)
        elif isinstance(stmt, ast.Pass):
            return
        elif isinstance(stmt, ast.FunctionDef):
            if in_function:
                self.reject("functions cannot be defined inside functions", stmt)
            self.define(stmt, scope)
        elif isinstance(stmt, ast.Return):
            if not in_function:
                self.reject("'return' outside a function", stmt)
            raise _Return(None if stmt.value is None else self.eval(stmt.value, scope))
        elif isinstance(stmt, ast.Raise):
            self.raise_(stmt, scope)
        elif isinstance(stmt, ast.Import) and not in_function:
            self.import_(stmt, scope)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            self.reject("'import' is not allowed here (only 'import os, re' at the top level, "
                        "answered by gridvm)", stmt)
        else:
            what = _STATEMENT_NAMES.get(type(stmt), f"'{type(stmt).__name__}' statements")
            self.reject(f"{what} are not allowed in config files", stmt)

    def import_(self, stmt: ast.Import, scope: list[dict[str, object]]) -> None:
        """`import os, re` as in Xen's examples: the names get gridvm's stand-ins."""
        for alias in stmt.names:
            if alias.name not in xmsandbox.MODULES:
                self.reject(f"'import {alias.name}' is not allowed in config files (they are "
                            "read as data; only 'import os, re' is understood)", stmt)
            scope[0][alias.asname or alias.name] = xmsandbox.SandboxModule(alias.name)

    def assign(self, target: ast.expr, value: object, scope: list[dict[str, object]],
               stmt: ast.stmt) -> None:
        if isinstance(target, ast.Name):
            name = target.id
            if _is_dunder(name):
                self.reject(f"name {name!r} is not allowed", target)
            scope[0][name] = value
            if scope[0] is self.globals:
                self.lines[name] = stmt.lineno
        elif isinstance(target, ast.Tuple | ast.List):
            if not isinstance(value, list | tuple | str):
                self.fail(f"cannot unpack {type(value).__name__}", stmt)
            if len(value) != len(target.elts):
                self.fail(f"cannot unpack {len(value)} values into {len(target.elts)} names", stmt)
            for sub, item in zip(target.elts, value, strict=True):
                self.assign(sub, item, scope, stmt)
        else:
            self.reject("only plain names can be assigned", target)

    def define(self, stmt: ast.FunctionDef, scope: list[dict[str, object]]) -> None:
        args = stmt.args
        if stmt.decorator_list:
            self.reject("decorators are not allowed", stmt.decorator_list[0])
        if args.vararg or args.kwarg or args.kwonlyargs:
            self.reject("functions may take only plain parameters", stmt)
        if _is_dunder(stmt.name):
            self.reject(f"name {stmt.name!r} is not allowed", stmt)
        params = tuple(a.arg for a in (*args.posonlyargs, *args.args))
        defaults = tuple(self.eval(d, scope) for d in args.defaults)
        scope[0][stmt.name] = Function(stmt.name, params, defaults, tuple(stmt.body), stmt.lineno)

    def raise_(self, stmt: ast.Raise, scope: list[dict[str, object]]) -> NoReturn:
        exc = stmt.exc
        if stmt.cause is not None or exc is None:
            self.reject("only 'raise ValueError(...)' is allowed", stmt)
        if isinstance(exc, ast.Name) and exc.id in _EXCEPTIONS:
            self.fail("", stmt)
        if (
            isinstance(exc, ast.Call)
            and isinstance(exc.func, ast.Name)
            and exc.func.id in _EXCEPTIONS
            and not exc.keywords
            and len(exc.args) <= 1
        ):
            message = self.eval(exc.args[0], scope) if exc.args else ""
            self.fail(message if isinstance(message, str) else repr(message), stmt)
        self.reject("only 'raise ValueError(...)' is allowed", stmt)

    # ----- expressions ----------------------------------------------------------------


def evaluate(
    source: str | ast.Module,
    filename: str = "<config>",
    variables: Mapping[str, str] | None = None,
    *,
    limits: Limits | None = None,
) -> EvalResult:
    """Evaluate config text (or an already parsed tree) and return the names it defines.

    `variables` are the command-line `NAME=VALUE` strings, visible to the file as names.
    Raises `ConfigError` (with file and line) for anything not allowed or failing.
    """
    limits = limits or Limits()
    tree = source if isinstance(source, ast.Module) else parse_source(source, filename, limits)
    variables = dict(variables or {})
    for name, value in variables.items():
        if (
            not isinstance(name, str)
            or not name.isidentifier()
            or keyword.iskeyword(name)
            or name.startswith("_")
            or name in PREDEFINED
        ):
            raise ConfigError(f"invalid variable name {name!r}", file=filename)
        if not isinstance(value, str):
            raise ConfigError(f"variable {name}: value must be a string", file=filename)
    ev = _Evaluator(filename, variables, limits)
    ev.run(tree)
    return EvalResult(values=ev.globals, lines=ev.lines, used=_used_names(tree),
                      declared=ev.declared)
