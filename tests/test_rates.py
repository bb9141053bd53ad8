"""The xm/xl vif rate= grammar."""

from __future__ import annotations

import pytest

from gridvm.errors import ConfigError
from gridvm.host.rates import DEFAULT_INTERVAL_US, Rate, format_rate, parse_rate


@pytest.mark.parametrize(
    ("text", "bytes_per_sec", "interval_us"),
    [
        ("10Mb/s", 1_250_000, DEFAULT_INTERVAL_US),
        ("1MB/s@20ms", 1_000_000, 20_000),
        ("100Kb/s", 12_500, DEFAULT_INTERVAL_US),
        ("100kb/s", 12_500, DEFAULT_INTERVAL_US),
        ("5GB/s", 5_000_000_000, DEFAULT_INTERVAL_US),
        ("250000b/s", 31_250, DEFAULT_INTERVAL_US),
        ("10Mbit/s", 1_250_000, DEFAULT_INTERVAL_US),
        ("8b/s", 1, DEFAULT_INTERVAL_US),
        ("15b/s", 1, DEFAULT_INTERVAL_US),  # bits round down, as in xl
        ("1KB/s@1s", 1000, 1_000_000),
        ("1KB/s@250us", 1000, 250),
        (" 2MB/s ", 2_000_000, DEFAULT_INTERVAL_US),
    ],
)
def test_parse(text: str, bytes_per_sec: int, interval_us: int) -> None:
    assert parse_rate(text) == Rate(bytes_per_sec, interval_us)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected <number>"),
        ("10", "expected <number>"),
        ("10Mb", "expected <number>"),
        ("10Mb/m", "expected <number>"),
        ("10Tb/s", "expected <number>"),
        ("1.5Mb/s", "expected <number>"),
        ("-1Mb/s", "expected <number>"),
        ("Mb/s", "expected <number>"),
        ("0Mb/s", "below 1 byte/s"),
        ("7b/s", "below 1 byte/s"),
        ("10Mb/s@", "interval must be"),
        ("10Mb/s@20", "interval must be"),
        ("10Mb/s@20min", "interval must be"),
        ("10Mb/s@0ms", "between 1us and 10s"),
        ("10Mb/s@11s", "between 1us and 10s"),
        ("10Mb/s@1ms@2ms", "interval must be"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rate(text)
    assert f"invalid rate {text!r}" in str(info.value)
    assert message in str(info.value)


def test_rate_validates_itself() -> None:
    with pytest.raises(ConfigError, match="at least 1 byte/s"):
        Rate(0)
    with pytest.raises(ConfigError, match="interval"):
        Rate(1000, 0)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Rate(1_250_000), "10Mb/s"),
        (Rate(1_000_000, 20_000), "8Mb/s@20ms"),
        (Rate(5_000_000_000), "40Gb/s"),
        (Rate(12_500), "100Kb/s"),
        (Rate(31_251), "250008b/s"),
        (Rate(1000, 1_000_000), "8Kb/s@1s"),
        (Rate(1000, 1500), "8Kb/s@1500us"),
    ],
)
def test_format_round_trips(rate: Rate, text: str) -> None:
    assert format_rate(rate) == text == str(rate)
    assert parse_rate(text) == rate


def test_bytes_per_interval() -> None:
    assert parse_rate("10Mb/s").bytes_per_interval == 62_500
    assert parse_rate("1MB/s@20ms").bytes_per_interval == 20_000
