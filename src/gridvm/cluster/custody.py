"""Who holds an HA domain: the registry record's custody, one transition table.

A registry record's `state` is either what its host reports (a `DomainState`: the host
*holds* the domain) or one of the cluster's own states: `restarting` (the HA manager placed
it and is launching it), `lost` (it stopped and its host will not restart it: the HA
manager's to restart) and `ha-failed` (the HA manager gave up: the operator's to start or
delete). Every change between these goes through `CUSTODY` (compare-and-swap in
`Cluster.move_domain`), which refuses what the table does not list — e.g. a host deleting
or re-hosting a record the HA manager has not restarted yet — and logs the rest.
"""

from __future__ import annotations

import logging
from enum import StrEnum

from gridvm.fsm import Machine

log = logging.getLogger("gridvm.cluster.custody")


class Custody(StrEnum):
    HELD = "held"                 # a host holds it; the record's state is the host's
    RESTARTING = "restarting"     # placed by the HA manager (or the operator), being launched
    LOST = "lost"                 # stopped, not restarted by its host: the HA manager's
    HA_FAILED = "ha-failed"       # the HA manager gave up: the operator's


C = Custody
TABLE = {
    C.HELD: {C.LOST, C.RESTARTING,           # host reports it gone; its host was fenced
             C.HA_FAILED},                   # … and a best-effort domain finds no room
    C.RESTARTING: {C.HELD, C.LOST,           # the launch succeeded; it failed
                   C.HA_FAILED},             # its target was fenced too, no room (best-effort)
    C.LOST: {C.RESTARTING, C.HA_FAILED},     # restarted; restart-loop guard / no room
    C.HA_FAILED: {C.RESTARTING},             # the operator starts it again
}
CUSTODY: Machine[Custody] = Machine("HA custody of", TABLE, log)

# Registry states no host holds: waiting for the HA manager or the operator.
WAITING = (C.LOST.value, C.HA_FAILED.value)


def custody(state: object) -> Custody:
    """The custody a registry `state` means."""
    try:
        return Custody(str(state))
    except ValueError:
        return Custody.HELD


def step(name: str, old: dict[str, object] | None, new: dict[str, object]) -> None:
    """Check (IllegalTransition) and log the custody change from record `old` to `new`."""
    if old is None:
        return
    CUSTODY.step(name, custody(old.get("state")), custody(new.get("state")),
                 str(new.get("reason") or old.get("host") or ""))
