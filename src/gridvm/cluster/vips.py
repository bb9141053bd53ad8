"""Virtual services in a cluster: shared specs, cluster-wide backends, one owner per VIP.

Active when this home has joined a cluster (its cluster/config.json
exists — known before gridvmd has even rejoined, so a host coming back never grabs a VIP):

- service specs live in etcd under `/gridvm/services/<name>`; every host programs every
  service and checks its backends, so a standby director is warm;
- a backend domain is found in the cluster registry (`/gridvm/domains/…`): its address
  from its config, running while the registry says so and its host is up;
- each VIP address has an election `gridvm/election/vip/<ip>` (the cluster's `Election`,
  on a lease of its own, `vip_ttl`, 1 s by default: shorter than the hosts' TTL): the
  leader holds the address and announces it with gratuitous ARP; when the owner dies its
  lease expires and a standby is elected. An election that changes wakes the owner loop
  (`changed`) at once, so a standby claims the VIP the moment etcd elects it. A VIP taken
  over from another host (`taken_from`) first takes that host's backends whose last check
  failed out of rotation (fall = 1) until they pass `rise` checks again: their host just
  went silent, and a client's retried SYN must not be sent to a dead backend;
- every host sends VRRP-style adverts on its VIPs' LANs (gridvm.lb.adverts). A host not
  heard for half a second is "silent": its backends leave rotation at once, and a standby
  deposes it as the owner of a VIP by revoking its election lease, so the VIP moves in
  about 0.6 s instead of after the lease's 1–1.5 s. Only a host heard since we last lost
  that VIP is deposed: two hosts that cannot hear each other but both reach etcd do not
  take a VIP from each other in turn.

The daemon hands a `ClusterPeers` to the lb layer's `ServiceManager` (it fulfils lb's
`Peers` protocol), so lb never imports the cluster layer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gridvm.cluster.core import Cluster, Election
from gridvm.cluster.etcd import EtcdError
from gridvm.cluster.settings import ClusterConfig, Files
from gridvm.config.model import DomainConfig
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager
from gridvm.lb.adverts import Adverts
from gridvm.lb.backends import LocalResolver, Location, domain_address
from gridvm.lb.model import ServiceSpec
from gridvm.store.records import DomainRecord

log = logging.getLogger("gridvm.lb")

PREFIX = "/gridvm/services/"
RUNNING = ("running", "blocked", "paused")
SNAPSHOT_S = 0.25
VIP_MARGIN_S = 0.25   # a VIP lease counts as lost after vip_ttl - this without renewal
DEPOSE_WINDOW_S = 2.0  # after a host falls silent, try to depose it this long (then its
                       # lease has expired anyway)


class ClusterPeers:
    """The lb layer's `Peers` (and `Resolver`): this host alone until it joins a cluster,
    then the cluster's shared specs, backends and VIP elections."""

    def __init__(self, manager: HostManager) -> None:
        self.manager = manager
        self.files = Files(manager.home)
        self.local = LocalResolver(manager)
        self._cfg: ClusterConfig | None = None
        self._cluster: Cluster | None = None
        self.elections: dict[str, Election] = {}
        self._snap: tuple[float, dict[str, dict[str, Any]], dict[str, str]] | None = None
        self._snap_lock = asyncio.Lock()
        self.changed = asyncio.Event()          # set when a VIP election changes
        self._loop: asyncio.AbstractEventLoop | None = None
        self.adverts: Adverts | None = None
        self._silent: set[str] = set()          # hosts fallen silent, not yet taken
        self._leading: set[str] = set()         # VIPs we led at the last look
        self._lost_at: dict[str, float] = {}    # VIP -> when we last stopped leading it

    def config(self) -> ClusterConfig | None:
        cfg = self.files.load()
        if cfg != self._cfg:
            if self._cluster is not None:
                self._cluster.etcd.close()
            self._cfg = cfg
            self._cluster = Cluster(self.files.etcd(cfg.etcd, timeout=1.0)) if cfg else None
        return cfg

    def active(self) -> bool:
        return self.config() is not None

    # ----- shared specs ---------------------------------------------------------------------

    async def publish(self, name: str, spec: ServiceSpec | None) -> None:
        """Write (or, with None, delete) a spec in etcd; GridvmError if etcd cannot."""
        if self.config() is None or self._cluster is None:
            return
        etcd = self._cluster.etcd
        if spec is None:
            await asyncio.to_thread(etcd.delete, PREFIX + name)
        else:
            await asyncio.to_thread(etcd.put_json, PREFIX + name, spec.model_dump(mode="json"))

    async def specs(self) -> dict[str, ServiceSpec] | None:
        """Every shared spec, or None if etcd cannot be read now."""
        if self.config() is None or self._cluster is None:
            return None
        try:
            kvs = await asyncio.to_thread(self._cluster.etcd.range, PREFIX)
        except EtcdError:
            return None
        out = {}
        for kv in kvs:
            try:
                out[kv.key.removeprefix(PREFIX)] = ServiceSpec.model_validate(kv.json())
            except ValueError as exc:
                log.error("bad service spec at %s: %s", kv.key, exc)
        return out

    # ----- VIP ownership --------------------------------------------------------------------

    def owner(self, vip: str) -> bool:
        """Do we hold `vip` now? (Starts campaigning for it the first time it is asked.)"""
        cfg = self.config()
        if cfg is None:
            return True
        e = self.elections.get(vip)
        if e is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            e = Election(self.files.etcd(cfg.etcd, timeout=1.0),
                         f"gridvm/election/vip/{vip}", cfg.host,
                         cfg.vip_ttl, margin=min(VIP_MARGIN_S, cfg.vip_ttl / 3),
                         rpc_timeout=cfg.vip_ttl / 2, on_change=self._wake)
            e.start()
            self.elections[vip] = e
        if e.is_leader:
            self._leading.add(vip)
        elif vip in self._leading:
            self._leading.discard(vip)
            self._lost_at[vip] = time.monotonic()
        return e.is_leader

    def taken_from(self, vip: str) -> str | None:
        """The host that held `vip` before we were elected (None: nobody, or us)."""
        cfg, e = self._cfg, self.elections.get(vip)
        prev = e.previous if e else None
        return prev if prev and cfg and prev != cfg.host else None

    def _wake(self) -> None:
        """From an election's thread: wake the owner loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.changed.set)

    def campaigning(self) -> set[str]:
        """The VIPs we are candidates for."""
        return set(self.elections)

    def owner_name(self, vip: str) -> str | None:
        e = self.elections.get(vip)
        try:
            return e.leader() if e else None
        except EtcdError:
            return None

    async def release(self, vip: str) -> None:
        """Stop campaigning (revoking our lease hands the VIP over at once)."""
        e = self.elections.pop(vip, None)
        self._leading.discard(vip)
        if e is not None:
            await asyncio.to_thread(e.stop)

    async def close(self) -> None:
        for vip in list(self.elections):
            await self.release(vip)
        if self.adverts is not None:
            await asyncio.to_thread(self.adverts.stop)
            self.adverts = None

    # ----- adverts: noticing a dead peer before its leases expire ---------------------------

    async def advertise(self, interfaces: set[str]) -> None:
        """Send and hear adverts on exactly these interfaces (started on first use)."""
        cfg = self.config()
        if cfg is None or self._cluster is None:
            return
        if self._loop is None:                  # _on_silent reports to this loop
            self._loop = asyncio.get_running_loop()
        if self.adverts is None:
            if not interfaces:
                return
            try:
                info = await asyncio.to_thread(self._cluster.info) or {}
                adverts = Adverts(cfg.host, f"{info.get('name')}@{info.get('created')}",
                                  on_silent=self._on_silent)
            except (EtcdError, OSError) as exc:
                log.warning("adverts not started: %s", exc)
                return
            adverts.start()
            self.adverts = adverts
        self.adverts.interfaces(interfaces)

    def _on_silent(self, host: str) -> None:
        """From the adverts thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._silent.add, host)
        self._wake()

    def take_silent(self) -> set[str]:
        """Hosts that fell silent since the last call."""
        out, self._silent = self._silent, set()
        return out

    def newly_silent(self) -> set[str]:
        """Hosts silent now that were last heard less than DEPOSE_WINDOW_S ago."""
        a = self.adverts
        return a.silent_hosts(heard_within=a.dead + DEPOSE_WINDOW_S) if a else set()

    async def depose(self, vip: str, silent: set[str]) -> str | None:
        """If `vip`'s owner is one of the `silent` hosts and was heard since we last led
        `vip`, revoke its election lease so the next candidate is elected now. The host
        deposed, if any."""
        cfg, e, a = self._cfg, self.elections.get(vip), self.adverts
        if cfg is None or e is None or a is None or e.is_leader:
            return None
        try:
            kv = await asyncio.to_thread(e.etcd.leader, e.name)
            if (kv is None or kv.value == cfg.host or kv.value not in silent
                    or not a.silent(kv.value, heard_after=self._lost_at.get(vip, -1e18))):
                return None
            await asyncio.to_thread(e.etcd.revoke, kv.lease)
        except EtcdError as exc:
            log.warning("VIP %s: cannot depose its silent owner: %s", vip, exc)
            return None
        log.warning("VIP %s: owner %s silent for %.1fs; its election lease revoked", vip,
                    kv.value, a.dead)
        return kv.value

    # ----- backends anywhere in the cluster -------------------------------------------------

    async def _snapshot(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        async with self._snap_lock:
            now = time.monotonic()
            if self._snap is None or now - self._snap[0] > SNAPSHOT_S:
                cluster = self._cluster
                assert cluster is not None
                regs = await asyncio.to_thread(cluster.domains)
                states = await asyncio.to_thread(cluster.host_states)
                self._snap = (now, regs, states)
            return self._snap[1], self._snap[2]

    async def locate(self, domain: str) -> Location | None:
        cfg = self.config()
        local = await self.local.locate(domain)
        if cfg is None:
            return local
        if local is not None and local.running:
            return local._replace(host=cfg.host)
        try:
            regs, states = await self._snapshot()
        except (EtcdError, GridvmError):
            return local
        rec = next((r for r in regs.values() if r.get("name") == domain), None)
        if rec is None:
            return local
        host = str(rec.get("host") or "")
        running = rec.get("state") in RUNNING and states.get(host) == "up" and host != cfg.host
        try:
            ip = domain_address(DomainRecord(config=DomainConfig.model_validate(rec["config"])),
                                None)
        except (KeyError, ValueError):
            ip = None
        return Location(ip, running, host)
