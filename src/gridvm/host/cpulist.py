"""Xen CPU list syntax (`cpus = "0-3,5,^1"`) to and from sets of CPU numbers.

Items are applied left to right, as xl does: `N` or `N-M` adds CPUs, `^N` or
`^N-M` removes them, `all` adds every host CPU. `"all,^0"` is every CPU but 0;
`"^1"` alone is empty and therefore an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from gridvm.errors import ConfigError

__all__ = ["format_cpulist", "host_cpu_count", "parse_cpu_items", "parse_cpulist"]

_RANGE = re.compile(r"(\^?)(\d+)(?:-(\d+))?")


def host_cpu_count() -> int:
    """Number of CPUs of this host (the upper bound for CPU numbers)."""
    return os.cpu_count() or 1


def parse_cpulist(spec: str | Sequence[int | str], ncpus: int | None = None) -> frozenset[int]:
    """CPUs named by a Xen cpu list string or by a list of CPUs/cpu list strings.

    `ncpus` is the host CPU count (default: this host); CPUs must be below it.
    """
    if isinstance(spec, str):
        return parse_cpu_items([spec], ncpus, text=spec)
    return parse_cpu_items(spec, ncpus)


def parse_cpu_items(
    items: Sequence[int | str], ncpus: int | None = None, *, text: str | None = None
) -> frozenset[int]:
    """CPUs named by a list such as `[0, 1]` or `["0-2", "^1"]`, applied in order.

    `text` is what error messages quote (default: the list itself).
    """
    if not _is_list(items):
        raise ConfigError(f"invalid cpu list {items!r}: expected a string or a list")
    shown = repr(text) if text is not None else repr(list(items))
    count = host_cpu_count() if ncpus is None else ncpus
    cpus: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ConfigError(f"invalid cpu list {shown}: {item!r} is not a CPU number or range")
        if isinstance(item, int):
            _check_cpu(item, count, shown)
            cpus.add(item)
            continue
        for token in item.split(","):
            _apply_token(cpus, token.strip(), count, shown)
    if not cpus:
        raise ConfigError(f"invalid cpu list {shown}: it selects no CPU")
    return frozenset(cpus)


def _is_list(items: object) -> bool:
    return isinstance(items, Sequence) and not isinstance(items, str | bytes)


def _apply_token(cpus: set[int], token: str, count: int, shown: str) -> None:
    if token == "all":
        cpus.update(range(count))
        return
    if token.startswith(("node:", "nodes:", "^node:", "^nodes:")):
        raise ConfigError(f"invalid cpu list {shown}: NUMA node lists are not supported")
    match = _RANGE.fullmatch(token)
    if match is None:
        what = "an empty item" if not token else f"{token!r} is not N, N-M, ^N, ^N-M or all"
        raise ConfigError(f"invalid cpu list {shown}: {what}")
    exclude, first, last = match.group(1), int(match.group(2)), match.group(3)
    end = int(last) if last is not None else first
    if end < first:
        raise ConfigError(f"invalid cpu list {shown}: range {token!r} runs backwards")
    _check_cpu(end, count, shown)
    if exclude:
        cpus.difference_update(range(first, end + 1))
    else:
        cpus.update(range(first, end + 1))


def _check_cpu(cpu: int, count: int, shown: str) -> None:
    if cpu < 0:
        raise ConfigError(f"invalid cpu list {shown}: CPU {cpu} is negative")
    if cpu >= count:
        raise ConfigError(
            f"invalid cpu list {shown}: CPU {cpu} does not exist (host has CPUs 0-{count - 1})"
        )


def format_cpulist(cpus: Iterable[int]) -> str:
    """Compact form of a CPU set, e.g. {0, 1, 2, 5} -> "0-2,5" ("" for no CPU)."""
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise ConfigError(f"invalid CPU number {ordered[0]}")
    spans: list[list[int]] = []
    for cpu in ordered:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
