"""Addresses as users write them: `ADDR`, `ADDR:PORT`, `[V6]:PORT`."""

from __future__ import annotations

import ipaddress
import re

from gridvm.errors import ConfigError

_LISTEN = re.compile(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:]+)(?::(?P<port>\d+))?")


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """`ADDR`, `ADDR:PORT` or `[V6]:PORT` → (address, port); the address must be an IP."""
    m = _LISTEN.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"invalid address {text!r}: use ADDR or ADDR:PORT")
    host = m["v6"] or m["host"]
    port = int(m["p6"] or m["port"] or default_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"invalid address {text!r}: {host} is not an IP address") from None
    if not 1 <= port <= 65534:
        raise ConfigError(f"invalid port {port} in {text!r}")
    return host, port


def host_port(address: str, port: int) -> str:
    """`ADDR:PORT`, with brackets around an IPv6 address."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
