"""The HA simulator's world: hosts, etcd (leases, election, registry) and a fake clock.

`SimWorld.step()` advances the clock by one step: hosts that can reach etcd renew (or are
granted) their lease, and a host that comes back resyncs like gridvmd does; a host that
cannot renew for `ttl - ttl/3` self-fences like the watchdog (its HA domains are killed);
etcd expires leases `ttl` after their last renewal; then every powered host's `HaManager`
ticks through a `SimEnv` (the `HaEnv` of cluster/ha_env.py), the elected one running a
round. It models the host side as cluster/watchdog.py, cluster/store.py (`resync`, lost
domains) and cluster/node.py do it, and checks that no domain ever runs on two hosts.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gridvm.cluster.custody import CUSTODY, WAITING, custody
from gridvm.cluster.etcd import EtcdUnavailable
from gridvm.cluster.ha import HaManager, HaSettings
from gridvm.cluster.ha_env import FenceFailed
from gridvm.cluster.hoststate import derive
from gridvm.cluster.placement import ACTIVE, DEFAULT_CPU_RATIO
from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict, GridvmError

EPOCH = 1_700_000_000.0            # the wall clock at simulated time 0
LEVELS = {logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "err"}


@dataclass
class SimSettings:
    ttl: float = 5.0                # host lease TTL (ClusterConfig.ttl)
    margin: float = 1.0             # ClusterConfig.margin
    step: float = 0.5               # the HA round interval (ROUND_S)
    fence: str = "none"             # none | power (a fence command that powers the host off)
    cpu_ratio: float = DEFAULT_CPU_RATIO

    @property
    def lease_margin(self) -> float:
        """A lease not renewed for ttl - this counts as lost (core.Lease's default)."""
        return max(self.ttl / 3, 0.5)


@dataclass
class SimHost:
    name: str
    memory_mb: int
    cpus: int
    powered: bool = True
    linked: bool = True              # on the LAN (False: partitioned)
    etcd_ok: bool = True             # False: this host alone cannot reach etcd
    maintenance: bool = False
    fence_ok: bool = True
    launch_ok: bool = True
    watchdog_ok: bool = True         # False: self-fencing fails to kill its HA domains
    lease: int | None = None         # the lease its watchdog holds
    last_ok: float = 0.0             # its last successful renewal
    seen_lease: int | None = None    # the lease gridvmd last resynced with
    fenced_file: bool = False        # <home>/cluster/fenced
    dirty: bool = False              # registry updates deferred until etcd answers
    running: dict[str, str] = field(default_factory=dict)   # uuid -> name of its QEMUs
    manager: HaManager | None = None


@dataclass
class Registry:
    """The keys of etcd the HA manager reads and writes, with etcd's revisions."""

    revision: int = 0
    domains: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    fenced: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[int, float] = field(default_factory=dict)        # id -> expires at
    alive: dict[str, int] = field(default_factory=dict)           # host -> lease
    candidates: list[tuple[str, int]] = field(default_factory=list)   # campaign order

    def put(self, uuid: str, rec: dict[str, Any]) -> None:
        self.revision += 1
        self.domains[uuid] = (rec, self.revision)

    def delete(self, uuid: str) -> None:
        rec, _ = self.domains.pop(uuid)
        if self.names.get(rec["name"]) == uuid:
            del self.names[rec["name"]]

    def leader(self) -> tuple[str, int] | None:
        return next((c for c in self.candidates if c[1] in self.leases), None)


def domain_config(name: str, *, memory: int = 256, vcpus: int = 1, ha: str = "restart",
                  priority: int = 0, group: str | None = None,
                  hosts: Sequence[str] = ()) -> DomainConfig:
    return DomainConfig.model_validate({
        "name": name, "uuid": str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{name}.hasim")),
        "memory": memory, "vcpus": vcpus,
        "ha": {"ha": ha, "ha_priority": priority, "ha_group": group, "hosts": list(hosts)}})


def record(cfg: DomainConfig, host: str, state: str,
           restarts: Sequence[float] = ()) -> dict[str, Any]:
    """A registry record as a host publishes it (cluster/store.py `registry_record`)."""
    return {"uuid": cfg.uuid, "name": cfg.name, "host": host, "state": state,
            "managed": False, "memory": cfg.max_memory, "vcpus": cfg.vcpus,
            "ha": cfg.ha.ha, "priority": cfg.ha.ha_priority, "group": cfg.ha.ha_group,
            "config": cfg.model_dump(mode="json"), "ha_restarts": list(restarts)}


class SimWorld:
    """Simulated hosts and etcd on a fake clock; `log` collects what happened."""

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = settings or SimSettings()
        self.t = 0.0
        self.etcd_up = True
        self.hosts: dict[str, SimHost] = {}
        self.reg = Registry()
        self.log: list[str] = []
        self.configs: dict[str, DomainConfig] = {}     # every domain of the scenario
        self._leader: tuple[str, int] | None = None
        self._twice: set[tuple[str, ...]] = set()

    # ----- the log ------------------------------------------------------------------------

    def say(self, source: str, message: str, level: int = logging.INFO) -> None:
        self.log.append(f"{self.t:6.1f} {LEVELS.get(level, 'info'):<4} {source:<9} {message}")

    # ----- hosts ----------------------------------------------------------------------------

    def add_host(self, name: str, memory_mb: int, cpus: int) -> None:
        self.hosts[name] = SimHost(name, memory_mb, cpus)
        self._boot(self.hosts[name])

    def _boot(self, h: SimHost) -> None:
        h.powered = True
        env = SimEnv(self, h.name)
        h.manager = HaManager(env, HaSettings(margin=self.settings.margin,
                                              cpu_ratio=self.settings.cpu_ratio))
        self._beat(h)

    def power_off(self, h: SimHost, why: str = "") -> None:
        if not h.powered:
            return
        h.powered, h.manager, h.lease = False, None, None
        if why:
            self.say(h.name, f"powered off {why}")
        h.running.clear()

    def power_on(self, h: SimHost) -> None:
        if not h.powered:
            self._boot(h)

    def reaches_etcd(self, h: SimHost) -> bool:
        return self.etcd_up and h.powered and h.linked and h.etcd_ok

    def reach(self, h: SimHost) -> None:
        if not self.reaches_etcd(h):
            raise EtcdUnavailable(f"etcd is unreachable from {h.name}")

    def host_states(self) -> dict[str, str]:
        """cluster.core.Cluster.host_states over the simulated keys."""
        out: dict[str, str] = {}
        for name in sorted(self.hosts):
            out[name] = derive(fenced=name in self.reg.fenced, alive=name in self.reg.alive,
                               maintenance=self.hosts[name].maintenance)
        return out

    # ----- one step -------------------------------------------------------------------------

    def step(self) -> None:
        """Hosts renew or lose their leases, etcd expires leases, every manager ticks."""
        for name in sorted(self.hosts):
            self._beat(self.hosts[name])
        if self.etcd_up:
            self._expire()
        self._note_leader()
        for name in sorted(self.hosts):
            h = self.hosts[name]
            if h.powered and h.manager is not None:
                try:
                    h.manager.tick()
                except EtcdUnavailable:
                    pass                            # the node logs it and tries again
                except GridvmError as exc:
                    self.say(f"{name}/ha", f"HA round: {exc}", logging.WARNING)
        self.check_copies()

    def _beat(self, h: SimHost) -> None:
        """The watchdog's lease and gridvmd's heartbeat on one host."""
        if not h.powered:
            return
        s = self.settings
        if not self.reaches_etcd(h):
            if h.lease is not None and self.t - h.last_ok > s.ttl - s.lease_margin:
                self._self_fence(h, "could not renew in time")
            return
        if h.lease is not None and h.lease not in self.reg.leases:
            self._self_fence(h, "expired")
        if h.lease is None:
            self.reg.revision += 1
            lease = self.reg.revision
            self.reg.leases[lease] = self.t + s.ttl
            self.reg.alive[h.name] = lease
            self.reg.candidates.append((h.name, lease))
            h.lease = lease
        else:
            self.reg.leases[h.lease] = self.t + s.ttl
        h.last_ok = self.t
        if h.lease != h.seen_lease or h.dirty:
            self._resync(h)

    def _self_fence(self, h: SimHost, why: str) -> None:
        """cluster/watchdog.py: the lease is lost; kill the HA domains."""
        h.lease = None
        h.fenced_file = True
        if not h.watchdog_ok:
            self.say(f"{h.name}/wd", f"lease lost ({why}): self-fencing failed, killed nothing",
                     logging.ERROR)
            return
        killed = sorted(n for u, n in h.running.items() if self._ha(u) != "off")
        for u in [u for u, n in h.running.items() if n in killed]:
            del h.running[u]
            h.dirty = True                          # their records: when etcd answers
        self.say(f"{h.name}/wd", f"lease lost ({why}): self-fenced, killed "
                 f"{', '.join(killed) or 'no HA domain'}", logging.WARNING)

    def _ha(self, uuid: str) -> str:
        got = self.reg.domains.get(uuid)
        return str(got[0].get("ha", "off")) if got else "off"

    def _resync(self, h: SimHost) -> None:
        """cluster/store.py `resync` and node.py's `_beat`: settle the registry with what
        runs here, then drop the fenced mark."""
        if h.lease != h.seen_lease and h.seen_lease is not None:
            self.say(h.name, "lease granted: resync with the registry")
        elif h.dirty:
            self.say(h.name, "etcd answers again: resync with the registry")
        for u, name in sorted(h.running.items(), key=lambda kv: kv[1]):
            got = self.reg.domains.get(u)
            if got and got[0]["host"] != h.name:
                del h.running[u]
                self.say(h.name, f"{name}: now runs on {got[0]['host']}; dropped the local "
                         "copy", logging.WARNING)
            elif got is None or got[0]["state"] != "running":      # publish it again
                self.reg.names[name] = u
                self.reg.put(u, record(self.configs[u], h.name, "running",
                                       got[0].get("ha_restarts", []) if got else []))
        for u, (rec, _) in sorted(self.reg.domains.items(), key=lambda kv: kv[1][0]["name"]):
            if rec["host"] != h.name or u in h.running or rec.get("state") in WAITING:
                continue
            if rec.get("ha") == "restart" and rec.get("state") in ACTIVE:
                self.reg.put(u, {**rec, "state": "lost", "domid": None, "reason": "fenced"})
                self.say(h.name, f"{rec['name']}: not running here: marked lost")
            else:
                self.reg.delete(u)
                self.say(h.name, f"{rec['name']} ({rec.get('state')}): not running here: "
                         "removed from the registry", logging.WARNING)
        if self.reg.fenced.pop(h.name, None) is not None:
            self.say(h.name, "fenced mark removed")
        h.fenced_file = h.dirty = False
        h.seen_lease = h.lease

    def _expire(self) -> None:
        for lease, until in sorted(self.reg.leases.items()):
            if until > self.t + 1e-9:
                continue
            del self.reg.leases[lease]
            for host, held in sorted(self.reg.alive.items()):
                if held == lease:
                    del self.reg.alive[host]
                    self.say("etcd", f"lease of {host} expired: {host} is down")
            self.reg.candidates = [c for c in self.reg.candidates if c[1] != lease]

    def _note_leader(self) -> None:
        """Log each new holder of the HA election (a host on a new lease counts as new)."""
        if not self.etcd_up:
            return
        held = self.reg.leader()
        if held != self._leader:
            self._leader = held
            self.say("etcd", f"{held[0]} leads the HA election" if held else
                     "no host leads the HA election")

    def is_leader(self, h: SimHost) -> bool:
        held = self.reg.leader()
        return held is not None and held == (h.name, h.lease)

    def check_copies(self) -> None:
        """The one invariant: a domain runs on one host at most."""
        where: dict[str, list[str]] = {}
        for name, h in sorted(self.hosts.items()):
            for u in h.running:
                where.setdefault(u, []).append(name)
        for u, hosts in where.items():
            key = (u, *hosts)
            if len(hosts) > 1 and key not in self._twice:
                self._twice.add(key)
                name = self.hosts[hosts[0]].running[u]
                self.say("CHECK", f"{name} runs on {' and '.join(hosts)} at once!",
                         logging.ERROR)

    # ----- what hosts do to domains -------------------------------------------------------

    def start_domain(self, cfg: DomainConfig, host: str) -> None:
        """`gridvm create` on a host: reserve the name, run it, publish it."""
        h = self.hosts[host]
        self.configs[cfg.uuid] = cfg
        self.reg.names[cfg.name] = cfg.uuid
        self.reg.put(cfg.uuid, record(cfg, host, "running"))
        h.running[cfg.uuid] = cfg.name

    def crash(self, uuid: str, name: str) -> None:
        """A QEMU dies on its host and the host does not restart it (its on_crash does not
        restart, its loop guard gave up, or the relaunch failed): it marks an ha=restart
        domain lost (cluster/store.py `_unregister`) and drops any other. A crash the host
        restarts in place never reaches the registry, so it is not modelled."""
        where = [h for h in self.hosts.values() if uuid in h.running]
        for h in where:
            del h.running[uuid]
            if not self.reaches_etcd(h):
                h.dirty = True
                self.say(h.name, f"{name} crashed: registry update deferred")
                continue
            got = self.reg.domains.get(uuid)
            if got is None or got[0]["host"] != h.name:
                continue
            if got[0].get("ha") == "restart":
                self.reg.put(uuid, {**got[0], "state": "lost", "domid": None,
                                    "reason": "qemu-died"})
                self.say(h.name, f"{name} crashed: marked lost")
            else:
                self.reg.delete(uuid)
                self.say(h.name, f"{name} crashed: removed from the registry")

    def launch(self, host: str, config: dict[str, Any]) -> None:
        """A peer's POST /domains on the target host, as the HA manager calls it."""
        h = self.hosts.get(host)
        cfg = DomainConfig.model_validate(config)
        if h is None or not h.powered or not h.linked:
            raise GridvmError(f"cannot reach host {host}")
        if not h.launch_ok:
            raise GridvmError(f"QEMU of {cfg.name} failed to start on {host} (simulated)")
        if h.fenced_file and cfg.ha.ha != "off":
            raise Conflict(f"host {host} is fenced: HA domain {cfg.name} cannot start here")
        if not self.reaches_etcd(h):
            raise GridvmError("the cluster store is unreachable")
        got = self.reg.domains.get(cfg.uuid)
        restarts = got[0].get("ha_restarts", []) if got else []
        h.running[cfg.uuid] = cfg.name
        if got is None or got[0]["host"] == host:
            self.reg.names[cfg.name] = cfg.uuid
            self.reg.put(cfg.uuid, record(cfg, host, "running", restarts))
        self.say(host, f"{cfg.name} started")
        self.check_copies()


class SimEnv:
    """The `HaEnv` of one simulated host: etcd calls fail while it cannot reach etcd;
    launches run one after another, so every run is deterministic."""

    def __init__(self, world: SimWorld, host: str) -> None:
        self.world = world
        self.host = host

    def _reach(self) -> Registry:
        self.world.reach(self.world.hosts[self.host])
        return self.world.reg

    def monotonic(self) -> float:
        return self.world.t

    def wall(self) -> float:
        return EPOCH + self.world.t

    def is_leader(self) -> bool:
        self._reach()
        return self.world.is_leader(self.world.hosts[self.host])

    def host_states(self) -> dict[str, str]:
        self._reach()
        return self.world.host_states()

    def capacity(self) -> dict[str, dict[str, Any]]:
        reg = self._reach()
        return {n: {"cpus": h.cpus, "memory_mb": h.memory_mb}
                for n, h in self.world.hosts.items() if n in reg.alive}

    def domains(self) -> dict[str, dict[str, Any]]:
        reg = self._reach()
        return {u: dict(rec) for u, (rec, _) in reg.domains.items()}

    def domain_kv(self, uuid: str) -> tuple[dict[str, Any], int] | None:
        got = self._reach().domains.get(uuid)
        return (dict(got[0]), got[1]) if got else None

    def move_domain(self, uuid: str, expect_rev: int, update: dict[str, Any]) -> bool:
        reg = self._reach()
        got = reg.domains.get(uuid)
        if got is None or got[1] != expect_rev:
            return False
        new = {**got[0], **update}
        CUSTODY.check(str(new["name"]), custody(got[0].get("state")), custody(new.get("state")))
        reg.put(uuid, new)
        return True

    def put_domain(self, uuid: str, record: dict[str, Any]) -> None:
        reg = self._reach()
        got = reg.domains.get(uuid)
        if got is not None:
            CUSTODY.check(str(record["name"]), custody(got[0].get("state")),
                          custody(record.get("state")))
        reg.put(uuid, dict(record))

    def reserve_name(self, name: str, uuid: str) -> None:
        reg = self._reach()
        owner = reg.names.setdefault(name, uuid)
        if owner != uuid:
            raise Conflict(f"domain name {name!r} is already in use in the cluster")

    def fence(self, host: str) -> None:
        world = self.world
        if world.settings.fence == "none":
            return
        target = world.hosts[host]
        if not target.fence_ok:
            raise FenceFailed(f"fence command failed for {host} (exit 1)")
        world.power_off(target, "by the fence command")

    def mark_fenced(self, host: str) -> None:
        self._reach().fenced[host] = {"at": self.wall(), "by": self.host}

    def launch(self, host: str, config: dict[str, Any], managed: bool) -> None:
        self.world.launch(host, config)

    def run_all(self, jobs: Sequence[Callable[[], None]]) -> None:
        for job in jobs:
            job()

    def log(self, level: int, message: str) -> None:
        self.world.say(f"{self.host}/ha", message, level)
