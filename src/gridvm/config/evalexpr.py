"""The expression half of the xm config evaluator: bounded values (steps, sizes, nesting),
names, operators, comparisons, subscripts, attributes, f-strings, comprehensions and calls.
Statements (and so function bodies) are `gridvm.config.safeeval`'s."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from gridvm.config import xmsandbox
from gridvm.config.evalvalues import (
    _BINOPS,
    _CMPOPS,
    _CONSTANT_TYPES,
    _DIGITS,
    _ENV,
    _EXPRESSION_NAMES,
    _PERCENT_SPEC,
    _PY_ERRORS,
    BUILTINS,
    XM_VARS,
    Declared,
    Function,
    Limits,
    _Builtin,
    _Failure,
    _Measure,
    _Method,
    _Return,
)
from gridvm.errors import ConfigError


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class ExprEvaluator:
    """Evaluates expressions within the limits; `exec_block` comes from the statement half."""

    def __init__(self, filename: str, variables: Mapping[str, str], limits: Limits) -> None:
        self.filename = filename
        self.limits = limits
        self.globals: dict[str, object] = {"xm_vars": XM_VARS, "xm_file": filename, "xm_help": 0}
        self.globals.update(variables)
        self.lines: dict[str, int] = {}
        self.declared: dict[str, Declared] = {}
        self.steps = 0
        self.depth = 0
        # Values are never mutated after creation, so a container's size is computed once.
        self._sizes: dict[int, tuple[object, _Measure]] = {}

    # ----- errors and limits -----------------------------------------------------------

    def reject(self, message: str, node: ast.AST | None) -> NoReturn:
        line = getattr(node, "lineno", None) if node is not None else None
        raise ConfigError(message, file=self.filename, line=line)

    def fail(self, message: str, node: ast.AST) -> NoReturn:
        raise _Failure(message, getattr(node, "lineno", 0))

    def tick(self, node: ast.AST) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            self.reject(
                f"config takes too long to evaluate (over {self.limits.max_steps} steps)", node
            )

    def measure(self, value: object) -> _Measure:
        """Size, nesting depth and element count of `value`, recursively.

        Values are never mutated after creation, so each container is measured once.
        """
        if isinstance(value, str):
            return _Measure(len(value) + 1, 0, 0)
        if not isinstance(value, list | tuple | dict):
            return _Measure(1, 0, 0)
        cached = self._sizes.get(id(value))
        if cached is not None and cached[0] is value:
            return cached[1]
        items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
        size, depth, count = 1, 0, len(items)
        for item in items:
            sub = self.measure(item)
            size += sub.size
            depth = max(depth, sub.depth)
            count += sub.items
        result = _Measure(size, depth + 1, count)
        self._sizes[id(value)] = (value, result)
        return result

    def size(self, value: object) -> int:
        return self.measure(value).size

    def new(self, value: object, node: ast.AST) -> object:
        """Admit a freshly made value, enforcing the size limits (big values cost steps)."""
        limits = self.limits
        if isinstance(value, int) and value.bit_length() > limits.max_int_bits:
            self.reject(f"number too large (over {limits.max_int_bits} bits)", node)
        m = self.measure(value)
        if m.size > limits.max_size:
            self.reject(f"value too large (over {limits.max_size} characters/elements)", node)
        if m.depth > limits.max_nesting:
            self.reject(f"value nested too deeply (over {limits.max_nesting} levels)", node)
        self.charge(node, value)
        return value

    def charge(self, node: ast.AST, *values: object) -> None:
        """Count work on big values as steps: one per 2 elements or 1000 characters."""
        for value in values:
            m = self.measure(value)
            self.steps += m.items // 2 + m.size // 1000
        self.tick(node)

    # ----- statements -----------------------------------------------------------------

    def exec_block(self, body: list[ast.stmt], scope: list[dict[str, object]], *,
                   in_function: bool) -> None:
        raise NotImplementedError

    def truth(self, value: object) -> bool:
        return bool(value)

    def lookup(self, name: str, scope: list[dict[str, object]], node: ast.AST) -> object:
        if _is_dunder(name):
            self.reject(f"name {name!r} is not allowed", node)
        for frame in scope:
            if name in frame:
                return frame[name]
        if name in BUILTINS:
            return BUILTINS[name]
        decl = self.declared.get(name)
        if decl is not None:
            use = f" ({decl.use})" if decl.use else ""
            self.fail(f"variable {name!r} is not set: give it as {name}=VALUE{use}", node)
        self.fail(
            f"name {name!r} is not defined (if it is a variable, give it as {name}=VALUE)", node
        )

    def eval(self, node: ast.expr, scope: list[dict[str, object]]) -> object:
        self.tick(node)
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, _CONSTANT_TYPES):
                self.reject(f"{type(node.value).__name__} literals are not allowed", node)
            return node.value
        if isinstance(node, ast.Name):
            return self.lookup(node.id, scope, node)
        if isinstance(node, ast.List):
            return self.new([self.eval(e, scope) for e in node.elts], node)
        if isinstance(node, ast.Tuple):
            return self.new(tuple(self.eval(e, scope) for e in node.elts), node)
        if isinstance(node, ast.Dict):
            result: dict[Any, object] = {}
            for k, v in zip(node.keys, node.values, strict=True):
                if k is None:
                    self.reject("'**' unpacking is not allowed", node)
                key = self.eval(k, scope)
                try:
                    result[key] = self.eval(v, scope)
                except TypeError:
                    self.fail(f"unhashable dict key {key!r}", k)
            return self.new(result, node)
        if isinstance(node, ast.BinOp):
            return self.binop(node.op, self.eval(node.left, scope), self.eval(node.right, scope),
                              node)
        if isinstance(node, ast.UnaryOp):
            operand = self.eval(node.operand, scope)
            if isinstance(node.op, ast.Not):
                return not self.truth(operand)
            if isinstance(node.op, ast.USub | ast.UAdd) and isinstance(operand, int | float):
                return -operand if isinstance(node.op, ast.USub) else +operand
            self.fail(f"bad operand for unary operator: {type(operand).__name__}", node)
        if isinstance(node, ast.BoolOp):
            value: object = None
            for sub in node.values:
                value = self.eval(sub, scope)
                if isinstance(node.op, ast.And) != self.truth(value):
                    return value
            return value
        if isinstance(node, ast.Compare):
            return self.compare(node, scope)
        if isinstance(node, ast.IfExp):
            test = self.truth(self.eval(node.test, scope))
            return self.eval(node.body if test else node.orelse, scope)
        if isinstance(node, ast.Subscript):
            return self.subscript(node, scope)
        if isinstance(node, ast.Call):
            return self.call(node, scope)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, scope)
        if isinstance(node, ast.JoinedStr):
            return self.fstring(node, scope)
        if isinstance(node, ast.ListComp):
            return self.listcomp(node, scope)
        what = _EXPRESSION_NAMES.get(type(node), f"'{type(node).__name__}' expressions")
        self.reject(f"{what} are not allowed in config files", node)

    def binop(self, op: ast.operator, a: object, b: object, node: ast.AST) -> object:
        fn = _BINOPS.get(type(op))
        if fn is None:
            self.reject(f"operator {type(op).__name__} is not allowed", node)
        self.precheck(op, a, b, node)
        try:
            result = fn(a, b)
        except _PY_ERRORS as exc:
            self.fail(str(exc) or type(exc).__name__, node)
        if isinstance(result, complex):
            self.fail("complex numbers are not supported", node)
        return self.new(result, node)

    def precheck(self, op: ast.operator, a: object, b: object, node: ast.AST) -> None:
        """Refuse operations whose result would exceed the limits before computing them."""
        self.charge(node, a, b)
        limits = self.limits
        too_big = f"value too large (over {limits.max_size} characters/elements)"
        too_many_bits = f"number too large (over {limits.max_int_bits} bits)"
        if isinstance(op, ast.Mult):
            for seq, n in ((a, b), (b, a)):
                if (isinstance(seq, str | list | tuple) and isinstance(n, int)
                        and self.size(seq) * n > limits.max_size):
                    self.reject(too_big, node)
            if (isinstance(a, int) and isinstance(b, int)
                    and a.bit_length() + b.bit_length() > limits.max_int_bits + 1):
                self.reject(too_many_bits, node)
        elif isinstance(op, ast.Pow):
            if (isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1
                    and (b > limits.max_int_bits
                         or (abs(a).bit_length() - 1) * b > limits.max_int_bits)):
                self.reject(too_many_bits, node)
        elif isinstance(op, ast.Mod) and isinstance(a, str):
            self.check_percent(a, node)

    def check_percent(self, fmt: str, node: ast.AST) -> None:
        for match in _PERCENT_SPEC.finditer(fmt):
            for part in (match.group(1), match.group(2)):
                if part == "*":
                    self.reject("'*' widths are not allowed in format strings", node)
                if part and int(part) > self.limits.max_width:
                    self.reject(f"format width too large (over {self.limits.max_width})", node)

    def compare(self, node: ast.Compare, scope: list[dict[str, object]]) -> object:
        left = self.eval(node.left, scope)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.eval(comparator, scope)
            self.charge(node, left, right)
            try:
                ok = _CMPOPS[type(op)](left, right)
            except _PY_ERRORS as exc:
                self.fail(str(exc), node)
            if not ok:
                return False
            left = right
        return True

    def subscript(self, node: ast.Subscript, scope: list[dict[str, object]]) -> object:
        value = self.eval(node.value, scope)
        index: object
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else self.eval(p, scope)
                     for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            for p in parts:
                if p is not None and not isinstance(p, int):
                    self.fail("slice indices must be integers", node)
            index = slice(*parts)
        else:
            index = self.eval(node.slice, scope)
        if value is _ENV:
            if not isinstance(index, str):
                self.fail("xm_vars.env keys are names", node)
            return self.lookup(index, [self.globals], node)
        if not isinstance(value, str | list | tuple | dict):
            self.fail(f"{type(value).__name__} cannot be subscripted", node)
        try:
            result: object = value[index]  # type: ignore[index,call-overload]
        except _PY_ERRORS as exc:
            self.fail(f"{type(exc).__name__}: {exc}", node)
        return self.new(result, node)

    def attribute(self, node: ast.Attribute, scope: list[dict[str, object]]) -> object:
        dotted = ast.unparse(node)
        if isinstance(node.value, ast.Name) and node.value.id == "xm_vars":
            base = self.lookup("xm_vars", scope, node.value)
            if base is XM_VARS and node.attr in ("var", "check"):
                return _Method(node.attr)
            if base is XM_VARS and node.attr == "env":
                return _ENV
        if (isinstance(node.value, ast.Attribute) and node.attr == "get"
                and self.attribute(node.value, scope) is _ENV):
            return _Method("env.get")
        bound = isinstance(node.value, ast.Name) and any(node.value.id in f for f in scope)
        if bound or isinstance(node.value, ast.Call):
            base = self.eval(node.value, scope)
            found: object | None = None
            if isinstance(base, xmsandbox.SandboxModule):
                found = xmsandbox.module_attr(base, node.attr)
            elif isinstance(base, xmsandbox.MatchResult):
                found = base.attr(node.attr)
            if found is not None:
                return found
        self.reject(f"attribute access '{dotted}' is not allowed in config files", node)

    def fstring(self, node: ast.JoinedStr, scope: list[dict[str, object]]) -> object:
        parts: list[str] = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                parts.append(value.value)
                continue
            if not isinstance(value, ast.FormattedValue):  # pragma: no cover - grammar
                self.reject("unsupported f-string part", node)
            item = self.eval(value.value, scope)
            spec = ""
            if value.format_spec is not None:
                spec_value = self.eval(value.format_spec, scope)
                spec = spec_value if isinstance(spec_value, str) else str(spec_value)
                for digits in _DIGITS.findall(spec):
                    if int(digits) > self.limits.max_width:
                        self.reject(f"format width too large (over {self.limits.max_width})",
                                    node)
            if value.conversion == ord("r"):
                item = repr(item)
            elif value.conversion == ord("a"):
                item = ascii(item)
            elif value.conversion == ord("s"):
                item = str(item)
            try:
                parts.append(format(item, spec))
            except _PY_ERRORS as exc:
                self.fail(str(exc), node)
        return self.new("".join(parts), node)

    def listcomp(self, node: ast.ListComp, scope: list[dict[str, object]]) -> object:
        out: list[object] = []
        total = 1

        def walk(index: int, frames: list[dict[str, object]]) -> Iterator[list[dict[str, object]]]:
            if index == len(node.generators):
                yield frames
                return
            gen = node.generators[index]
            if gen.is_async:
                self.reject("async comprehensions are not allowed", node)
            iterable = self.eval(gen.iter, frames)
            if isinstance(iterable, dict):
                iterable = list(iterable)
            if not isinstance(iterable, list | tuple | str):
                self.fail(f"{type(iterable).__name__} is not iterable", gen.iter)
            for item in iterable:
                self.tick(gen.iter)
                local: dict[str, object] = {}
                inner = [local, *frames]
                self.bind_target(gen.target, item, local, node)
                if all(self.truth(self.eval(cond, inner)) for cond in gen.ifs):
                    yield from walk(index + 1, inner)

        for frames in walk(0, scope):
            item = self.eval(node.elt, frames)
            total += self.size(item)
            if total > self.limits.max_size:
                self.reject(f"value too large (over {self.limits.max_size} characters/elements)",
                            node)
            out.append(item)
        return self.new(out, node)

    def bind_target(self, target: ast.expr, value: object, frame: dict[str, object],
                    node: ast.AST) -> None:
        if isinstance(target, ast.Name):
            if _is_dunder(target.id):
                self.reject(f"name {target.id!r} is not allowed", target)
            frame[target.id] = value
        elif isinstance(target, ast.Tuple | ast.List):
            if not isinstance(value, list | tuple | str) or len(value) != len(target.elts):
                self.fail(f"cannot unpack {value!r}", node)
            for sub, item in zip(target.elts, value, strict=True):
                self.bind_target(sub, item, frame, node)
        else:
            self.reject("only plain names can be assigned", target)

    # ----- calls ----------------------------------------------------------------------

    def call(self, node: ast.Call, scope: list[dict[str, object]]) -> object:
        func = node.func
        if isinstance(func, ast.Name):
            if _is_dunder(func.id):
                self.reject(f"name {func.id!r} is not allowed", func)
            if not any(func.id in frame for frame in scope) and func.id not in BUILTINS:
                self.reject(f"call to '{func.id}' is not allowed in config files", node)
            target = self.lookup(func.id, scope, func)
        elif isinstance(func, ast.Attribute):
            target = self.attribute(func, scope)
        else:
            self.reject("only calls of named functions are allowed", node)
        args: list[object] = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.reject("'*' arguments are not allowed", arg)
            args.append(self.eval(arg, scope))
        kwargs: dict[str, object] = {}
        for kw in node.keywords:
            if kw.arg is None:
                self.reject("'**' arguments are not allowed", kw.value)
            kwargs[kw.arg] = self.eval(kw.value, scope)
        return self.invoke(target, args, kwargs, node)

    def invoke(self, target: object, args: list[object], kwargs: dict[str, object],
               node: ast.AST) -> object:
        if isinstance(target, Function):
            return self.call_function(target, args, kwargs, node)
        if isinstance(target, _Builtin):
            if target.name == "range":
                self.check_range(args, node)
            self.charge(node, *args)
            try:
                result = target.fn(*args, **kwargs)
            except _PY_ERRORS as exc:
                self.fail(f"{target.name}(): {exc}", node)
            return self.new(result, node)
        if isinstance(target, _Method):
            return self.xm_vars_call(target.name, args, kwargs, node)
        if isinstance(target, xmsandbox.SandboxFunction):
            self.charge(node, *args)
            try:
                result = target.fn(*args, **kwargs)
            except (ValueError, TypeError, IndexError, re.error) as exc:
                self.fail(f"{target.name}(): {exc}", node)
            return self.new(result, node)
        self.fail(f"{type(target).__name__} object is not callable", node)

    def check_range(self, args: list[object], node: ast.AST) -> None:
        if not args or len(args) > 3 or not all(type(a) is int for a in args):
            self.fail("range() takes 1 to 3 integers", node)
        ints = [a for a in args if isinstance(a, int)]
        try:
            length = len(range(*ints))
        except (ValueError, OverflowError) as exc:
            self.fail(f"range(): {exc}", node)
        if length > self.limits.max_size:
            self.reject(f"range too large (over {self.limits.max_size} elements)", node)

    def call_function(self, fn: Function, args: list[object], kwargs: dict[str, object],
                      node: ast.AST) -> object:
        if self.depth >= self.limits.max_depth:
            self.reject(f"function calls nested too deeply (over {self.limits.max_depth})", node)
        if len(args) > len(fn.params):
            self.fail(f"{fn.name}() takes {len(fn.params)} arguments, {len(args)} given", node)
        local: dict[str, object] = dict(zip(fn.params, args, strict=False))
        first_default = len(fn.params) - len(fn.defaults)
        for i, param in enumerate(fn.params):
            if param in kwargs:
                if param in local:
                    self.fail(f"{fn.name}() got two values for {param!r}", node)
                local[param] = kwargs.pop(param)
            elif param not in local and i >= first_default:
                local[param] = fn.defaults[i - first_default]
            elif param not in local:
                self.fail(f"{fn.name}() is missing argument {param!r}", node)
        if kwargs:
            self.fail(f"{fn.name}() got an unexpected argument {next(iter(kwargs))!r}", node)
        self.depth += 1
        try:
            self.exec_block(list(fn.body), [local, self.globals], in_function=True)
        except _Return as ret:
            return ret.value
        finally:
            self.depth -= 1
        return None

    def xm_vars_call(self, name: str, args: list[object], kwargs: dict[str, object],
                     node: ast.AST) -> object:
        if name == "var":
            self.declare(args, kwargs, node)
            return None
        if name == "check":
            if args or kwargs:
                self.fail("xm_vars.check() takes no arguments", node)
            self.run_checks(node)
            return None
        # env.get
        if kwargs or not 1 <= len(args) <= 2 or not isinstance(args[0], str):
            self.fail("xm_vars.env.get(name[, default]) expects a name", node)
        return self.globals.get(args[0], args[1] if len(args) == 2 else None)

    def declare(self, args: list[object], kwargs: dict[str, object], node: ast.AST) -> None:
        names = ("name", "use", "check")
        if len(args) > 3 or set(kwargs) - set(names):
            self.fail("xm_vars.var(name, use=..., check=...) has three parameters", node)
        params: dict[str, object] = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key in params:
                self.fail(f"xm_vars.var() got two values for {key!r}", node)
            params[key] = value
        var, use, check = params.get("name"), params.get("use"), params.get("check")
        if not isinstance(var, str) or not var.isidentifier() or _is_dunder(var):
            self.fail(f"xm_vars.var(): invalid variable name {var!r}", node)
        if use is not None and not isinstance(use, str):
            self.fail("xm_vars.var(): 'use' must be a string", node)
        if check is not None and not isinstance(check, Function):
            self.fail("xm_vars.var(): 'check' must be a function", node)
        self.declared[var] = Declared(var, use, check, getattr(node, "lineno", 0))

    def run_checks(self, node: ast.AST) -> None:
        """Xen's `Vars.check()`: replace each declared variable by `check(name, value)`."""
        for decl in self.declared.values():
            if decl.check is None:
                continue
            given = self.globals.get(decl.name)
            try:
                result = self.invoke(decl.check, [decl.name, given], {}, node)
            except _Failure as exc:
                if given is None:
                    use = f" ({decl.use})" if decl.use else ""
                    self.reject(
                        f"variable {decl.name!r} is not set: give it as {decl.name}=VALUE{use}",
                        node,
                    )
                why = f": {exc.message}" if exc.message else ""
                self.reject(f"invalid value for variable {decl.name}: {given!r}{why}", node)
            self.globals[decl.name] = result
