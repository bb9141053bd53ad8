"""A domain's lifecycle: its states, the one transition table, and the states each verb accepts.

Xen's states (running, blocked, paused, shutdown, crashed, dying), `shutoff` for a managed
domain that is defined but has no QEMU, and the transitional states in which one operation
owns the domain and every other verb is refused: starting, migrating (to another host),
incoming (from another host), saving and restoring. `dying` is the teardown.

`change` is the only code that assigns a domain's state: it checks the table, persists, and
logs `name: old -> new (reason)`. `require` refuses a verb in a state it does not accept with
a `Conflict` naming the state. The type lives here, below every layer, because the stored
record (gridvm.store.records), the host runtime and the cluster registry all speak it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from gridvm.errors import Conflict
from gridvm.fsm import IllegalTransition, Machine

log = logging.getLogger("gridvm.lifecycle")


class DomainState(StrEnum):
    SHUTOFF = "shutoff"        # defined (managed), no QEMU
    STARTING = "starting"      # QEMU being launched
    RUNNING = "running"
    BLOCKED = "blocked"        # Xen's; QEMU never reports it, kept for the vocabulary
    PAUSED = "paused"
    SHUTDOWN = "shutdown"      # the guest powered off and its QEMU was kept (preserve)
    CRASHED = "crashed"        # the guest crashed and its QEMU was kept (preserve)
    MIGRATING = "migrating"    # being live-migrated to another host
    INCOMING = "incoming"      # arriving from another host
    SAVING = "saving"          # being written to a save file
    RESTORING = "restoring"    # being read back from a save file
    DYING = "dying"            # QEMU being torn down


S = DomainState
LIVE = frozenset({S.RUNNING, S.BLOCKED, S.PAUSED})
STOPPED = frozenset({S.SHUTDOWN, S.CRASHED})        # a preserved QEMU, guest not running
RESIDENT = LIVE | STOPPED                            # a QEMU that no operation owns
BUSY = frozenset({S.STARTING, S.MIGRATING, S.INCOMING, S.SAVING, S.RESTORING, S.DYING})
WITH_QEMU = RESIDENT | BUSY                          # every state but shutoff

DOING = {S.STARTING: "starting", S.MIGRATING: "migrating", S.INCOMING: "migrating here",
         S.SAVING: "being saved", S.RESTORING: "being restored", S.DYING: "stopping"}

_AWAKE = {S.PAUSED, S.SHUTDOWN, S.CRASHED, S.MIGRATING, S.SAVING, S.DYING}
TRANSITIONS: dict[DomainState, set[DomainState]] = {
    S.SHUTOFF: {S.STARTING},
    # launched as asked; SHUTOFF: the launch failed; DYING: re-adoption found QEMU gone
    S.STARTING: {S.RUNNING, S.PAUSED, S.INCOMING, S.RESTORING, S.SHUTOFF, S.DYING},
    S.RUNNING: _AWAKE | {S.BLOCKED},
    S.BLOCKED: _AWAKE | {S.RUNNING},
    S.PAUSED: _AWAKE - {S.PAUSED} | {S.RUNNING},
    S.SHUTDOWN: {S.DYING},
    S.CRASHED: {S.DYING},
    # RUNNING/PAUSED: the operation failed (or re-adoption: QEMU is the truth)
    S.MIGRATING: {S.RUNNING, S.PAUSED, S.DYING},
    S.INCOMING: {S.RUNNING, S.PAUSED, S.DYING},
    S.SAVING: {S.RUNNING, S.PAUSED, S.DYING},
    S.RESTORING: {S.RUNNING, S.PAUSED, S.DYING},
    # SHUTOFF: retired (managed); STARTING: restarted in place after QEMU died;
    # RUNNING/PAUSED: re-adopted (a gridvmd stopped half-way found its QEMU alive)
    S.DYING: {S.SHUTOFF, S.STARTING, S.RUNNING, S.PAUSED},
}
DOMAIN = Machine("domain", TRANSITIONS, log)


class Stateful(Protocol):
    """What `change` needs of a domain record."""

    state: DomainState

    @property
    def name(self) -> str: ...


def change(rec: Stateful, new: DomainState, reason: str,
           save: Callable[[], None] | None = None) -> bool:
    """Move `rec` to `new` if the table allows it, persist it with `save`, log it.

    False if it already was in `new` (nothing is saved). If `save` raises, the state is
    left as it was and the error propagates."""
    old = rec.state
    DOMAIN.check(rec.name, old, new)
    if old == new:
        return False
    rec.state = new
    if save is not None:
        try:
            save()
        except BaseException:
            rec.state = old
            raise
    DOMAIN.note(rec.name, old, new, reason)
    return True


def removed(rec: Stateful, reason: str) -> None:
    """Log that a record leaves the store (an unmanaged domain stopped, or `delete`)."""
    if rec.state not in (S.SHUTOFF, S.DYING):
        raise IllegalTransition(f"domain {rec.name} cannot be removed while {rec.state}")
    log.info("%s: %s -> removed (%s)", rec.name, rec.state, reason)


# ----- the states each verb accepts ---------------------------------------------------------

VERBS: dict[str, frozenset[DomainState]] = {
    "start": frozenset({S.SHUTOFF}),
    "delete": frozenset({S.SHUTOFF}),
    "shutdown": LIVE,
    "reboot": LIVE,
    "pause": LIVE,
    "unpause": LIVE,
    "migrate": LIVE,
    "save": LIVE,
    "destroy": RESIDENT,
    "vcpu-pin": RESIDENT,
    "mem-set": RESIDENT,
    "mem-limit": RESIDENT,
    "block-throttle": RESIDENT,
    "network-rate": RESIDENT,
    "rename": RESIDENT | {S.SHUTOFF},
    "sched-credit": RESIDENT | {S.SHUTOFF},
    "mem-max": RESIDENT | {S.SHUTOFF},
    "snapshot": LIVE,
    "revert": RESIDENT,
    "snapshot-delete": RESIDENT,
    "backup": LIVE,
    "block-attach": LIVE,
    "block-detach": LIVE,
    "network-attach": LIVE,
    "network-detach": LIVE,
    "vcpu-set": LIVE,
}


def require(verb: str, name: str, state: DomainState) -> None:
    """Refuse `verb` (a key of VERBS) on domain `name` in `state` unless it accepts it."""
    if state not in VERBS[verb]:
        raise Conflict(refusal(verb, name, state))


def refusal(verb: str, name: str, state: DomainState) -> str:
    """The one-line reason `verb` cannot run on domain `name` in `state`."""
    accepted = VERBS[verb]
    if state in BUSY:
        return f"domain {name} is {DOING[state]}; try again when it is done"
    if state is S.SHUTOFF:
        return f"domain {name} is not running"
    if state in STOPPED:
        return f"domain {name} is {state}; destroy it first"
    if accepted == {S.SHUTOFF}:
        if verb == "start":
            return f"domain {name} is already running"
        return f"domain {name} is {state}; shut it down or destroy it first"
    return f"domain {name} is {state}; {verb} needs it {' or '.join(sorted(accepted))}"
