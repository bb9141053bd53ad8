"""A host's state in the cluster: up, down, fenced or maintenance, and its transition table.

A host's state is derived from the registry, in one place (`derive`): `fenced/<h>` (the HA
manager fenced it; its gridvmd clears the mark once it is back and resynced), `alive/<h>`
(its watchdog's lease) and the `maintenance` flag of `hosts/<h>`. `HostWatch` follows the
states one observer sees (every host's HA manager observes every round) and logs each
transition, checked against the table: states are sampled, so an observer may miss a short
spell (up -> fenced when it did not see the host down), but a fenced host only leaves
`fenced` when it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import StrEnum

from gridvm.fsm import Machine

log = logging.getLogger("gridvm.cluster.hosts")


class HostState(StrEnum):
    UP = "up"
    DOWN = "down"                  # its lease expired (power loss, partition, watchdog gone)
    FENCED = "fenced"              # declared dead and fenced: its HA domains may move
    MAINTENANCE = "maintenance"    # alive, but placement avoids it


H = HostState
HOST_STATES: dict[HostState, set[HostState]] = {
    H.UP: {H.DOWN, H.MAINTENANCE, H.FENCED},
    H.MAINTENANCE: {H.UP, H.DOWN, H.FENCED},
    H.DOWN: {H.UP, H.MAINTENANCE, H.FENCED},      # back before the margin, or fenced
    H.FENCED: {H.UP, H.MAINTENANCE},              # back, resynced, mark cleared
}
HOST = Machine("host", HOST_STATES, log)

REASONS = {H.DOWN: "lease expired", H.FENCED: "fenced", H.MAINTENANCE: "maintenance on"}


def derive(*, fenced: bool, alive: bool, maintenance: bool) -> HostState:
    """The state of a joined host from its registry keys."""
    if fenced:
        return H.FENCED
    if not alive:
        return H.DOWN
    return H.MAINTENANCE if maintenance else H.UP


class HostWatch:
    """The host states one observer has seen; logs every transition (and every host that
    appears or leaves)."""

    def __init__(self) -> None:
        self.seen: dict[str, HostState] = {}

    def observe(self, states: Mapping[str, str]) -> None:
        now = {name: HostState(state) for name, state in states.items()}
        for name, new in sorted(now.items()):
            old = self.seen.get(name)
            if old is None:
                log.info("host %s: %s (first seen)", name, new)
            elif not HOST.allowed(old, new):
                log.warning("host %s: %s -> %s, a transition the table does not list",
                            name, old, new)
            else:
                why = REASONS.get(new) or ("maintenance off" if old is H.MAINTENANCE
                                           else "back")
                HOST.step(f"host {name}", old, new, why)
        for name in sorted(set(self.seen) - set(now)):
            log.info("host %s: removed from the cluster", name)
        self.seen = now
