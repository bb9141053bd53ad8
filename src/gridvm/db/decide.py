"""The database controller's decisions: a pure function of the members' roles and what was
just observed (no I/O, no clock), so tests and the simulator drive it without QEMU.

Safety first: a primary that stopped answering is only replaced once it cannot accept a
write any more — its host fenced (the HA manager marked it; the host's watchdog killed its
members before its lease could expire), or its domain known stopped, or killed by gridvm
through its live host. Then the replica that *received* the most (its relay log included)
is promoted: with semi-synchronous replication every acknowledged commit is in at least one
replica's relay log, so the one that received the most holds them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gridvm.db import gtid
from gridvm.db.roles import Role

Kind = Literal["lost", "recovered", "fence", "fenced", "promote", "start", "rejoin",
               "reclone", "repoint", "switchover"]
RUNNING = ("running", "blocked", "paused")


@dataclass(frozen=True)
class Observation:
    """One member as its MariaDB answered a probe (or did not)."""

    up: bool
    error: str = ""                     # why it did not answer
    read_only: bool | None = None
    current_pos: str = ""               # gtid_current_pos
    binlog_state: str = ""              # gtid_binlog_state
    slave_pos: str = ""                 # gtid_slave_pos
    io_pos: str = ""                    # Gtid_IO_Pos: what its IO thread received
    master_host: str | None = None      # whom it replicates from (None: nobody)
    io_running: bool = False
    sql_running: bool = False
    io_state: str = ""                  # Slave_IO_Running: Yes / No / Connecting
    lag: float | None = None            # Seconds_Behind_Master
    last_error: str = ""
    semisync_on: bool = False           # Rpl_semi_sync_master_status
    semisync_clients: int = 0
    semisync_waiting: int = 0           # sessions waiting for an acknowledgement

    def state(self) -> gtid.State:
        """Everything this server holds, as (domain, server) -> seq."""
        return gtid.state(self.binlog_state, self.slave_pos)

    def received(self) -> gtid.Position:
        """What it has or has received (applied, or in its relay log)."""
        return gtid.merge(gtid.position(self.current_pos), gtid.position(self.io_pos))


@dataclass(frozen=True)
class World:
    """What the controller saw this round."""

    hosts: dict[str, str]               # host -> up | down | fenced | maintenance
    domains: dict[str, str]             # member -> its domain's state (registry), or missing
    obs: dict[str, Observation]
    down_for: dict[str, float] = field(default_factory=dict)   # member -> s not answering


@dataclass(frozen=True)
class Action:
    kind: Kind
    member: str
    why: str
    other: str | None = None            # promote/switchover: the old primary; repoint: the new


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    waiting: str | None = None          # why nothing more can be done now

    def add(self, kind: Kind, member: str, why: str, other: str | None = None) -> None:
        self.actions.append(Action(kind, member, why, other))


def decide(record: dict[str, Any], world: World, *, detect_s: float = 2.0) -> Plan:
    """The actions this round, in the order they must run."""
    members: dict[str, dict[str, Any]] = record["members"]
    roles = {m: Role(v["role"]) for m, v in members.items()}
    plan = Plan()
    primary = record.get("primary")

    def host_of(m: str) -> str:
        return str(members[m]["host"])

    def obs(m: str) -> Observation:
        return world.obs.get(m, Observation(False, "not probed"))

    def hstate(m: str) -> str:
        return world.hosts.get(host_of(m), "down")

    def dom_running(m: str) -> bool:
        return world.domains.get(m) in RUNNING

    def dead(m: str) -> str | None:
        """Why `m` counts as gone, or None."""
        o = obs(m)
        if o.up:
            return None
        if hstate(m) in ("down", "fenced"):
            return f"its host {host_of(m)} is {hstate(m)}"
        if not dom_running(m) and world.domains.get(m) is not None:
            return f"its domain is {world.domains[m]}"
        if world.down_for.get(m, 0.0) >= detect_s:
            return f"MariaDB does not answer ({o.error or 'no answer'}) for " \
                   f"{world.down_for[m]:.1f}s"
        return None

    # 1. members that stopped answering; a lost primary is fenced before anything else
    for m in sorted(members):
        role = roles[m]
        if role in (Role.PRIMARY, Role.REPLICA) and (why := dead(m)):
            plan.add("lost", m, why)
            roles[m] = Role.LOST
        elif role == Role.LOST and obs(m).up and m == primary and obs(m).read_only is False:
            plan.add("recovered", m, "answers again as a writable primary before anything "
                     "was done")
            roles[m] = Role.PRIMARY
        elif role == Role.LOST and obs(m).up and m != primary:
            plan.add("recovered", m, "answers again")
            roles[m] = Role.REPLICA
    if primary is not None and roles.get(primary) == Role.LOST:
        hs = hstate(primary)
        if hs == "fenced":
            plan.add("fenced", primary, f"its host {host_of(primary)} was fenced")
            roles[primary] = Role.FENCED
        elif world.domains.get(primary) is not None and not dom_running(primary) and \
                hs in ("up", "maintenance"):
            plan.add("fenced", primary, f"its domain is {world.domains[primary]} on "
                     f"{host_of(primary)}, which is up")
            roles[primary] = Role.FENCED
        elif hs in ("up", "maintenance"):
            plan.add("fence", primary, f"its host {host_of(primary)} is up: kill the domain "
                     "so it cannot take a write")
            return plan                          # the executor marks it fenced, then acts
        else:
            plan.waiting = f"waiting for host {host_of(primary)} to be fenced before " \
                           "promoting a replica"
            return plan

    # 2. no primary that can write: promote the replica that received the most
    if primary is None or roles.get(primary) == Role.FENCED:
        cands = [m for m in members if roles[m] in (Role.REPLICA, Role.PROMOTING)
                 and obs(m).up]
        if not cands:
            plan.waiting = "no replica answers: nothing to promote (writes wait)"
            return plan
        best = max(cands, key=lambda m: _candidate_key(m, obs(m), hstate(m)))
        was = f"{primary} is fenced" if primary else "there is no primary"
        got = gtid.fmt(obs(best).received()) or "empty"
        plan.add("promote", best, f"{was}; it received the most ({got})", primary)
        for m in cands:
            if m != best:
                plan.add("repoint", m, f"follow the new primary {best}", best)
        primary = best
        roles[best] = Role.PRIMARY
        _returning(plan, members, roles, world, primary, obs, hstate, dom_running,
                   promoted=True)
        return plan

    p_ok = roles.get(primary) == Role.PRIMARY and obs(primary).up and \
        obs(primary).read_only is False
    # 3. members coming back, replicas that follow the wrong server or broke
    _returning(plan, members, roles, world, primary, obs, hstate, dom_running,
               promoted=False, primary_ok=p_ok)

    # 4. planned: the primary's host went into maintenance
    if p_ok and hstate(primary) == "maintenance":
        ready = [m for m in members if roles[m] == Role.REPLICA and hstate(m) == "up"
                 and _replicating(obs(m)) and (obs(m).lag or 0) <= 5]
        if ready:
            best = max(ready, key=lambda m: _candidate_key(m, obs(m), hstate(m)))
            plan.add("switchover", best, f"host {host_of(primary)} of primary {primary} is "
                     "in maintenance", primary)
        else:
            plan.waiting = f"host {host_of(primary)} is in maintenance, but no replica is " \
                           "ready to take over"
    return plan


def _replicating(o: Observation) -> bool:
    return o.up and o.io_running and o.sql_running


def _candidate_key(m: str, o: Observation, host_state: str) -> tuple[int, int, int, str]:
    """Most received first (domain by domain, then in total), then a host that is up, then
    the member's name (reversed, so the lowest name wins a tie)."""
    pos = o.received()
    return (len(pos), gtid.rank(pos), int(host_state == "up"),
            "".join(chr(0x10FFFF - ord(c)) for c in m))


def _returning(plan: Plan, members: dict[str, dict[str, Any]], roles: dict[str, Role],
               world: World, primary: str, obs: Any, hstate: Any, dom_running: Any, *,
               promoted: bool, primary_ok: bool = True) -> None:
    """Members to start, to rejoin (repointed, or re-cloned when they hold errant
    transactions) and replicas to repair — once there is a primary to follow."""
    p_state = obs(primary).state()
    p_ip = members[primary]["ip"]
    for m in sorted(members):
        if m == primary:
            continue
        role, o, hs = roles[m], obs(m), hstate(m)
        back = role in (Role.FENCED, Role.LOST) or (role == Role.STOPPED and hs == "up")
        if back and not o.up and not dom_running(m) and hs == "up" and \
                world.domains.get(m) is not None:
            plan.add("start", m, f"its host {members[m]['host']} is up")
            continue
        if not primary_ok or promoted or not o.up:
            continue
        if role in (Role.FENCED, Role.LOST, Role.REJOINING, Role.RECLONING, Role.DEMOTING,
                    Role.PROMOTING) or (role == Role.STOPPED and hs == "up"):
            _rejoin(plan, m, o, primary, p_state)
        elif role == Role.REPLICA:
            if o.master_host != p_ip:
                plan.add("repoint", m, f"it follows {o.master_host or 'nobody'}, not the "
                         f"primary {primary}", primary)
            elif o.last_error and not (o.io_running and o.sql_running):
                bad = gtid.errant(o.state(), p_state)
                if bad:
                    plan.add("reclone", m, "replication stopped on errant transactions "
                             f"{', '.join(map(str, bad))} not on {primary}: "
                             f"{o.last_error[:120]}", primary)
                else:
                    plan.add("repoint", m, f"replication stopped: {o.last_error[:120]}",
                             primary)


def _rejoin(plan: Plan, m: str, o: Observation, primary: str, p_state: gtid.State) -> None:
    bad = gtid.errant(o.state(), p_state)
    if bad:
        plan.add("reclone", m, f"errant transactions {', '.join(map(str, bad))} are not on "
                 f"{primary}: copied again from {primary}", primary)
    else:
        mine = gtid.fmt(gtid.position(o.current_pos)) or "empty"
        plan.add("rejoin", m, f"its GTIDs ({mine}) are all on {primary}: rejoins as a "
                 "replica", primary)
