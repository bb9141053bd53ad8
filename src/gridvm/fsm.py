"""Explicit state machines: one transition table per kind of thing, checked and logged.

A domain's lifecycle (gridvm.lifecycle), a host's state (gridvm.cluster.hoststate) and a
migration's phases (gridvm.host.migration_model) each declare one `Machine`: the states that
may follow each state. Every change goes through `Machine.step`, which refuses a transition
the table does not list (`IllegalTransition`) and logs `subject: old -> new (reason)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Generic, TypeVar

from gridvm.errors import Conflict

S = TypeVar("S", bound=StrEnum)


class IllegalTransition(Conflict):
    """A change of state that the transition table does not allow (a bug, or a race)."""


class Machine(Generic[S]):
    """A transition table over the states of one StrEnum, and the one place to step it."""

    def __init__(self, kind: str, table: Mapping[S, Iterable[S]], log: logging.Logger) -> None:
        self.kind = kind
        self.table: dict[S, frozenset[S]] = {s: frozenset(n) for s, n in table.items()}
        self.log = log
        states = {s for s in table} | {n for ns in self.table.values() for n in ns}
        missing = states - set(self.table)
        if missing:
            raise ValueError(f"{kind}: no row for {sorted(missing)}")

    def allowed(self, old: S, new: S) -> bool:
        """`old -> new` is in the table (staying in a state is always allowed)."""
        return old == new or new in self.table[old]

    def check(self, subject: str, old: S, new: S) -> None:
        if not self.allowed(old, new):
            raise IllegalTransition(f"{self.kind} {subject} cannot go from {old} to {new}")

    def step(self, subject: str, old: S, new: S, reason: str) -> bool:
        """Check `old -> new` and log it; False if nothing changes (old == new)."""
        self.check(subject, old, new)
        if old == new:
            return False
        self.note(subject, old, new, reason)
        return True

    def note(self, subject: str, old: S, new: S, reason: str) -> None:
        """Log a transition (already checked, e.g. before it was persisted)."""
        self.log.info("%s: %s -> %s (%s)", subject, old, new, reason)

    def edges(self) -> list[tuple[S, S]]:
        """Every allowed transition (tests walk them)."""
        return [(old, new) for old, news in self.table.items() for new in sorted(news)]
