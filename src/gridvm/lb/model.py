"""Virtual services: the model, the CLI grammars, and the slot tables the schedulers use.

A virtual service is `VIP:PORT` (TCP) load-balanced over domains, LVS style. Everything
here is pure: parse and validate user input (one-line `ConfigError`s), and turn the set of
backends that may take new connections into the slots of an nftables map.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from gridvm.errors import ConfigError

Scheduler = Literal["rr", "wrr", "sh", "random"]
SCHEDULERS: tuple[Scheduler, ...] = ("rr", "wrr", "sh", "random")
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,23}")
DOMAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_WEIGHT = 100
MAX_SLOTS = 4096


# ----- the grammars of `gridvm service create` -------------------------------------------------


def _port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ConfigError(f"bad {what} {text!r}: a port is 1-65535")
    return int(text)


def parse_vip(text: str) -> tuple[str, int]:
    """`10.77.0.200:80` → ("10.77.0.200", 80)."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"bad --vip {text!r}: use IP:PORT, e.g. 10.77.0.200:80")
    return check_vip(addr), _port(port, "VIP port")


def check_vip(addr: str) -> str:
    """A VIP must be one unicast IPv4 address other than 0.0.0.0 and loopback."""
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        raise ConfigError(f"bad VIP address {addr!r}: use an IPv4 address") from None
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise ConfigError(f"VIP {addr} is not a unicast address a client can reach")
    return str(ip)


def parse_backends(text: str) -> list[tuple[str, int | None]]:
    """`web1,web2:8080` → [("web1", None), ("web2", 8080)] (None: the VIP's port)."""
    out: list[tuple[str, int | None]] = []
    for item in text.split(","):
        item = item.strip()
        dom, sep, port = item.partition(":")
        if not DOMAIN_RE.fullmatch(dom):
            raise ConfigError(f"bad backend {item!r} in --backends: use DOM[:PORT][,DOM…]")
        out.append((dom, _port(port, f"port of backend {dom}") if sep else None))
    names = [d for d, _ in out]
    dup = next((d for d in names if names.count(d) > 1), None)
    if dup:
        raise ConfigError(f"backend {dup} is listed twice in --backends")
    return out


def parse_weight(text: str) -> tuple[str, int]:
    """`web1=3` → ("web1", 3)."""
    dom, sep, w = text.partition("=")
    if not sep or not DOMAIN_RE.fullmatch(dom) or not (w.isascii() and w.isdigit()):
        raise ConfigError(f"bad --weight {text!r}: use DOM=W, e.g. web1=3")
    return dom, check_weight(int(w))


def check_weight(w: int) -> int:
    if not 0 <= w <= MAX_WEIGHT:
        raise ConfigError(f"bad weight {w}: use 0 (no new connections) to {MAX_WEIGHT}")
    return w


@dataclass(frozen=True)
class Check:
    """A health check: a TCP connect; an HTTP GET of `path` that must answer 2xx/3xx; or a
    MySQL login that must find the server in `role` — a `primary` accepts writes
    (read_only off), a `replica` is read-only, replicates (IO and SQL threads running) and
    lags at most `max_lag` seconds."""

    kind: Literal["tcp", "http", "mysql"]
    path: str = ""
    role: Literal["primary", "replica", ""] = ""
    max_lag: float = 0.0

    def __str__(self) -> str:
        if self.kind == "mysql":
            return f"mysql:{self.role}" + (f":{self.max_lag:g}" if self.role == "replica"
                                           else "")
        return "tcp" if self.kind == "tcp" else f"http:{self.path}"


DEFAULT_LAG = 10.0


def parse_check(text: str) -> Check:
    """`tcp`, `http:/PATH`, `mysql:primary` or `mysql:replica[:MAX_LAG_SECONDS]`."""
    if text == "tcp":
        return Check("tcp")
    kind, sep, path = text.partition(":")
    if kind == "http" and sep and path.startswith("/") and " " not in path and \
            path.isprintable():
        return Check("http", path)
    if kind == "mysql" and path == "primary":
        return Check("mysql", role="primary")
    role, _, lag = path.partition(":")
    if kind == "mysql" and role == "replica":
        try:
            max_lag = float(lag) if lag else DEFAULT_LAG
        except ValueError:
            max_lag = -1.0
        if 0 < max_lag <= 86400:
            return Check("mysql", role="replica", max_lag=max_lag)
    raise ConfigError(f"bad --check {text!r}: use tcp, http:/PATH (e.g. http:/health), "
                      "mysql:primary or mysql:replica[:MAX_LAG]")


# ----- the model the daemon keeps ---------------------------------------------------------------


class Backend(BaseModel):
    """A real server: a domain (wherever it runs) and its port."""

    domain: str
    port: int | None = Field(default=None, ge=1, le=65535)   # None: the VIP's port
    weight: int = Field(default=1, ge=0, le=MAX_WEIGHT)
    drained: bool = False

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if not DOMAIN_RE.fullmatch(v):
            raise ValueError(f"bad backend domain name {v!r}")
        return v


class ServiceSpec(BaseModel):
    """One virtual service as the store keeps it (and the API takes it)."""

    name: str
    vip: str
    port: int = Field(ge=1, le=65535)
    scheduler: Scheduler = "rr"
    backends: list[Backend]
    check: str = "tcp"
    interval: float = Field(default=2.0, ge=0.1, le=300)
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    auth: str | None = Field(default=None, max_length=200, description=(
        "USER:PASSWORD a mysql check logs in with (never shown in views)"))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"bad service name {v!r}: a lowercase letter, then up to 23 "
                             "lowercase letters, digits or '-'")
        return v

    @field_validator("vip")
    @classmethod
    def _vip(cls, v: str) -> str:
        return check_vip(v)

    @field_validator("check")
    @classmethod
    def _check(cls, v: str) -> str:
        return str(parse_check(v))

    @model_validator(mode="after")
    def _auth(self) -> ServiceSpec:
        if self.health.kind == "mysql" and (not self.auth or ":" not in self.auth):
            raise ValueError("a mysql check needs --check-auth USER:PASSWORD")
        return self

    @model_validator(mode="after")
    def _backends(self) -> ServiceSpec:
        if not self.backends:
            raise ValueError("a service needs at least one backend")
        names = [b.domain for b in self.backends]
        dup = next((d for d in names if names.count(d) > 1), None)
        if dup:
            raise ValueError(f"backend {dup} is listed twice")
        if self.scheduler == "rr" and any(b.weight > 1 for b in self.backends):
            raise ValueError("rr gives every backend one share: use --scheduler wrr (or sh, "
                             "random) for weights")
        return self

    @property
    def address(self) -> str:
        return f"{self.vip}:{self.port}"

    @property
    def health(self) -> Check:
        return parse_check(self.check)

    def backend(self, domain: str) -> Backend:
        for b in self.backends:
            if b.domain == domain:
                return b
        raise ConfigError(f"service {self.name} has no backend {domain!r} "
                          f"(backends: {', '.join(b.domain for b in self.backends)})")

    def target_port(self, b: Backend) -> int:
        return b.port or self.port


def validation_message(exc: Exception) -> str:
    """A pydantic ValidationError → the first problem, on one line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return str(exc)


# ----- scheduling slots -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where new connections may go: an address, a port and a share."""

    ip: str
    port: int
    weight: int


def slots(targets: list[Target], scheduler: Scheduler) -> list[tuple[int, int, Target]]:
    """The map of a service: (first, last, target) runs covering 0…total-1.

    rr gives each target one slot; wrr interleaves `weight` slots per target in smooth
    weighted round-robin order (nginx's), so a 3:1 service sends A A B A, not A A A B;
    sh and random use contiguous runs of `weight` slots (a hash or a random number picks
    one, so order does not matter).
    """
    live = [t for t in targets if t.weight > 0]
    if not live:
        return []
    weights = [1 if scheduler == "rr" else t.weight for t in live]
    total = sum(weights)
    if total > MAX_SLOTS:
        raise ConfigError(f"the weights add up to {total}: at most {MAX_SLOTS}")
    order: list[int] = []
    if scheduler == "wrr":
        current = [0] * len(live)
        for _ in range(total):
            current = [c + w for c, w in zip(current, weights, strict=True)]
            best = max(range(len(live)), key=lambda i: current[i])
            current[best] -= total
            order.append(best)
    else:
        for i, w in enumerate(weights):
            order += [i] * w
    runs: list[tuple[int, int, Target]] = []
    for slot, i in enumerate(order):
        if runs and runs[-1][2] is live[i] and runs[-1][1] == slot - 1:
            runs[-1] = (runs[-1][0], slot, live[i])
        else:
            runs.append((slot, slot, live[i]))
    return runs
