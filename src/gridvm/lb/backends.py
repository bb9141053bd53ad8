"""What the virtual-service manager works with: where a backend domain runs (`Resolver`,
`LocalResolver`), each service's runtime state, and the `Peers` a cluster gives it (VIP
elections, shared specs, adverts)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from gridvm.host.manager import HostManager
from gridvm.host.networks import NetworkManager, vif_ip
from gridvm.lb.director import Programmed
from gridvm.lb.health import Hysteresis
from gridvm.lb.model import ServiceSpec
from gridvm.store.records import DomainRecord


class Location(NamedTuple):
    """Where a backend domain is: its address (if known) and whether it runs."""

    ip: str | None
    running: bool
    host: str | None = None


class Resolver(Protocol):
    """Finds backend domains (this host's store; the cluster's when there is one)."""

    async def locate(self, domain: str) -> Location | None:
        """None if no such domain exists."""
        ...


def domain_address(rec: DomainRecord, nets: NetworkManager | None) -> str | None:
    """A domain's first IPv4 address gridvm knows: config/vif `ip`, else its NAT lease."""
    for i, v in enumerate(rec.config.vifs):
        ip = vif_ip(rec, i, v)
        if ip:
            return ip
    if nets is not None:
        for v in rec.config.vifs:
            net = nets.nets.get(v.bridge or "")
            if net is not None and v.mac:
                if v.mac in net.leases:
                    return net.leases[v.mac]
                for lease in nets.view(net).get("leases", []):
                    if lease["mac"] == v.mac:
                        return str(lease["ip"])
    return None


class LocalResolver:
    """Backends on this host."""

    def __init__(self, manager: HostManager) -> None:
        self.manager = manager

    async def locate(self, domain: str) -> Location | None:
        rec = self.manager.store.by_name(domain)
        if rec is None:
            return None
        nets = self.manager.net if isinstance(self.manager.net, NetworkManager) else None
        return Location(domain_address(rec, nets), rec.domid is not None)


@dataclass
class BackendState:
    """What the checker knows about one backend."""

    hyst: Hysteresis
    ip: str | None = None
    host: str | None = None
    last: str = "not checked yet"
    checks: int = 0
    failed: int = 0
    since: float = field(default_factory=time.time)


@dataclass
class Runtime:
    spec: ServiceSpec
    states: dict[str, BackendState]
    programmed: Programmed | None = None
    task: asyncio.Task[None] | None = None


class Peers(Resolver, Protocol):
    """The other directors: where specs are shared, who owns each VIP, who fell silent.

    Without a cluster: nobody (every VIP is ours, nothing is shared). The cluster layer's
    implementation is gridvm.cluster.vips.ClusterPeers."""

    changed: asyncio.Event                 # set when ownership may have changed

    def active(self) -> bool:
        """Are there peers (has this host joined a cluster)?"""
        ...

    def owner(self, vip: str) -> bool:
        """Do we own `vip` now? (The first call starts campaigning for it.)"""
        ...

    def owner_name(self, vip: str) -> str | None: ...

    def taken_from(self, vip: str) -> str | None:
        """The host that owned `vip` before us, if another."""
        ...

    def campaigning(self) -> set[str]: ...

    async def release(self, vip: str) -> None:
        """Stop campaigning for `vip`, handing it over at once."""
        ...

    async def close(self) -> None: ...

    async def publish(self, name: str, spec: ServiceSpec | None) -> None:
        """Share a spec (None: its deletion); GridvmError if that cannot be done now."""
        ...

    async def specs(self) -> dict[str, ServiceSpec] | None:
        """Every shared spec, or None if they cannot be read now."""
        ...

    async def advertise(self, interfaces: set[str]) -> None: ...

    def take_silent(self) -> set[str]:
        """Peers that fell silent since the last call."""
        ...

    def newly_silent(self) -> set[str]: ...

    async def depose(self, vip: str, silent: set[str]) -> str | None:
        """Take `vip` from its owner if that is one of the `silent` peers."""
        ...
