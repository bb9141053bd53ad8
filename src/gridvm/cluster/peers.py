"""How the cluster layer reaches another host: the `HostPeer` protocol.

Every host-to-host call — verb forwarding, HA launches, evacuation, host removal, live
migration and save/restore relocation — goes through a HostPeer: HTTPS to the host's
advertised URL (`https://ADDR:PORT`, from the registry), authenticated both ways with the
cluster's certificates. The implementation lives above (`gridvm.api.hostpeer`); the cluster
layer only sees this protocol, so its logic runs under a simulator with fake peers too.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from gridvm.errors import PeerUnreachable

__all__ = ["HostPeer", "PeerResponse", "PeerUnreachable", "Peers"]


class PeerResponse(NamedTuple):
    status: int
    body: bytes


class HostPeer(Protocol):
    """Another host's gridvmd, reached over mutual TLS."""

    url: str

    async def request(self, method: str, path: str, *, body: bytes = b"", query: str = "",
                      timeout: float = 30) -> PeerResponse:
        """Send a request as-is (verb forwarding); the answer whatever its status."""
        ...

    async def call(self, method: str, path: str, json: Any = None, *,
                   timeout: float = 30) -> Any:
        """A JSON call; errors come back as the gridvm error the peer raised."""
        ...

    async def close(self) -> None: ...


class Peers(Protocol):
    """Finds HostPeers: by the name of a host in the registry, or by its URL."""

    async def peer(self, host: str) -> HostPeer:
        """The host called `host` (NotFound if the registry has no such host)."""
        ...

    def at(self, url: str) -> HostPeer: ...
