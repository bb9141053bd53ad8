"""What `import os, re` gives an xm config file: a few answers, not the modules.

Xen's example configs begin with `import os, re` and compute paths from `os.uname()` and
`re.search(...)`. The safe evaluator binds `os` and `re` to the stand-ins below: nothing is
imported or executed. `os.uname()` answers this host's uname; `re.search`/`re.match` run
patterns that cannot backtrack for long (no repetition of a repetition or of alternatives,
at most three repetitions, no backreferences, short patterns and subjects) and return a
match object with `group()`, `groups()`, `start()`, `end()`, `span()`. Any other attribute
is refused with file:line.
"""

from __future__ import annotations

import os
import re

# The regex parser, used only to inspect a pattern's structure (typeshed has no stubs for
# these private modules; the public sre_* aliases are deprecated since Python 3.11).
import re._constants as sre_constants  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODULES = ("os", "re")
MAX_PATTERN = 200
MAX_SUBJECT = 256
MAX_REPEATS = 3
FLAGS = {"I": re.I, "IGNORECASE": re.I}



@dataclass(frozen=True)
class SandboxModule:
    name: str

    def __repr__(self) -> str:
        return f"<module {self.name} (gridvm stand-in)>"


@dataclass(frozen=True)
class SandboxFunction:
    name: str
    fn: Callable[..., object]

    def __repr__(self) -> str:
        return f"<function {self.name} (gridvm stand-in)>"


class MatchResult:
    """A regular-expression match, with the read-only parts of Python's match object."""

    def __init__(self, match: re.Match[str]) -> None:
        self._m = match

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<match {self._m.group(0)!r}>"

    def attr(self, name: str) -> SandboxFunction | None:
        m = self._m
        methods: dict[str, Callable[..., object]] = {
            "group": lambda *i: m.group(*i) if i else m.group(0),
            "groups": lambda: m.groups(),
            "start": lambda i=0: m.start(i), "end": lambda i=0: m.end(i),
            "span": lambda i=0: m.span(i),
        }
        fn = methods.get(name)
        return SandboxFunction(f"match.{name}", fn) if fn else None


def check_pattern(pattern: object) -> str:
    """The pattern, if it is a short one that cannot backtrack for long; else ValueError."""
    if not isinstance(pattern, str):
        raise ValueError("the pattern must be a string")
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"pattern longer than {MAX_PATTERN} characters")
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"bad pattern: {exc}") from None
    repeats = _walk(parsed, nested=False)
    if repeats > MAX_REPEATS:
        raise ValueError(f"pattern has more than {MAX_REPEATS} repetitions")
    return pattern


_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
            getattr(sre_constants, "POSSESSIVE_REPEAT", sre_constants.MAX_REPEAT)}


def _walk(items: Any, nested: bool) -> int:
    """Count repetitions; refuse repetition inside repetition and backreferences."""
    count = 0
    for op, av in items:
        if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            raise ValueError("backreferences are not allowed in patterns")
        if op in _REPEATS:
            if nested:
                raise ValueError("nested repetition is not allowed in patterns")
            count += 1 + _walk(av[2], nested=True)
        elif op == sre_constants.SUBPATTERN:
            count += _walk(av[-1], nested)
        elif op == sre_constants.BRANCH:
            if nested:
                raise ValueError("nested repetition is not allowed in patterns "
                                 "(alternatives under * or +)")
            for alternative in av[1]:
                count += _walk(alternative, nested)
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            count += _walk(av[1], nested)
    return count


def _subject(text: object) -> str:
    if not isinstance(text, str):
        raise ValueError("the string to search must be a string")
    if len(text) > MAX_SUBJECT:
        raise ValueError(f"string longer than {MAX_SUBJECT} characters")
    return text


def _flags(flags: object) -> int:
    if not isinstance(flags, int) or flags & ~re.I:
        raise ValueError("only re.I / re.IGNORECASE flags are supported")
    return flags


def _search(pattern: object, string: object, flags: object = 0) -> MatchResult | None:
    m = re.search(check_pattern(pattern), _subject(string), _flags(flags))
    return MatchResult(m) if m else None


def _match(pattern: object, string: object, flags: object = 0) -> MatchResult | None:
    m = re.match(check_pattern(pattern), _subject(string), _flags(flags))
    return MatchResult(m) if m else None


def _uname() -> tuple[str, str, str, str, str]:
    u = os.uname()
    return (u.sysname, u.nodename, u.release, u.version, u.machine)


_ATTRS: dict[str, dict[str, object]] = {
    "os": {"uname": SandboxFunction("os.uname", _uname)},
    "re": {"search": SandboxFunction("re.search", _search),
           "match": SandboxFunction("re.match", _match), **FLAGS},
}


def module_attr(module: SandboxModule, name: str) -> object | None:
    """`os.uname`, `re.search`, `re.match`, `re.I`; None for anything else."""
    return _ATTRS.get(module.name, {}).get(name)
