"""A database member's role: one type, one transition table, every transition logged.

    creating ──► primary | replica
    replica ───► promoting ──► primary          (failover or switchover: the chosen replica)
    primary ───► demoting ───► replica          (switchover: the old primary)
    primary | replica ──► lost                  (stopped answering)
    lost ──────► fenced                         (its host was fenced, or gridvm killed it)
    lost | fenced | stopped ──► rejoining ──► replica | recloning ──► replica
    replica ───► stopped                        (its host is being evacuated)
    replica ───► recloning                      (its replication broke on errant data)

A member left `promoting` or `demoting` by a controller that died mid-way rejoins like a
returning one. `lost` may also go straight back to `primary`/`replica` when it answers
again before gridvm acted on it (a short blip). The record keeps each member's role with
when and why it was entered; `transition` is the only way to change one, and it refuses a
move the table does not allow (the project's `fsm.Machine`, like domains and hosts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from gridvm.fsm import IllegalTransition, Machine

log = logging.getLogger("gridvm.db")


class Role(StrEnum):
    CREATING = "creating"
    PRIMARY = "primary"
    REPLICA = "replica"
    PROMOTING = "promoting"
    DEMOTING = "demoting"
    LOST = "lost"
    FENCED = "fenced"
    STOPPED = "stopped"
    REJOINING = "rejoining"
    RECLONING = "recloning"


R = Role
TRANSITIONS: dict[Role, frozenset[Role]] = {
    R.CREATING: frozenset({R.PRIMARY, R.REPLICA}),
    R.PRIMARY: frozenset({R.DEMOTING, R.LOST}),
    R.REPLICA: frozenset({R.PROMOTING, R.LOST, R.STOPPED, R.RECLONING, R.REJOINING}),
    R.PROMOTING: frozenset({R.PRIMARY, R.REPLICA, R.LOST, R.REJOINING}),
    R.DEMOTING: frozenset({R.REPLICA, R.PRIMARY, R.LOST, R.REJOINING}),
    R.LOST: frozenset({R.FENCED, R.REJOINING, R.PRIMARY, R.REPLICA}),
    R.FENCED: frozenset({R.REJOINING}),
    R.STOPPED: frozenset({R.REJOINING}),
    R.REJOINING: frozenset({R.REPLICA, R.RECLONING, R.LOST}),
    R.RECLONING: frozenset({R.REPLICA, R.LOST, R.REJOINING}),
}
SERVING = frozenset({R.PRIMARY, R.REPLICA})
DOWN = frozenset({R.LOST, R.FENCED, R.STOPPED})
HISTORY = 30          # events kept in the record


MACHINE: Machine[Role] = Machine("database member", TRANSITIONS, log)
__all__ = ["MACHINE", "IllegalTransition", "Role", "note", "role_of", "transition"]


Logger = Callable[[int, str], None]


def _log(level: int, message: str) -> None:
    log.log(level, "%s", message)


def role_of(record: dict[str, Any], member: str) -> Role:
    return Role(record["members"][member]["role"])


def transition(record: dict[str, Any], member: str, to: Role, why: str, *,
               now: float | None = None, say: Logger = _log) -> None:
    """Move `member` of the database `record` to role `to` (in place), noting when and why,
    and log it; IllegalTransition if the table does not allow it."""
    m = record["members"][member]
    was = Role(m["role"])
    if to == was:
        return
    MACHINE.check(f"{member} of database {record['name']}", was, to)
    at = time.time() if now is None else now
    m.update(role=str(to), since=at, why=why)
    event = {"at": at, "member": member, "from": str(was), "to": str(to), "why": why}
    record["events"] = [*record.get("events", []), event][-HISTORY:]
    say(logging.WARNING if to in DOWN else logging.INFO,
        f"db {record['name']}: {member} {was} → {to}: {why}")


def note(record: dict[str, Any], member: str, what: str, *, now: float | None = None,
         say: Logger = _log) -> None:
    """An event that changes no role (a replica repointed, the writer VIP moved)."""
    at = time.time() if now is None else now
    event = {"at": at, "member": member, "from": None, "to": None, "why": what}
    record["events"] = [*record.get("events", []), event][-HISTORY:]
    say(logging.INFO, f"db {record['name']}: {member}: {what}")
