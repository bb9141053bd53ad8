"""The HA manager: runs on the elected host only (etcd election `gridvm/election/ha`).

It sees the world only through a `HaEnv` (cluster/ha_env.py), so the same policy runs for
real and under the HA simulator (cluster/hasim.py). Each round (every 0.5 s, and at once
when this host is elected) it:
1. notices joined hosts whose lease has expired (`alive/<h>` gone). The host's watchdog
   killed its HA domains before the lease could expire; the manager still waits `margin`
   seconds after the expiry was first seen (so at least TTL + margin after the host's last
   heartbeat), runs the fence action, and marks the host fenced. If fencing fails the
   host stays down, its domains are not restarted, and fencing is tried again each round.
   Every host, elected or not, keeps noting when it first saw each host down (`observe`),
   so a newly elected manager counts the margin from then, not from its own first round;
2. restarts the HA domains of fenced hosts, and HA domains marked lost (stopped
   unexpectedly), by priority then name, on the hosts placement picks (anti-affinity holds
   whenever room allows). Placement and the registry's compare-and-swap run one domain at
   a time in that order; the launches of one priority level then run side by side (a
   level starts once the one above it has been launched). A domain that stopped
   unexpectedly 3 times within 5 minutes is given up (`ha-failed`: the restart-loop guard;
   host failures do not count, including domains lost with reason `fenced`, which a host
   that lost its lease reports when it is back, or `gone`, which a gridvmd reports for a
   QEMU it found gone when it started); a `best-effort` domain gets one try when no host
   has room. A host marks a domain lost only when it does not restart it itself (its
   on_crash and its own loop guard decide), so a domain never runs on two hosts.
   A launch that fails puts the domain back to `lost`; for `AVOID_S` its retries prefer
   the other hosts (the one it failed on is used only if nothing else fits).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from gridvm.cluster.custody import Custody
from gridvm.cluster.ha_env import FenceFailed, HaEnv
from gridvm.cluster.hoststate import HostWatch
from gridvm.cluster.placement import (
    ACTIVE,
    DEFAULT_CPU_RATIO,
    Demand,
    HostLoad,
    NoHostFits,
    loads_from,
    place_ha,
)
from gridvm.config.model import RESTARTED, DomainConfig
from gridvm.errors import GridvmError

ROUND_S = 0.5
LOOP_LIMIT = 3
LOOP_WINDOW_S = 300.0
OBSERVE_GAP_S = 2.0   # sightings older than a gap this long in observing are forgotten
AVOID_S = 60.0        # a domain's restarts avoid a host where its launch failed this long
LOST, HA_FAILED = Custody.LOST.value, Custody.HA_FAILED.value
HOST_FAILURES = ("fenced", "gone")   # reasons a domain was lost that are not its fault


@dataclass(frozen=True)
class HaSettings:
    """The manager's knobs (from the host's ClusterConfig)."""

    margin: float = 1.0
    cpu_ratio: float = DEFAULT_CPU_RATIO


class HaManager:
    """The HA policy of one host: `tick()` every ROUND_S (a round if elected)."""

    def __init__(self, env: HaEnv, settings: HaSettings | None = None) -> None:
        self.env = env
        self.settings = settings or HaSettings()
        self.dead_since: dict[str, float] = {}
        self.observed_at = 0.0
        self.unplaced: set[str] = set()          # "cannot restart yet" already said
        self.fence_failing: set[str] = set()     # "fencing failed" already said
        self.failed_on: dict[str, dict[str, float]] = {}  # uuid -> host -> launch failed at
        self.hosts = HostWatch()                 # logs every host state transition seen

    def tick(self) -> None:
        """A round if this host leads the HA election, else only `observe` (blocking)."""
        if self.env.is_leader():
            self.round()
        else:
            self.observe()

    def observe(self, states: dict[str, str] | None = None) -> dict[str, str]:
        """Note when each host was first seen down (blocking); the host states."""
        if states is None:
            states = self.env.host_states()
        now = self.env.monotonic()
        if now - self.observed_at > OBSERVE_GAP_S:   # not watching all along: start afresh
            self.dead_since.clear()
        self.observed_at = now
        self.hosts.observe(states)
        for host, state in states.items():
            if state == "down":
                self.dead_since.setdefault(host, now)
            else:
                self.dead_since.pop(host, None)
        return states

    def round(self) -> None:
        """One pass (blocking)."""
        env = self.env
        states = self.observe()
        now = env.monotonic()
        self.fence_failing &= {h for h, s in states.items() if s == "down"}
        for host, state in states.items():
            if state == "down" and now - self.dead_since[host] >= self.settings.margin \
                    and self._fence(host):
                states[host] = "fenced"
        registry = env.domains()
        fenced = {h for h, s in states.items() if s == "fenced"}
        todo = [g for g in registry.values() if g.get("ha", "off") in RESTARTED and (
            (g.get("host") in fenced and g.get("state") in ACTIVE) or g.get("state") == LOST)]
        self.failed_on = {u: fails for u, hs in self.failed_on.items()
                          if (fails := {h: t for h, t in hs.items() if now - t < AVOID_S})}
        if not todo:
            return
        todo.sort(key=lambda g: (-int(g.get("priority", 0)), str(g["name"])))
        loads = loads_from(states, env.capacity(), registry,
                           skip=frozenset(g["uuid"] for g in todo))
        for _, level in groupby(todo, key=lambda g: int(g.get("priority", 0))):
            env.run_all([go for g in level if (go := self._restart(g, loads)) is not None])

    def _fence(self, host: str) -> bool:
        """Fence a host that is down; True once it is marked fenced (its domains may move)."""
        try:
            self.env.fence(host)
        except FenceFailed as exc:
            if host not in self.fence_failing:       # said once, tried every round
                self.fence_failing.add(host)
                self.env.log(logging.ERROR,
                             f"fencing {host} failed, not restarting its domains yet: {exc}")
            return False
        self.env.mark_fenced(host)
        self.fence_failing.discard(host)
        self.env.log(logging.WARNING, f"host {host} is down: fenced")
        return True

    def _place(self, uuid: str, demand: Demand, loads: dict[str, HostLoad]) -> HostLoad:
        """place_ha, preferring hosts where this domain's launch has not failed lately."""
        ratio = self.settings.cpu_ratio
        failed = self.failed_on.get(uuid, {})
        if failed:
            with contextlib.suppress(NoHostFits):
                return place_ha(demand, [h for h in loads.values() if h.name not in failed],
                                cpu_ratio=ratio)
        return place_ha(demand, list(loads.values()), cpu_ratio=ratio)

    def _restart(self, g: dict[str, Any],
                 loads: dict[str, HostLoad]) -> Callable[[], None] | None:
        """Place `g` and move its registry record; the launch to run (None: nothing to do)."""
        env = self.env
        uuid, name = str(g["uuid"]), str(g["name"])
        got = env.domain_kv(uuid)
        if got is None:
            return None
        rec, rev = got
        wall = env.wall()
        recent = [t for t in rec.get("ha_restarts", []) if wall - t < LOOP_WINDOW_S]
        # host failures do not count: a domain its host's resync marked lost ("fenced": the
        # host lost its lease, so its watchdog or a power loss stopped it) is one, and so is
        # one its gridvmd found gone when it started ("gone")
        guest_failure = rec.get("state") == LOST and rec.get("reason") not in HOST_FAILURES
        if guest_failure and len(recent) >= LOOP_LIMIT:
            env.log(logging.ERROR, f"{name}: restarted {len(recent)} times in "
                                   f"{LOOP_WINDOW_S:.0f}s; giving up")
            env.move_domain(uuid, rev, {"state": HA_FAILED})
            return None
        demand = Demand.of(DomainConfig.model_validate(rec["config"]))
        try:
            target = self._place(uuid, demand, loads)
        except NoHostFits as exc:
            if rec.get("ha") == "best-effort":
                env.log(logging.ERROR, f"{name}: best-effort, giving up: {exc}")
                env.move_domain(uuid, rev, {"state": HA_FAILED, "reason": str(exc)})
            elif uuid not in self.unplaced:
                env.log(logging.ERROR, f"{name}: cannot restart yet: {exc}")
                self.unplaced.add(uuid)
            return None
        self.unplaced.discard(uuid)
        from_host = rec.get("host")
        update = {"host": target.name, "state": Custody.RESTARTING.value,
                  "ha_restarts": [*recent, wall] if guest_failure else recent}
        if not env.move_domain(uuid, rev, update):
            return None
        target.add(demand)

        def launch() -> None:
            env.log(logging.WARNING, f"{name}: restarting on {target.name} (was on {from_host})")
            try:
                env.launch(target.name, rec["config"], bool(rec.get("managed", False)))
            except GridvmError as exc:
                env.log(logging.ERROR, f"{name}: restart on {target.name} failed: {exc}")
                self.failed_on.setdefault(uuid, {})[target.name] = env.monotonic()
                self._launch_failed(uuid, name, {**rec, **update}, exc)
            else:
                self.failed_on.pop(uuid, None)

        return launch

    def _launch_failed(self, uuid: str, name: str, rec: dict[str, Any],
                       exc: GridvmError) -> None:
        """Back to `lost` (the target may have dropped the record and the name)."""
        self.env.reserve_name(name, uuid)
        self.env.put_domain(uuid, {**rec, "state": LOST, "reason": str(exc)})
