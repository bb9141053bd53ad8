"""A gridvmd's membership in a cluster: init/join/resume, heartbeat, capacity, election, HA.

`ClusterNode` is created with the HostManager. Without a cluster it does nothing and the
host keeps its plain SQLite store. After `init` or `join` (or on start, if the home was
joined before) it swaps the manager's store for a `ClusterStore`, starts the host's watchdog
process (the lease-holding heartbeat that self-fences), registers the URL other hosts reach
it at, publishes its capacity on that lease, keeps its copy of the CRL current, campaigns
for the HA manager election, and runs the HA manager while elected. Other hosts are reached
only through `peers` (HostPeer over mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gridvm.cluster import enroll, membership, watchdog
from gridvm.cluster.core import HA_ELECTION, Cluster, Election
from gridvm.cluster.etcd import EtcdError
from gridvm.cluster.ha import ROUND_S, HaManager, HaSettings
from gridvm.cluster.ha_env import EtcdHaEnv
from gridvm.cluster.membership import InitRequest, JoinRequest, Settings
from gridvm.cluster.peers import Peers
from gridvm.cluster.settings import ClusterConfig, Files
from gridvm.cluster.store import ClusterStore
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host import hostinfo, procs

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.cluster")

LOCAL_HEADER = "x-gridvm-local"   # a request already routed by the cluster layer
RESERVE_MB = 512
LAUNCH_TIMEOUT_S = 120.0


async def _nothing() -> None:
    return None


class ClusterNode:
    def __init__(self, manager: HostManager, *, url: str | None = None,
                 address: str | None = None, peers: Peers | None = None,
                 on_identity: Callable[[], Awaitable[None]] = _nothing,
                 on_crl: Callable[[], None] = lambda: None) -> None:
        self.m = manager
        self.url = url                    # https://ADDR:PORT other hosts reach us at
        self.address = address            # ADDR alone (our certificate's SAN, etcd's)
        self.peers = peers                # set by the API layer (HostPeer over mutual TLS)
        self.on_identity = on_identity    # we have a certificate: serve the TCP listeners
        self.on_crl = on_crl              # the CRL file changed: reload the TLS contexts
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
        self._crl_rev = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def joined(self) -> bool:
        return self.cfg is not None

    @property
    def cpu_ratio(self) -> float:
        return self.cfg.cpu_ratio if self.cfg else 4.0

    def need(self) -> tuple[ClusterConfig, Cluster]:
        if self.cfg is None or self.cluster is None:
            raise Conflict("this host is not in a cluster (gridvm cluster init, or join)")
        return self.cfg, self.cluster

    # ----- join / resume / close ------------------------------------------------------------

    async def resume(self) -> None:
        """Rejoin the cluster this home was joined to (before domains are re-adopted); start
        the etcd member this host runs if it is not running."""
        cfg = self.files.load()
        if cfg is not None:
            if self.files.etcd_dir.is_dir() and self.address:
                await asyncio.to_thread(membership.start_own_etcd, self.files.etcd_dir,
                                        self.files.identity, self.address, name=cfg.host)
            await self._attach(cfg)

    def _can_join(self) -> str:
        if self.cfg is not None:
            raise Conflict(f"this host is already in the cluster at {self.cfg.etcd} "
                           f"as {self.cfg.host}")
        if self.url is None or self.address is None:
            raise Conflict("a host in a cluster must be reachable by the others: start "
                           "gridvmd with --listen ADDR (its LAN address)")
        return self.address

    async def init(self, req: InitRequest) -> dict[str, Any]:
        """Create a cluster: its CA, its etcd (ours, with TLS, unless `req.etcd`), this host
        as its first member, and a join token for the next."""
        address = self._can_join()
        name = req.host_name()
        ca = membership.make_ca(req)
        ident = self.files.identity
        await asyncio.to_thread(membership.own_identity, ident, ca, name, address)
        own_etcd = req.etcd is None
        try:
            if req.etcd is not None:
                urls = req.etcd
            else:
                urls = await asyncio.to_thread(membership.start_own_etcd, self.files.etcd_dir,
                                               ident, address, name=name)
            cluster = Cluster(self.files.etcd(urls, timeout=5))
            info = await asyncio.to_thread(membership.first_setup, cluster, req.cluster, ca)
            await asyncio.to_thread(enroll.record_cert, cluster, name, ident.cert.read_bytes(),
                                    address, "host")
            token = await asyncio.to_thread(enroll.create_token, cluster)
            cfg = self._config(req, name, urls)
            await self._enter(cfg, cluster)
        except BaseException:
            if own_etcd:
                await asyncio.to_thread(membership.stop_own_etcd, self.files.etcd_dir)
            shutil.rmtree(ident.dir, ignore_errors=True)
            raise
        return {"cluster": info, "host": name, "etcd": urls, "token": token,
                "ca_hash": ca.hash, "server": self._server()}

    async def join(self, req: JoinRequest) -> dict[str, Any]:
        """Join a cluster: with a token (enrolment at `req.server`), or with the certificate
        this host was given beforehand and etcd's URLs."""
        address = self._can_join()
        name = req.host_name()
        ident = self.files.identity
        if req.server:
            if not (req.token and req.ca_hash):
                raise ConfigError("joining through a server takes --token and --ca-hash "
                                  "(gridvm cluster token prints them)")
            key, ans = await asyncio.to_thread(membership.enroll_with, req.server, req.token,
                                               req.ca_hash, name, address)
            ident.save(key, ans.cert.encode(), ans.ca.encode(), ans.crl.encode())
            urls = ans.etcd
        elif req.etcd:
            if not ident.exists():
                raise ConfigError("this host has no certificate of the cluster: join with "
                                  "--server ADDR --token T --ca-hash H")
            urls = req.etcd
        else:
            raise ConfigError("say which cluster: --server ADDR --token T --ca-hash H")
        try:
            if req.etcd_member:
                urls = await asyncio.to_thread(membership.become_etcd_member, self.files,
                                               urls, name, address)
            cluster = Cluster(self.files.etcd(urls, timeout=5))
            info = await self._enter(self._config(req, name, urls), cluster)
        except BaseException:
            if req.server:
                shutil.rmtree(ident.dir, ignore_errors=True)
            raise
        return {"cluster": info, "host": name, "etcd": urls}

    async def token(self, *, role: enroll.Role = "host", ttl_s: float = enroll.TOKEN_TTL_S
                    ) -> dict[str, Any]:
        """A new one-time join token and what a joiner needs with it."""
        _, cluster = self.need()
        token = await asyncio.to_thread(enroll.create_token, cluster, role=role, ttl_s=ttl_s)
        ca = await asyncio.to_thread(enroll.load_ca, cluster)
        return {"token": token, "ca_hash": ca.hash, "server": self._server(), "role": role,
                "expires_in": ttl_s}

    def _server(self) -> str:
        assert self.url is not None
        return self.url.removeprefix("https://")

    @staticmethod
    def _config(req: Settings, name: str, urls: str) -> ClusterConfig:
        return ClusterConfig(etcd=urls, host=name, ttl=req.ttl, margin=req.margin,
                             capacity_mb=req.capacity_mb, cpu_ratio=req.cpu_ratio,
                             fence_command=req.fence_command)

    async def _enter(self, cfg: ClusterConfig, cluster: Cluster) -> dict[str, Any]:
        """Check the cluster will have us, reserve our domains' names, attach; the cluster's
        info."""
        try:
            info = await asyncio.to_thread(cluster.info)
            if info is None:
                raise NotFound(f"etcd at {cfg.etcd} holds no gridvm cluster "
                               "(run gridvm cluster init first)")
            hosts = await asyncio.to_thread(cluster.hosts)
            alive = await asyncio.to_thread(cluster.alive)
            other = hosts.get(cfg.host)
            if other and other.get("url") != self.url and cfg.host in alive:
                raise Conflict(f"host name {cfg.host} is already used by a live host")
            for rec in self.local_store.all():
                await asyncio.to_thread(cluster.reserve_name, rec.name, rec.uuid)
        finally:
            cluster.etcd.close()
        self.files.save(cfg)
        await self._attach(cfg)
        await self.on_identity()
        return info

    async def _attach(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self._loop = asyncio.get_running_loop()
        self.cluster = Cluster(self.files.etcd(cfg.etcd,
                                               timeout=max(min(cfg.ttl / 3, 2.0), 0.5)))
        self.store = ClusterStore(self.local_store, self.cluster, cfg.host, self.files)
        self.m.store = self.store
        self.files.ha.mkdir(parents=True, exist_ok=True)
        self._ensure_watchdog()
        loop = asyncio.get_running_loop()
        self._elected = asyncio.Event()

        def elected() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._elected.set)

        self.election = Election(self.files.etcd(cfg.etcd, timeout=1.0), HA_ELECTION,
                                 cfg.host, cfg.ttl, on_change=elected)
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
        failing_since: float | None = None
        said = 0.0
        while True:
            try:
                await self._beat(cfg)
                failing_since = None
            except EtcdError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > 2 * cfg.ttl and now - said > 30:
                    log.warning("heartbeat failing for %.0f s: %s", now - failing_since, exc)
                    said = now
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
                "name": cfg.host, "url": self.url,
                "maintenance": bool((old or {}).get("maintenance"))})
            self._registered = True
        await self._refresh_crl(cluster)
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

    async def _refresh_crl(self, cluster: Cluster) -> None:
        """Keep our copy of the cluster's CRL current (a removed host is refused at once)."""
        rev = await asyncio.to_thread(enroll.crl_revision, cluster)
        if rev == self._crl_rev or rev == 0:
            return
        pem = await asyncio.to_thread(enroll.crl, cluster)
        await asyncio.to_thread(self.files.identity.save_crl, pem.encode())
        self._crl_rev = rev
        self.on_crl()

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
        """The HA manager's launcher (called from its threads): create the domain through
        the host's gridvmd, over a HostPeer on the daemon's event loop."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self.call(host, "POST", "/v1/domains", {"config": config, "managed": managed},
                      timeout=LAUNCH_TIMEOUT_S), self._loop)
        future.result(LAUNCH_TIMEOUT_S + 5)

    # ----- peers ----------------------------------------------------------------------------

    def url_of(self, host: str) -> str:
        """The URL another host advertises (blocking: reads the registry)."""
        _, cluster = self.need()
        hosts = cluster.hosts()
        rec = hosts.get(host)
        if rec is None:
            raise NotFound(f"unknown host {host!r} (hosts: {', '.join(sorted(hosts))})")
        if not rec.get("url"):
            raise Conflict(f"host {host} advertises no address (is its gridvmd --listen?)")
        return str(rec["url"])

    async def call(self, host: str, method: str, path: str, json: Any = None, *,
                   timeout: float = 30) -> Any:
        """One JSON call to another host's gridvmd."""
        if self.peers is None:
            raise Conflict("this gridvmd cannot reach other hosts")
        peer = await self.peers.peer(host)
        try:
            return await peer.call(method, path, json, timeout=timeout)
        finally:
            await peer.close()

    def status(self) -> dict[str, Any]:
        if self.cfg is None or self.cluster is None:
            return {"joined": False}
        election = self.election
        return {
            "joined": True, "host": self.cfg.host, "url": self.url, "etcd": self.cfg.etcd,
            "ttl": self.cfg.ttl,
            "margin": self.cfg.margin, "lease": self.files.lease_id(),
            "fenced": self.files.fenced.exists(),
            "leader": election.leader() if election else None,
            "cluster": self.cluster.info(),
        }
