"""`HttpsPeer`: the one client for talking to another host's gridvmd.

HTTPS to the peer's API listener (`gridvmd --listen`, port 8002), mutual TLS with the
host's certificate (`<home>/pki`): the peer must present a certificate of our cluster's CA
(and not a revoked one), and so must we. It carries every host-to-host call: verb forwarding
and HA launches (`gridvm.cluster.peers.HostPeer`) and the destination's half of a live
migration or a relocation (`gridvm.host.migration.Peer`). Requests carry the
`x-gridvm-local` header: the peer handles them itself, never routes them on.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import ssl
from collections.abc import Callable
from typing import Any

import httpx

from gridvm.cluster.peers import PeerResponse
from gridvm.cluster.pki import Identity
from gridvm.errors import Conflict, GridvmError, PeerUnreachable, error_kind
from gridvm.host.migration import IncomingView, PrepareAnswer, PrepareRequest
from gridvm.netaddr import host_port

LOCAL_HEADER = "x-gridvm-local"   # a request already routed by the cluster layer
API_PORT = 8002                   # xend's relocation port; gridvmd's HTTPS API
ENROLL_PORT = 8003                # certificate enrolment with a join token (server TLS only)
CONNECT_S = 3.0                   # a powered-off host sends no RST: do not wait long for it

def api_url(address: str, port: int = API_PORT) -> str:
    """The https URL of a gridvmd API listening on `address`."""
    return f"https://{host_port(address, port)}"


def error_from(body: Any, status: int, where: str) -> GridvmError:
    """The gridvm error an API answer carries."""
    if isinstance(body, dict) and "error" in body:
        return error_kind(str(body.get("type", "")))(f"{where}: {body['error']}")
    return GridvmError(f"{where}: HTTP {status}")


def _refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tls_problem(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return f"TLS: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


class HttpsPeer:
    """Another host's gridvmd at `url` (https://ADDR:PORT)."""

    def __init__(self, url: str, tls: ssl.SSLContext, *, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.address = self.url.removeprefix("https://")
        self._http = httpx.AsyncClient(base_url=self.url, verify=tls, timeout=timeout,
                                       headers={LOCAL_HEADER: "1"})

    @classmethod
    def of(cls, url: str, identity: Identity, *, timeout: float = 30) -> HttpsPeer:
        if not identity.exists():
            raise Conflict("this host has no certificate yet: it reaches other hosts only "
                           "once it is in a cluster (gridvm cluster init/join)")
        return cls(url, identity.client_context(), timeout=timeout)

    async def request(self, method: str, path: str, *, body: bytes = b"", query: str = "",
                      timeout: float = 30) -> PeerResponse:
        try:
            r = await self._http.request(method, path + (f"?{query}" if query else ""),
                                         content=body,
                                         timeout=httpx.Timeout(timeout,
                                                               connect=min(CONNECT_S, timeout)),
                                         headers={"content-type": "application/json"})
        except httpx.TimeoutException as exc:
            raise PeerUnreachable(f"gridvmd at {self.address} did not answer within "
                                  f"{timeout:.0f}s") from exc
        except httpx.HTTPError as exc:
            refused = _refused(exc)
            why = _tls_problem(exc) or ("connection refused" if refused
                                        else str(exc) or type(exc).__name__)
            raise PeerUnreachable(f"cannot reach gridvmd at {self.address}: {why}",
                                  refused=refused) from exc
        return PeerResponse(r.status_code, r.content)

    async def call(self, method: str, path: str, json: Any = None, *,
                   timeout: float = 30) -> Any:
        body = jsonlib.dumps(json).encode() if json is not None else b""
        r = await self.request(method, path, body=body, timeout=timeout)
        try:
            data = jsonlib.loads(r.body)
        except ValueError:
            raise GridvmError(f"{self.address}: HTTP {r.status}: {r.body[:200]!r}") from None
        if r.status >= 400:
            raise error_from(data, r.status, self.address)
        return data

    async def close(self) -> None:
        await self._http.aclose()

    # ----- the destination's half of a migration (gridvm.host.migration.Peer) -------------

    async def prepare(self, req: PrepareRequest) -> PrepareAnswer:
        data = await self.call("POST", "/v1/relocation/prepare", req.model_dump(mode="json"),
                               timeout=120)
        return PrepareAnswer.model_validate(data)

    async def status(self, mid: str) -> IncomingView:
        return IncomingView.model_validate(await self.call("GET", f"/v1/relocation/{mid}",
                                                           timeout=5))

    async def abort(self, mid: str) -> IncomingView:
        return IncomingView.model_validate(await self.call("POST", f"/v1/relocation/{mid}/abort",
                                                           timeout=45))


class ApiPeers:
    """The cluster layer's `Peers`: HttpsPeers by host name (from the registry) or URL,
    with one TLS context for all (rebuilt when the CRL or the certificate changes)."""

    def __init__(self, identity: Identity, lookup: Callable[[str], str]) -> None:
        self.identity = identity
        self.lookup = lookup              # host name -> URL (blocking: reads the registry)
        self._tls: ssl.SSLContext | None = None

    def reload(self) -> None:
        self._tls = None

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            if not self.identity.exists():
                raise Conflict("this host has no certificate yet: it reaches other hosts "
                               "only once it is in a cluster (gridvm cluster init/join)")
            self._tls = self.identity.client_context()
        return self._tls

    async def peer(self, host: str) -> HttpsPeer:
        url = await asyncio.to_thread(self.lookup, host)
        return HttpsPeer(url, self._context())

    def at(self, url: str) -> HttpsPeer:
        return HttpsPeer(url, self._context())
