"""Where gridvmd listens: its Unix socket, and with `--listen ADDR[:PORT]` two TCP ports.

* the API over HTTPS with mutual TLS (port 8002, xend's relocation port): the whole API, to
  peers presenting a certificate of this host's cluster that is not revoked — other hosts
  (verb forwarding, HA launches, migration, evacuation) and administrators' clients. A peer
  without such a certificate is refused by the TLS handshake, before any handler runs. The
  xend-style allowlist (`--relocation-hosts-allow`: addresses, CIDRs or regexes) narrows
  it further;
* enrolment (the next port, 8003), server-authenticated TLS only: `GET /v1/pki/ca` and
  `POST /v1/pki/enroll` with a one-time join token, nothing else.

Both TCP sockets are bound at start (a port in use is an error at once) and served once
the host has a certificate (at start, or when it joins a cluster).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass

from gridvm.api.hostpeer import API_PORT, api_url
from gridvm.api.limits import Asgi, Receive, Scope, Send, reply_error
from gridvm.errors import ConfigError, GridvmError
from gridvm.netaddr import parse_hostport
from gridvm.paths import Home, restrict


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR`, `ADDR:PORT` or `[V6]:PORT` → (address, port); port 8002 by default."""
    return parse_hostport(text, API_PORT)


@dataclass
class Sockets:
    """The daemon's bound sockets: Unix, and with --listen the API and enrolment ports."""

    unix: socket.socket
    api: socket.socket | None = None
    enroll: socket.socket | None = None
    address: str | None = None
    port: int = API_PORT

    @property
    def url(self) -> str | None:
        """The URL this host advertises to its peers (https://ADDR:PORT)."""
        return api_url(self.address, self.port) if self.address else None

    def close(self) -> None:
        for s in (self.unix, self.api, self.enroll):
            if s is not None:
                s.close()

    def rebind(self) -> None:
        """Bind the TCP sockets again (a server that stopped closed them)."""
        if self.address is None:
            return
        for s in (self.api, self.enroll):
            if s is not None:
                s.close()
        self.api = _tcp(self.address, self.port)
        self.enroll = _tcp(self.address, self.port + 1)


def _tcp(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise GridvmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return s


def bind_sockets(home: Home, listen: str | None) -> Sockets:
    """The API's Unix socket (listening, 0660 root:gridvm) and, with `listen`, the bound
    API and enrolment TCP sockets (they listen once served)."""
    where = parse_listen(listen) if listen else None
    path = home.api_socket
    path.unlink(missing_ok=True)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)        # no moment where others could connect
    try:
        unix.bind(str(path))
    finally:
        os.umask(old)
    restrict(path, 0o660)        # root and the gridvm group only
    unix.listen(128)
    socks = Sockets(unix)
    if where:
        host, port = where
        try:
            socks.api = _tcp(host, port)
            socks.enroll = _tcp(host, port + 1)    # enrolment: the next port (8003)
        except GridvmError:
            socks.close()
            path.unlink(missing_ok=True)
            raise
        socks.address, socks.port = host, port
    return socks


class Allowlist:
    """xend's relocation-hosts-allow: entries are IPs, CIDRs or regexes of the peer address.

    An empty list allows every peer (that has a certificate).
    """

    def __init__(self, spec: str) -> None:
        self.nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.patterns: list[re.Pattern[str]] = []
        for entry in spec.replace(",", " ").split():
            try:
                self.nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                try:
                    self.patterns.append(re.compile(entry))
                except re.error as exc:
                    raise ConfigError(f"invalid relocation-hosts-allow entry {entry!r}: "
                                      f"{exc}") from None

    def allows(self, peer: str) -> bool:
        if not self.nets and not self.patterns:
            return True
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in n for n in self.nets) or any(p.fullmatch(peer) for p in self.patterns)


class PeerGuard:
    """ASGI wrapper for the TCP API: a peer outside the allowlist is refused (403); the
    certificate was checked by the TLS handshake already."""

    def __init__(self, app: Asgi, allow: Allowlist) -> None:
        self.app = app
        self.allow = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client") or ("", 0)
        if scope["type"] in ("http", "websocket") and not self.allow.allows(str(client[0])):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4403})
                return
            await reply_error(send, 403, f"host {client[0]} is not allowed here "
                                         "(gridvmd --relocation-hosts-allow)")
            return
        await self.app(scope, receive, send)
