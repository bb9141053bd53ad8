"""A gridvmd's membership in a cluster: join/resume, heartbeat, capacity, election, HA.

`ClusterNode` is created with the HostManager. Without a cluster it does nothing and the
host keeps its plain SQLite store. After `join` (or on start, if the home was joined before)
it swaps the manager's store for a `ClusterStore`, starts the host's watchdog process (the
lease-holding heartbeat that self-fences), publishes the host's capacity on that lease,
campaigns for the HA manager election, and runs the HA manager while elected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gridvm.api.client import Client
from gridvm.cluster import watchdog
from gridvm.cluster.core import HA_ELECTION, Cluster, Election
from gridvm.cluster.etcd import Etcd, EtcdError
from gridvm.cluster.ha import ROUND_S, HaManager, HaSettings
from gridvm.cluster.ha_env import EtcdHaEnv
from gridvm.cluster.settings import ClusterConfig, Files
from gridvm.cluster.store import ClusterStore
from gridvm.errors import Conflict, GridvmError, NotFound
from gridvm.host import hostinfo, procs
from gridvm.paths import Home

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.cluster")

LOCAL_HEADER = "x-gridvm-local"   # a request already routed by the cluster layer
RESERVE_MB = 512


class ClusterNode:
    def __init__(self, manager: HostManager) -> None:
        self.m = manager
        self.local_store = manager.store
        self.files = Files(manager.home)
        self.cfg: ClusterConfig | None = None
        self.cluster: Cluster | None = None
        self.store: ClusterStore | None = None
        self.election: Election | None = None
        self.ha: HaManager | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_seen: int | None = None
        self._elected = asyncio.Event()          # the HA election changed: run a round now
        self._registered = False

    @property
    def joined(self) -> bool:
        return self.cfg is not None

    @property
    def cpu_ratio(self) -> float:
        return self.cfg.cpu_ratio if self.cfg else 4.0

    def need(self) -> tuple[ClusterConfig, Cluster]:
        if self.cfg is None or self.cluster is None:
            raise Conflict("this host is not in a cluster (gridvm cluster join --etcd URL)")
        return self.cfg, self.cluster

    # ----- join / resume / close ------------------------------------------------------------

    async def resume(self) -> None:
        """Rejoin the cluster this home was joined to (before domains are re-adopted)."""
        cfg = self.files.load()
        if cfg is not None:
            await self._attach(cfg)

    async def join(self, cfg: ClusterConfig) -> dict[str, Any]:
        if self.cfg is not None:
            raise Conflict(f"this host is already in the cluster at {self.cfg.etcd} "
                           f"as {self.cfg.host}")
        etcd = Etcd(cfg.etcd, timeout=3)
        cluster = Cluster(etcd)
        try:
            info = await asyncio.to_thread(cluster.info)
            if info is None:
                raise NotFound(f"etcd at {cfg.etcd} holds no gridvm cluster "
                               "(run gridvm cluster init first)")
            hosts = await asyncio.to_thread(cluster.hosts)
            alive = await asyncio.to_thread(cluster.alive)
            other = hosts.get(cfg.host)
            if other and other.get("api") != str(self.m.home.api_socket) and cfg.host in alive:
                raise Conflict(f"host name {cfg.host} is already used by a live host")
            for rec in self.local_store.all():
                await asyncio.to_thread(cluster.reserve_name, rec.name, rec.uuid)
        finally:
            etcd.close()
        self.files.save(cfg)
        await self._attach(cfg)
        assert self.cfg is not None
        return {"cluster": info, "host": cfg.host, "etcd": cfg.etcd}

    async def _attach(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.cluster = Cluster(Etcd(cfg.etcd, timeout=max(min(cfg.ttl / 3, 2.0), 0.5)))
        self.store = ClusterStore(self.local_store, self.cluster, cfg.host, self.files)
        self.m.store = self.store
        self.files.ha.mkdir(parents=True, exist_ok=True)
        self._ensure_watchdog()
        loop = asyncio.get_running_loop()
        self._elected = asyncio.Event()

        def elected() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._elected.set)

        self.election = Election(Etcd(cfg.etcd, timeout=1.0), HA_ELECTION, cfg.host, cfg.ttl,
                                 on_change=elected)
        self.election.start()
        self.ha = HaManager(
            EtcdHaEnv(self.cluster, cfg.host, launch=self._launch_on_peer,
                      is_leader=self._ha_leader, fence_command=cfg.fence_command),
            HaSettings(margin=cfg.margin, cpu_ratio=cfg.cpu_ratio))
        self._tasks = [asyncio.create_task(self._heartbeat(), name="cluster-heartbeat"),
                       asyncio.create_task(self._ha_loop(), name="ha-manager")]
        log.info("in cluster at %s as %s (lease ttl %ss)", cfg.etcd, cfg.host, cfg.ttl)

    async def close(self) -> None:
        """Stop the loops and hand the election over; the watchdog keeps the host alive."""
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.election is not None:
            await asyncio.to_thread(self.election.stop)

    def _ensure_watchdog(self) -> None:
        if watchdog.running(self.files) is not None:
            return
        with open(self.files.log, "ab") as out:
            proc = subprocess.Popen(watchdog.argv(self.m.home), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        self.files.pid.write_text(f"{proc.pid}\n")
        log.info("watchdog started (pid %s)", proc.pid)

    # ----- heartbeat: capacity, registration, resync after a new lease ----------------------

    async def _heartbeat(self) -> None:
        cfg, _ = self.need()
        while True:
            try:
                await self._beat(cfg)
            except EtcdError as exc:
                log.debug("heartbeat: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(max(cfg.ttl / 5, 0.3))

    async def _beat(self, cfg: ClusterConfig) -> None:
        cluster, store = self.cluster, self.store
        assert cluster is not None and store is not None
        self._ensure_watchdog()
        if not self._registered:
            old = await asyncio.to_thread(cluster.etcd.get_json, cluster.key("hosts", cfg.host))
            await asyncio.to_thread(cluster.etcd.put_json, cluster.key("hosts", cfg.host), {
                "name": cfg.host, "api": str(self.m.home.api_socket),
                "maintenance": bool((old or {}).get("maintenance"))})
            self._registered = True
        lease = self.files.lease_id()
        if lease is None:
            return
        if lease != self._lease_seen or store.dirty:
            if any(not procs.pid_alive(vm.pid) for vm in self.m.vms.values()):
                return  # let the manager tear down fenced QEMUs first
            stale = await asyncio.to_thread(store.resync)
            for rec in stale:
                log.warning("%s: now runs on another host; dropping the local copy", rec.name)
                if rec.uuid in self.m.vms:
                    with contextlib.suppress(GridvmError):
                        await self.m.destroy(rec.uuid)
                self.local_store.delete(rec.uuid)
            self.files.fenced.unlink(missing_ok=True)
            await asyncio.to_thread(cluster.etcd.delete, cluster.key("fenced", cfg.host))
            self._lease_seen = lease
        await asyncio.to_thread(cluster.etcd.put_json, cluster.key("capacity", cfg.host),
                                self.capacity(), lease=lease)

    def capacity(self) -> dict[str, Any]:
        mem = hostinfo.meminfo_mb()
        cfg = self.cfg
        total = mem.get("MemTotal", 0)
        return {
            "cpus": hostinfo.ncpus(),
            "memory_mb": (cfg.capacity_mb if cfg and cfg.capacity_mb else
                          max(total - RESERVE_MB, 0)),
            "total_mb": total, "free_mb": mem.get("MemAvailable", 0),
            "running": len(self.m.vms), "load": round(os.getloadavg()[0], 2),
            "at": time.time(),
        }

    # ----- HA manager -----------------------------------------------------------------------

    async def _ha_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._elected.wait(), ROUND_S)
            self._elected.clear()
            ha = self.ha
            if ha is None:
                continue
            try:
                await asyncio.to_thread(ha.tick)   # a round if elected, else observe
            except GridvmError as exc:
                log.warning("HA round: %s", exc)
            except Exception:
                log.exception("HA round failed")

    def _ha_leader(self) -> bool:
        """This host leads the HA election (etcd agrees: blocking)."""
        election = self.election
        return election is not None and election.is_leader and \
            election.leader() == self.need()[0].host

    def _launch_on_peer(self, host: str, config: dict[str, Any], managed: bool) -> None:
        """The HA manager's launcher: create the domain through the host's gridvmd."""
        peer = self.peer(host)
        try:
            peer.post("/domains", {"config": config, "managed": managed})
        finally:
            peer.close()

    # ----- peers ----------------------------------------------------------------------------

    def peer_socket(self, host: str) -> Path:
        _, cluster = self.need()
        rec = cluster.hosts().get(host)
        if rec is None:
            raise NotFound(f"unknown host {host!r} (hosts: {', '.join(cluster.hosts())})")
        return Path(str(rec["api"]))

    def peer(self, host: str, timeout: float = 120) -> Client:
        """A client for another host's gridvmd whose requests the cluster layer won't route."""
        return Client(Home(self.peer_socket(host).parent), timeout=timeout,
                      headers={LOCAL_HEADER: "1"})

    def status(self) -> dict[str, Any]:
        if self.cfg is None or self.cluster is None:
            return {"joined": False}
        election = self.election
        return {
            "joined": True, "host": self.cfg.host, "etcd": self.cfg.etcd, "ttl": self.cfg.ttl,
            "margin": self.cfg.margin, "lease": self.files.lease_id(),
            "fenced": self.files.fenced.exists(),
            "leader": election.leader() if election else None,
            "cluster": self.cluster.info(),
        }
