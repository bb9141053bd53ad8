"""MariaDB global transaction IDs: positions, binlog states, and the two questions gridvm asks.

A GTID is `domain-server-seq`. A *position* (`gtid_current_pos`, `gtid_slave_pos`, a
replica's `Gtid_IO_Pos`) names the last transaction per replication domain; a *binlog state*
(`gtid_binlog_state`) names the last one per (domain, server) pair that a server's binary
log holds. With `gtid_strict_mode` every server applies a domain's transactions in one
order, so:

* a member's history is contained in a primary's when every (domain, server) pair the
  member has, the primary has at the same or a later sequence number — anything else is an
  *errant* transaction (written on the member and never replicated);
* the most advanced replica is the one whose position is furthest in every domain (ties
  and incomparable positions are settled by the sum of sequence numbers).

Everything here is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from gridvm.errors import GridvmError


class GtidError(GridvmError):
    """A GTID list MariaDB would not have printed."""


@dataclass(frozen=True, order=True)
class Gtid:
    domain: int
    server: int
    seq: int

    def __str__(self) -> str:
        return f"{self.domain}-{self.server}-{self.seq}"


def parse(text: str | None) -> list[Gtid]:
    """`0-1-100,1-2-5` (MariaDB's format; whitespace and newlines allowed) → GTIDs."""
    out = []
    for item in (text or "").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split("-")
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
            raise GtidError(f"bad GTID {item!r} (expected DOMAIN-SERVER-SEQ)")
        out.append(Gtid(int(parts[0]), int(parts[1]), int(parts[2])))
    return out


Position = dict[int, Gtid]                 # domain -> last GTID
State = dict[tuple[int, int], int]         # (domain, server) -> last seq


def position(text: str | None) -> Position:
    """A position: the last GTID of each domain (the later one if a domain repeats)."""
    pos: Position = {}
    for g in parse(text):
        if g.domain not in pos or g.seq > pos[g.domain].seq:
            pos[g.domain] = g
    return pos


def state(*texts: str | None) -> State:
    """A binlog state (or several lists merged, e.g. binlog state and slave position)."""
    st: State = {}
    for text in texts:
        for g in parse(text):
            key = (g.domain, g.server)
            st[key] = max(st.get(key, 0), g.seq)
    return st


def fmt(pos: Position) -> str:
    """A position back in MariaDB's text form (sorted by domain)."""
    return ",".join(str(g) for _, g in sorted(pos.items()))


def fmt_state(st: State) -> str:
    """A binlog state back in MariaDB's text form (sorted by domain, then server)."""
    return ",".join(f"{d}-{s}-{n}" for (d, s), n in sorted(st.items()))


def errant(member: State, primary: State) -> list[Gtid]:
    """The member's transactions the primary does not have (empty: contained)."""
    return [Gtid(d, s, n) for (d, s), n in sorted(member.items())
            if primary.get((d, s), -1) < n]


def seqs(pos: Position) -> dict[int, int]:
    return {d: g.seq for d, g in pos.items()}


def at_least(a: Position, b: Position) -> bool:
    """Has `a` reached `b` in every domain of `b`?"""
    return all(d in a and a[d].seq >= g.seq for d, g in b.items())


def rank(pos: Position) -> int:
    """A number to order positions that no domain-by-domain comparison settles."""
    return sum(g.seq for g in pos.values())


def merge(*positions: Position) -> Position:
    """The furthest of several positions, domain by domain."""
    out: Position = {}
    for pos in positions:
        for d, g in pos.items():
            if d not in out or g.seq > out[d].seq:
                out[d] = g
    return out
