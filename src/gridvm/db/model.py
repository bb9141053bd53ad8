"""The replicated database's model: what `gridvm db create` asks for, and the record gridvm
keeps in the cluster store (`/gridvm/databases/<name>`).

The record holds the settings, the members (host, address, server_id, role with when and
why), which member is the primary, the secrets gridvm's own accounts use, and the last
events. Every change to it goes through a compare-and-swap on its etcd revision, so two
controllers (a VIP changing hands) cannot both act on the same state.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from gridvm.lb.model import check_vip

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,15}")
PORT = 3306
MAX_MEMBERS = 5
NEVER = None          # ack_timeout: a commit waits for a replica's acknowledgement forever


def writer_service(name: str) -> str:
    return f"{name}-writer"


def reader_service(name: str) -> str:
    return f"{name}-reader"


def parse_address(text: str) -> tuple[str, int]:
    """`IP:PORT` or `IP` (port 3306) → (IP, PORT), for --vip and --read-vip."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        addr, port = text, str(PORT)
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}: a port is 1-65535")
    return check_vip(addr), int(port)


class CreateRequest(BaseModel):
    """`gridvm db create` (and POST /v1/databases)."""

    name: str
    image: str = Field(default="mariadb", description="the image of the MariaDB recipe")
    members: int = Field(default=2, ge=2, le=MAX_MEMBERS)
    hosts: list[str] = Field(default_factory=list, description="one per member (default: "
                             "placement picks distinct hosts)")
    ip: str = Field(description="the first member's address ADDR/PREFIX; the others follow")
    gateway: str | None = None
    bridge: str = "xenbr0"
    vip: str = Field(description="the writer VIP, IP[:PORT]")
    read_vip: str | None = Field(default=None, description="the reader VIP, IP[:PORT]")
    memory: int = Field(default=512, ge=256, le=65536)
    ack_timeout: float | None = Field(default=NEVER, gt=0, le=3600, description=(
        "seconds a commit waits for a replica's acknowledgement before going on without "
        "(asynchronous replication); none: wait for ever"))
    max_lag: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"bad database name {v!r}: a lowercase letter, then up to 15 "
                             "lowercase letters, digits or '-'")
        return v

    @field_validator("vip", "read_vip")
    @classmethod
    def _vip(cls, v: str | None) -> str | None:
        if v is None:
            return v
        addr, port = parse_address(v)
        return f"{addr}:{port}"

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Interface(v if "/" in v else f"{v}/24"))
        except ValueError:
            raise ValueError(f"bad --ip {v!r}: use ADDR/PREFIX, e.g. 10.77.0.150/24") from None

    @model_validator(mode="after")
    def _shape(self) -> CreateRequest:
        if self.hosts and len(self.hosts) != self.members:
            raise ValueError(f"--hosts names {len(self.hosts)} hosts for {self.members} "
                             "members: one host per member")
        dup = next((h for h in self.hosts if self.hosts.count(h) > 1), None)
        if dup:
            raise ValueError(f"two members on host {dup}: a database has one member per "
                             "host (a host's loss must not take two)")
        first = ipaddress.IPv4Interface(self.ip)
        last = first.ip + (self.members - 1)
        if last not in first.network or last == first.network.broadcast_address:
            raise ValueError(f"--ip {self.ip}: {self.members} members leave {first.network}")
        addrs = {str(first.ip + i) for i in range(self.members)}
        for vip in (self.vip, self.read_vip):
            if vip and vip.rsplit(":", 1)[0] in addrs:
                raise ValueError(f"VIP {vip} is a member's address")
        if self.read_vip and self.read_vip.rsplit(":", 1)[0] == self.vip.rsplit(":", 1)[0]:
            raise ValueError("the reader VIP must differ from the writer VIP")
        return self

    def member_names(self) -> list[str]:
        return [f"{self.name}{i}" for i in range(1, self.members + 1)]

    def addresses(self) -> list[ipaddress.IPv4Interface]:
        first = ipaddress.IPv4Interface(self.ip)
        return [ipaddress.IPv4Interface(f"{first.ip + i}/{first.network.prefixlen}")
                for i in range(self.members)]


USER_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
DBNAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class UserRequest(BaseModel):
    """`gridvm db user NAME USER --password P [--database D]`."""

    user: str
    password: str = Field(min_length=8, max_length=128)
    database: str | None = None

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not USER_RE.fullmatch(v) or v in ("root", "gridvm", "repl"):
            raise ValueError(f"bad user name {v!r}: a letter, then letters, digits or _ "
                             "(not root, gridvm or repl)")
        return v

    @field_validator("database")
    @classmethod
    def _db(cls, v: str | None) -> str | None:
        if v is not None and not DBNAME_RE.fullmatch(v):
            raise ValueError(f"bad database name {v!r}: a letter, then letters, digits or _")
        return v


def new_record(req: CreateRequest, hosts: list[str]) -> dict[str, Any]:
    """The record of a database being created (every member `creating`)."""
    wvip, wport = req.vip.rsplit(":", 1)
    reader = None
    if req.read_vip:
        rvip, rport = req.read_vip.rsplit(":", 1)
        reader = {"vip": rvip, "port": int(rport)}
    now = time.time()
    members = {}
    for i, (name, host, addr) in enumerate(zip(req.member_names(), hosts, req.addresses(),
                                               strict=True), start=1):
        members[name] = {"host": host, "ip": str(addr.ip), "prefix": addr.network.prefixlen,
                         "server_id": i, "role": "creating", "since": now,
                         "why": "being created"}
    return {
        "name": req.name, "image": req.image, "phase": "creating", "error": None,
        "created": now, "writer": {"vip": wvip, "port": int(wport)}, "reader": reader,
        "settings": {"ack_timeout": req.ack_timeout, "max_lag": req.max_lag,
                     "memory": req.memory, "bridge": req.bridge, "gateway": req.gateway},
        "secrets": {"admin": secrets.token_urlsafe(18), "repl": secrets.token_urlsafe(18)},
        "primary": None, "members": members, "events": [],
    }


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its secrets (what views show)."""
    return {k: v for k, v in record.items() if k != "secrets"}
