"""The HA manager: runs on the elected host only (etcd election `gridvm/election/ha`).

Each round (every 0.5 s, and at once when this host is elected) it:
1. notices joined hosts whose lease has expired (`alive/<h>` gone). The host's watchdog
   killed its HA domains before the lease could expire; the manager still waits `margin`
   seconds after the expiry was first seen (so at least TTL + margin after the host's last
   heartbeat), runs the fence command if one is configured, and marks the host fenced.
   Every host, elected or not, keeps noting when it first saw each host down (`observe`),
   so a newly elected manager counts the margin from then, not from its own first round;
2. restarts the HA domains of fenced hosts, and HA domains marked lost (stopped
   unexpectedly), by priority then name, on the hosts placement picks (anti-affinity holds
   whenever room allows). Placement and the registry's compare-and-swap run one domain at
   a time in that order; the launches of one priority level then run side by side (a
   level starts once the one above it has been launched). A domain that stopped
   unexpectedly 3 times within 5 minutes is given up (`ha-failed`: the restart-loop guard;
   host failures do not count); a `best-effort` domain gets one try when no host has room.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
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
OBSERVE_GAP_S = 2.0   # sightings older than a gap this long in observing are forgotten


class HaManager:
    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.dead_since: dict[str, float] = {}
        self.observed_at = 0.0
        self.unplaced: set[str] = set()

    @property
    def cluster(self) -> Cluster:
        assert self.node.cluster is not None
        return self.node.cluster

    def observe(self, states: dict[str, str] | None = None) -> dict[str, str]:
        """Note when each host was first seen down (blocking); the host states."""
        if states is None:
            states = self.cluster.host_states()
        now = time.monotonic()
        if now - self.observed_at > OBSERVE_GAP_S:   # not watching all along: start afresh
            self.dead_since.clear()
        self.observed_at = now
        for host, state in states.items():
            if state == "down":
                self.dead_since.setdefault(host, now)
            else:
                self.dead_since.pop(host, None)
        return states

    def round(self) -> None:
        """One pass (blocking: run it in a thread)."""
        cfg = self.node.cfg
        assert cfg is not None
        states = self.observe()
        now = time.monotonic()
        for host, state in states.items():
            if state == "down" and now - self.dead_since[host] >= cfg.margin:
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
        for _, level in groupby(todo, key=lambda g: int(g.get("priority", 0))):
            launches = [go for g in level if (go := self._restart(g, loads)) is not None]
            if len(launches) == 1:
                launches[0]()
            elif launches:
                with ThreadPoolExecutor(max_workers=min(len(launches), 8),
                                        thread_name_prefix="ha-restart") as pool:
                    list(pool.map(lambda go: go(), launches))

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

    def _restart(self, g: dict[str, Any],
                 loads: dict[str, Any]) -> Callable[[], None] | None:
        """Place `g` and move its registry record; the launch to run (None: nothing to do)."""
        uuid, name = str(g["uuid"]), str(g["name"])
        got = self.cluster.domain_kv(uuid)
        if got is None:
            return None
        rec, rev = got
        wall = time.time()
        recent = [t for t in rec.get("ha_restarts", []) if wall - t < LOOP_WINDOW_S]
        guest_failure = rec.get("state") == "lost"   # host failures do not count
        if guest_failure and len(recent) >= LOOP_LIMIT:
            log.error("%s: restarted %d times in %.0fs; giving up", name, len(recent),
                      LOOP_WINDOW_S)
            self.cluster.move_domain(uuid, rev, {"state": "ha-failed"})
            return None
        demand = Demand.of(DomainConfig.model_validate(rec["config"]))
        try:
            target = place_ha(demand, list(loads.values()), cpu_ratio=self.node.cpu_ratio)
        except NoHostFits as exc:
            if rec.get("ha") == "best-effort":
                self.cluster.move_domain(uuid, rev, {"state": "ha-failed", "reason": str(exc)})
            elif uuid not in self.unplaced:
                log.error("%s: cannot restart yet: %s", name, exc)
                self.unplaced.add(uuid)
            return None
        self.unplaced.discard(uuid)
        from_host = rec.get("host")
        update = {"host": target.name, "state": "restarting",
                  "ha_restarts": [*recent, wall] if guest_failure else recent}
        if not self.cluster.move_domain(uuid, rev, update):
            return None
        target.add(demand)

        def launch() -> None:
            log.warning("%s: restarting on %s (was on %s)", name, target.name, from_host)
            try:
                peer = self.node.peer(target.name)
            except GridvmError as exc:
                self._launch_failed(uuid, name, rec, update, exc)
                return
            try:
                peer.post("/domains", {"config": rec["config"],
                                       "managed": rec.get("managed", False)})
            except GridvmError as exc:
                log.error("%s: restart on %s failed: %s", name, target.name, exc)
                self._launch_failed(uuid, name, rec, update, exc)
            finally:
                peer.close()

        return launch

    def _launch_failed(self, uuid: str, name: str, rec: dict[str, Any],
                       update: dict[str, Any], exc: GridvmError) -> None:
        self.cluster.reserve_name(name, uuid)
        self.cluster.etcd.put_json(self.cluster.key("domains", uuid),
                                   {**rec, **update, "state": "lost", "reason": str(exc)})
