"""Xen cpu list syntax."""

from __future__ import annotations

import pytest

from gridvm.errors import ConfigError, GridvmError
from gridvm.host.cpulist import format_cpulist, host_cpu_count, parse_cpu_items, parse_cpulist


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-3,5,^1", {0, 2, 3, 5}),
        ("all", set(range(8))),
        ("all,^0-1", set(range(2, 8))),
        ("3", {3}),
        (" 0-1 , 3", {0, 1, 3}),
        ("0-3, 6", {0, 1, 2, 3, 6}),
        ("^1,1", {1}),  # applied left to right, like xl
        ("0-7,^2-5,3", {0, 1, 3, 6, 7}),
        ([0, 1], {0, 1}),
        (["0-2", "^1"], {0, 2}),
        ([4, "6-7"], {4, 6, 7}),
        ((5,), {5}),
    ],
)
def test_parse(spec: str | list[int | str], expected: set[int]) -> None:
    assert parse_cpulist(spec, ncpus=8) == frozenset(expected)


def test_list_function_and_host_default() -> None:
    assert parse_cpu_items(["0-2", "^1"], ncpus=4) == {0, 2}
    assert parse_cpulist("all") == frozenset(range(host_cpu_count()))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "an empty item"),
        ("0,,1", "an empty item"),
        ("a-b", "'a-b' is not N, N-M"),
        ("1-", "'1-' is not N, N-M"),
        ("-1", "'-1' is not N, N-M"),
        ("3-1", "range '3-1' runs backwards"),
        ("8", "CPU 8 does not exist (host has CPUs 0-7)"),
        ("0-9", "CPU 9 does not exist"),
        ("^1", "it selects no CPU"),
        ("^all", "'^all' is not"),
        ("nodes:0", "NUMA node lists are not supported"),
        ([], "it selects no CPU"),
        ([-1], "CPU -1 is negative"),
        ([8], "CPU 8 does not exist"),
        ([True], "True is not a CPU number"),
        ([1.5], "1.5 is not a CPU number"),
    ],
)
def test_errors(spec: str | list[object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cpulist(spec, ncpus=8)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, GridvmError)


def test_error_quotes_the_input() -> None:
    with pytest.raises(ConfigError, match=r"^invalid cpu list '0-3,x': 'x' is not"):
        parse_cpulist("0-3,x", ncpus=8)
    with pytest.raises(ConfigError, match=r"^invalid cpu list \['0', 'x'\]: "):
        parse_cpulist(["0", "x"], ncpus=8)
    with pytest.raises(ConfigError, match="expected a string or a list"):
        parse_cpu_items(5, ncpus=8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ({0, 1, 2, 5}, "0-2,5"),
        ({3}, "3"),
        (set(), ""),
        ({0, 2, 4}, "0,2,4"),
        ({7, 6, 1, 0}, "0-1,6-7"),
    ],
)
def test_format(cpus: set[int], text: str) -> None:
    assert format_cpulist(cpus) == text
    if cpus:
        assert parse_cpulist(text, ncpus=8) == frozenset(cpus)


def test_format_rejects_negative() -> None:
    with pytest.raises(ConfigError):
        format_cpulist([-1, 0])
