"""The HA manager: runs on the elected host only (etcd election `gridvm/election/ha`).

Each round (every 0.5 s) it:
1. notices joined hosts whose lease has expired (`alive/<h>` gone). The host's watchdog
   killed its HA domains before the lease could expire; the manager still waits `margin`
   seconds after seeing the expiry (so at least TTL + margin after the host's last
   heartbeat), runs the fence command if one is configured, and marks the host fenced;
2. restarts the HA domains of fenced hosts, and HA domains marked lost (stopped
   unexpectedly), by priority then name, on the hosts placement picks (anti-affinity holds
   whenever room allows). A domain that stopped unexpectedly 3 times within 5 minutes is
   given up (`ha-failed`: the restart-loop guard; host failures do not count); a
   `best-effort` domain gets one try when no host has room.
"""

from __future__ import annotations

import logging
import shlex
import time
from typing import TYPE_CHECKING, Any

from gridvm.cluster.core import Cluster
from gridvm.cluster.placement import ACTIVE, Demand, NoHostFits, loads_from, place_ha
from gridvm.config.model import DomainConfig
from gridvm.errors import GridvmError
from gridvm.host import procs

if TYPE_CHECKING:
    from gridvm.cluster.node import ClusterNode

log = logging.getLogger("gridvm.ha")

ROUND_S = 0.5
LOOP_LIMIT = 3
LOOP_WINDOW_S = 300.0


class HaManager:
    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.dead_since: dict[str, float] = {}
        self.unplaced: set[str] = set()

    @property
    def cluster(self) -> Cluster:
        assert self.node.cluster is not None
        return self.node.cluster

    def round(self) -> None:
        """One pass (blocking: run it in a thread)."""
        cfg = self.node.cfg
        assert cfg is not None
        states = self.cluster.host_states()
        now = time.monotonic()
        for host, state in states.items():
            if state != "down":
                self.dead_since.pop(host, None)
                continue
            first = self.dead_since.setdefault(host, now)
            if now - first >= cfg.margin:
                self._fence(host)
                states[host] = "fenced"
        registry = self.cluster.domains()
        fenced = {h for h, s in states.items() if s == "fenced"}
        todo = [g for g in registry.values() if g.get("ha", "off") != "off" and (
            (g.get("host") in fenced and g.get("state") in ACTIVE) or g.get("state") == "lost")]
        if not todo:
            return
        todo.sort(key=lambda g: (-int(g.get("priority", 0)), str(g["name"])))
        loads = loads_from(states, self.cluster.capacity(), registry,
                           skip=frozenset(g["uuid"] for g in todo))
        for g in todo:
            self._restart(g, loads)

    def _fence(self, host: str) -> None:
        cfg = self.node.cfg
        assert cfg is not None
        if cfg.fence_command:
            try:
                procs.run([*shlex.split(cfg.fence_command), host], timeout=30)
            except procs.CommandError as exc:
                log.error("fencing %s failed, not restarting its domains yet: %s", host, exc)
                return
        self.cluster.etcd.put_json(self.cluster.key("fenced", host),
                                   {"at": time.time(), "by": cfg.host})
        log.warning("host %s is down: fenced", host)

    def _restart(self, g: dict[str, Any], loads: dict[str, Any]) -> None:
        uuid, name = str(g["uuid"]), str(g["name"])
        got = self.cluster.domain_kv(uuid)
        if got is None:
            return
        rec, rev = got
        wall = time.time()
        recent = [t for t in rec.get("ha_restarts", []) if wall - t < LOOP_WINDOW_S]
        guest_failure = rec.get("state") == "lost"   # host failures do not count
        if guest_failure and len(recent) >= LOOP_LIMIT:
            log.error("%s: restarted %d times in %.0fs; giving up", name, len(recent),
                      LOOP_WINDOW_S)
            self.cluster.move_domain(uuid, rev, {"state": "ha-failed"})
            return
        demand = Demand.of(DomainConfig.model_validate(rec["config"]))
        try:
            target = place_ha(demand, list(loads.values()), cpu_ratio=self.node.cpu_ratio)
        except NoHostFits as exc:
            if rec.get("ha") == "best-effort":
                self.cluster.move_domain(uuid, rev, {"state": "ha-failed", "reason": str(exc)})
            elif uuid not in self.unplaced:
                log.error("%s: cannot restart yet: %s", name, exc)
                self.unplaced.add(uuid)
            return
        self.unplaced.discard(uuid)
        from_host = rec.get("host")
        update = {"host": target.name, "state": "restarting",
                  "ha_restarts": [*recent, wall] if guest_failure else recent}
        if not self.cluster.move_domain(uuid, rev, update):
            return
        target.add(demand)
        log.warning("%s: restarting on %s (was on %s)", name, target.name, from_host)
        peer = self.node.peer(target.name)
        try:
            peer.post("/domains", {"config": rec["config"], "managed": rec.get("managed", False)})
        except GridvmError as exc:
            log.error("%s: restart on %s failed: %s", name, target.name, exc)
            target.remove(demand)
            self.cluster.reserve_name(name, uuid)
            self.cluster.etcd.put_json(self.cluster.key("domains", uuid),
                                       {**rec, **update, "state": "lost", "reason": str(exc)})
        finally:
            peer.close()
