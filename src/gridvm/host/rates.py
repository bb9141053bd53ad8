"""The xm/xl vif `rate=` grammar: `10Mb/s`, `1MB/s@20ms`, `100Kb/s`, `250000b/s`.

A rate is an integer, an optional decimal prefix (`K`/`k` = 1000, `M`, `G`),
a unit (`b` or `bit` = bits, `B` = bytes) and `/s`, optionally followed by
`@<n>s|ms|us`: the window over which xl hands out credit (default 50 ms).
Bits are converted to bytes rounding down, as xl does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gridvm.errors import ConfigError

__all__ = ["DEFAULT_INTERVAL_US", "Rate", "format_rate", "parse_rate"]

DEFAULT_INTERVAL_US = 50_000
MAX_INTERVAL_US = 10_000_000

_PREFIX = {"": 1, "K": 1000, "k": 1000, "M": 1000**2, "G": 1000**3}
_TIME = {"s": 1_000_000, "ms": 1000, "us": 1}
_RATE = re.compile(r"(\d+)([KkMG]?)(bit|b|B)/s")
_INTERVAL = re.compile(r"(\d+)(s|ms|us)")


@dataclass(frozen=True)
class Rate:
    """A bandwidth limit: `bytes_per_sec`, credited every `interval_us` microseconds."""

    bytes_per_sec: int
    interval_us: int = DEFAULT_INTERVAL_US

    def __post_init__(self) -> None:
        if self.bytes_per_sec < 1:
            raise ConfigError(f"rate must be at least 1 byte/s, not {self.bytes_per_sec}")
        if not 1 <= self.interval_us <= MAX_INTERVAL_US:
            raise ConfigError(
                f"rate interval must be between 1us and {MAX_INTERVAL_US // 1_000_000}s,"
                f" not {self.interval_us}us"
            )

    @property
    def bytes_per_interval(self) -> int:
        """The credit handed out per interval (xl's `rate_bytes_per_interval`)."""
        return self.bytes_per_sec * self.interval_us // 1_000_000

    def __str__(self) -> str:
        return format_rate(self)


def parse_rate(text: str) -> Rate:
    """Parse a vif `rate=` value such as "10Mb/s@20ms"."""
    body, at, window = text.strip().partition("@")
    match = _RATE.fullmatch(body)
    if match is None:
        raise ConfigError(
            f"invalid rate {text!r}: expected <number>[K|M|G]<b|B>/s[@<n>s|ms|us], e.g. 10Mb/s"
        )
    number, prefix, unit = match.groups()
    amount = int(number) * _PREFIX[prefix]
    bytes_per_sec = amount if unit == "B" else amount // 8
    if bytes_per_sec < 1:
        raise ConfigError(f"invalid rate {text!r}: below 1 byte/s")
    interval_us = DEFAULT_INTERVAL_US
    if at:
        win = _INTERVAL.fullmatch(window)
        if win is None:
            raise ConfigError(f"invalid rate {text!r}: interval must be <n>s, <n>ms or <n>us")
        interval_us = int(win.group(1)) * _TIME[win.group(2)]
        if not 1 <= interval_us <= MAX_INTERVAL_US:
            raise ConfigError(
                f"invalid rate {text!r}: interval must be between 1us and"
                f" {MAX_INTERVAL_US // 1_000_000}s"
            )
    return Rate(bytes_per_sec, interval_us)


def format_rate(rate: Rate) -> str:
    """Canonical text for a rate, in bits with the largest exact prefix ("8Mb/s@20ms")."""
    bits = rate.bytes_per_sec * 8
    text = f"{bits}b/s"
    for prefix, factor in (("G", 1000**3), ("M", 1000**2), ("K", 1000)):
        if bits % factor == 0:
            text = f"{bits // factor}{prefix}b/s"
            break
    if rate.interval_us != DEFAULT_INTERVAL_US:
        for unit, factor in (("s", 1_000_000), ("ms", 1000), ("us", 1)):
            if rate.interval_us % factor == 0:
                text += f"@{rate.interval_us // factor}{unit}"
                break
    return text
