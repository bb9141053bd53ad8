"""gridvmd between hosts: the relocation API over TCP, like xend's relocation server.

`gridvmd --listen ADDR[:PORT]` serves the same app on TCP (port 8002 by default) next to the
Unix socket, but over TCP only `/v1/relocation/…` is answered, only to peers on the
allowlist (`--relocation-hosts-allow`: addresses, CIDRs or regular expressions, as in xend)
and only with the pool's shared token (`$GRIDVM_TOKEN` or `<home>/relocation.token`).
`HttpPeer` is the source's client for a destination's relocation API.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import httpx

from gridvm.api.client import ERRORS
from gridvm.api.limits import Asgi, Receive, Scope, Send, reply_error
from gridvm.errors import ConfigError, GridvmError
from gridvm.host.migration import (
    RELOCATION_PORT,
    IncomingView,
    PeerUnreachable,
    PrepareAnswer,
    PrepareRequest,
)
from gridvm.paths import Home, restrict

TOKEN_ENV = "GRIDVM_TOKEN"
TOKEN_FILE = "relocation.token"
PREFIX = "/v1/relocation/"



def token_path(home: Home) -> Path:
    return home.root / TOKEN_FILE


def load_token(home: Home, *, create: bool = False) -> str:
    """The shared token: $GRIDVM_TOKEN, else the home's token file (made if `create`)."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = token_path(home)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    if not create:
        raise GridvmError(f"no relocation token: put the pool's shared token in {path} "
                          f"(or ${TOKEN_ENV}) on every host")
    write_token(home, secrets.token_hex(24))
    return path.read_text().strip()


def write_token(home: Home, token: str) -> None:
    """Store `token` as the home's relocation token (mode 0600)."""
    path = token_path(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR`, `ADDR:PORT` or `[V6]:PORT` → (address, port)."""
    m = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:]+)(?::(?P<port>\d+))?",
                     text.strip())
    if not m:
        raise ConfigError(f"invalid listen address {text!r}: use ADDR or ADDR:PORT")
    host = m["v6"] or m["host"]
    port = int(m["p6"] or m["port"] or RELOCATION_PORT)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"invalid listen address {text!r}: {host} is not an IP address") \
            from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid listen port {port}")
    return host, port


def bind_sockets(home: Home, listen: str | None) -> list[socket.socket]:
    """The API's Unix socket and, with `listen`, its TCP socket (both listening)."""
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
    sockets = [unix]
    if where:
        host, port = where
        tcp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                            socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, port))
        except OSError as exc:
            tcp.close()
            unix.close()
            path.unlink(missing_ok=True)
            raise GridvmError(f"cannot listen on {listen}: {exc.strerror}") from None
        tcp.listen(128)
        sockets.append(tcp)
    return sockets


class Allowlist:
    """xend's relocation-hosts-allow: entries are IPs, CIDRs or regexes of the peer address.

    An empty list allows every peer that has the token.
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


class RelocationGuard:
    """ASGI wrapper: requests arriving over TCP must be relocation calls from an allowed peer
    with the token; requests on the Unix socket pass untouched."""

    def __init__(self, app: Asgi, token: str, allow: Allowlist) -> None:
        self.app = app
        self.token = token.encode()
        self.allow = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and server and server[1] is not None:
            problem = self._problem(scope)
            if problem is not None:
                status, message = problem
                await reply_error(send, status, message,
                                  "Conflict" if status == 409 else "GridvmError")
                return
        await self.app(scope, receive, send)

    def _problem(self, scope: Scope) -> tuple[int, str] | None:
        client = scope.get("client") or ("", 0)
        if not self.allow.allows(str(client[0])):
            return 403, f"host {client[0]} is not allowed to relocate domains here"
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            return 404, "only the relocation API is served over TCP"
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
        if not hmac.compare_digest(given, self.token):
            return 401, "wrong or missing relocation token"
        return None


def _refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class HttpPeer:
    """A destination gridvmd's relocation API (implements gridvm.host.migration.Peer)."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._http = httpx.AsyncClient(base_url=f"http://{address}", timeout=30,
                                       headers={"Authorization": f"Bearer {token}"})

    async def _call(self, method: str, path: str, *, json: Any = None,
                    timeout: float = 30) -> Any:
        try:
            resp = await self._http.request(method, f"{PREFIX.rstrip('/')}{path}", json=json,
                                            timeout=timeout)
        except httpx.TimeoutException as exc:
            raise PeerUnreachable(f"gridvmd at {self.address} did not answer within "
                                  f"{timeout:.0f}s") from exc
        except httpx.HTTPError as exc:
            refused = _refused(exc)
            why = "connection refused" if refused else str(exc) or type(exc).__name__
            raise PeerUnreachable(f"cannot reach gridvmd at {self.address}: {why}",
                                  refused=refused) from exc
        try:
            body = resp.json()
        except ValueError:
            raise GridvmError(f"{self.address}: HTTP {resp.status_code}: "
                              f"{resp.text[:200]}") from None
        if resp.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            raise ERRORS.get(body.get("type", "") if isinstance(body, dict) else "",
                             GridvmError)(f"{self.address}: {message or body}")
        return body

    async def prepare(self, req: PrepareRequest) -> PrepareAnswer:
        data = await self._call("POST", "/prepare", json=req.model_dump(mode="json"),
                                timeout=120)
        return PrepareAnswer.model_validate(data)

    async def status(self, mid: str) -> IncomingView:
        return IncomingView.model_validate(await self._call("GET", f"/{mid}", timeout=5))

    async def abort(self, mid: str) -> IncomingView:
        return IncomingView.model_validate(await self._call("POST", f"/{mid}/abort",
                                                            timeout=45))

    async def close(self) -> None:
        await self._http.aclose()
