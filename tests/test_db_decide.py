"""The database controller's decisions, scenario by scenario, without QEMU or MariaDB: a
record (roles, hosts) and what a round observed go in; the plan (actions in order, or what
it waits for) comes out. Also the GTID rules and the role transition table."""

from __future__ import annotations

from typing import Any

import pytest

from gridvm.db import gtid, roles
from gridvm.db.decide import Observation, World, decide
from gridvm.db.roles import IllegalTransition, Role

IPS = {"db1": "10.0.0.1", "db2": "10.0.0.2", "db3": "10.0.0.3"}


def record(primary: str | None = "db1", **role: str) -> dict[str, Any]:
    members = {m: {"host": f"h{m[-1]}", "ip": ip, "server_id": int(m[-1]),
                   "role": role.get(m, "primary" if m == primary else "replica"),
                   "since": 0.0, "why": ""} for m, ip in IPS.items()}
    return {"name": "t", "primary": primary, "members": members, "events": []}


def replica(received: int, applied: int | None = None, master: str = "db1",
            server: int = 1, **kw: Any) -> Observation:
    applied = received if applied is None else applied
    return Observation(True, read_only=True, current_pos=f"0-{server}-{applied}",
                       binlog_state=f"0-{server}-{applied}", slave_pos=f"0-{server}-{applied}",
                       io_pos=f"0-{server}-{received}", master_host=IPS[master],
                       io_running=True, sql_running=True, io_state="Yes", lag=0.0, **kw)


def writer(seq: int, state: str | None = None) -> Observation:
    return Observation(True, read_only=False, current_pos=f"0-1-{seq}",
                       binlog_state=state or f"0-1-{seq}", semisync_on=True,
                       semisync_clients=2)


DOWN = Observation(False, error="Can't connect (2003)")
UP = {"h1": "up", "h2": "up", "h3": "up"}
RUNNING = {m: "running" for m in IPS}


def world(obs: dict[str, Observation], hosts: dict[str, str] | None = None,
          domains: dict[str, str] | None = None, down_for: dict[str, float] | None = None
          ) -> World:
    return World({**UP, **(hosts or {})}, {**RUNNING, **(domains or {})}, obs, down_for or {})


def kinds(plan: Any) -> list[tuple[str, str]]:
    return [(a.kind, a.member) for a in plan.actions]


def test_healthy_database_does_nothing() -> None:
    plan = decide(record(), world({"db1": writer(10), "db2": replica(10),
                                   "db3": replica(9)}))
    assert plan.actions == [] and plan.waiting is None


def test_power_loss_waits_for_fencing_before_promoting() -> None:
    obs = {"db1": DOWN, "db2": replica(10), "db3": replica(9)}
    plan = decide(record(), world(obs, hosts={"h1": "down"}))
    assert kinds(plan) == [("lost", "db1")]
    assert plan.waiting and "h1 to be fenced" in plan.waiting
    plan = decide(record(db1="lost"), world(obs, hosts={"h1": "down"}))
    assert plan.actions == [] and "fenced" in (plan.waiting or "")


def test_fenced_host_promotes_the_replica_that_received_most() -> None:
    """db3 applied less but received more (its relay log): it holds every acknowledged
    commit, so it is promoted, and db2 follows it."""
    obs = {"db1": DOWN, "db2": replica(10), "db3": replica(12, applied=8)}
    plan = decide(record(db1="lost"), world(obs, hosts={"h1": "fenced"}))
    assert kinds(plan) == [("fenced", "db1"), ("promote", "db3"), ("repoint", "db2")]
    assert plan.actions[1].other == "db1" and "0-1-12" in plan.actions[1].why


def test_mariadb_dead_on_a_live_host_is_killed_first() -> None:
    obs = {"db1": DOWN, "db2": replica(10), "db3": replica(10)}
    assert decide(record(), world(obs, down_for={"db1": 1.0})).actions == []  # a blip
    plan = decide(record(), world(obs, down_for={"db1": 2.5}))
    assert kinds(plan) == [("lost", "db1"), ("fence", "db1")]
    plan = decide(record(db1="fenced"), world(obs, down_for={"db1": 3.0}))
    assert kinds(plan)[0] == ("promote", "db2")      # a tie: the lowest name


def test_no_replica_answers_nothing_to_promote() -> None:
    obs = {"db1": DOWN, "db2": DOWN, "db3": DOWN}
    plan = decide(record(db1="fenced", db2="lost", db3="lost"), world(obs))
    assert plan.actions == [] and "no replica answers" in (plan.waiting or "")


def test_returning_old_primary_rejoins_or_is_recloned() -> None:
    new_primary = Observation(True, read_only=False, current_pos="0-2-15",
                              binlog_state="0-1-10,0-2-15", slave_pos="0-1-10",
                              semisync_on=True, semisync_clients=1)
    clean = Observation(True, read_only=True, current_pos="0-1-10", binlog_state="0-1-10")
    errant = Observation(True, read_only=True, current_pos="0-1-11", binlog_state="0-1-11")
    rec = record("db2", db1="fenced")
    plan = decide(rec, world({"db1": clean, "db2": new_primary,
                              "db3": replica(15, master="db2", server=2)}))
    assert kinds(plan) == [("rejoin", "db1")] and "all on db2" in plan.actions[0].why
    plan = decide(rec, world({"db1": errant, "db2": new_primary,
                              "db3": replica(15, master="db2", server=2)}))
    assert kinds(plan) == [("reclone", "db1")] and "0-1-11" in plan.actions[0].why


def test_a_fenced_member_is_started_when_its_host_is_up() -> None:
    obs = {"db1": DOWN, "db2": writer(5), "db3": replica(5, master="db2")}
    plan = decide(record("db2", db1="fenced"), world(obs, domains={"db1": "shutoff"}))
    assert kinds(plan) == [("start", "db1")]
    plan = decide(record("db2", db1="fenced"), world(obs, hosts={"h1": "down"}))
    assert plan.actions == []


def test_replica_following_the_wrong_server_is_repointed() -> None:
    obs = {"db1": writer(5), "db2": replica(5), "db3": replica(5, master="db2")}
    assert kinds(decide(record(), world(obs))) == [("repoint", "db3")]


def test_maintenance_of_the_primarys_host_switches_over() -> None:
    obs = {"db1": writer(5), "db2": replica(5), "db3": replica(4)}
    plan = decide(record(), world(obs, hosts={"h1": "maintenance"}))
    assert kinds(plan) == [("switchover", "db2")] and plan.actions[0].other == "db1"


def test_gtid_containment_and_ranking() -> None:
    primary = gtid.state("0-1-100,0-2-105")
    assert gtid.errant(gtid.state("0-1-100"), primary) == []
    assert [str(g) for g in gtid.errant(gtid.state("0-1-101"), primary)] == ["0-1-101"]
    assert gtid.at_least(gtid.position("0-2-9,1-3-4"), gtid.position("0-2-8"))
    assert not gtid.at_least(gtid.position("0-2-9"), gtid.position("0-2-9,1-1-1"))
    assert gtid.fmt(gtid.merge(gtid.position("0-1-5"), gtid.position("0-2-7"))) == "0-2-7"
    with pytest.raises(gtid.GtidError):
        gtid.parse("0-1")


def test_role_transitions_are_checked_and_logged() -> None:
    rec = record()
    said: list[str] = []
    roles.transition(rec, "db2", Role.PROMOTING, "chosen", say=lambda _, m: said.append(m))
    assert rec["members"]["db2"]["role"] == "promoting" and "db2 replica → promoting" in said[0]
    with pytest.raises(IllegalTransition):
        roles.transition(rec, "db3", Role.PRIMARY, "no: a replica is promoted first")
    assert rec["events"][-1]["to"] == "promoting"
    for role, targets in roles.TRANSITIONS.items():
        assert role not in targets


def test_writes_wait_when_the_only_counted_replica_no_longer_answers() -> None:
    """A powered-off replica's connection is still counted by the primary for minutes:
    `db status` must not say writes are acknowledged when no replica answers probes."""
    from gridvm.db.manager import _writes

    record = {"phase": "ready", "primary": "a", "settings": {"ack_timeout": None},
              "members": {"a": {"role": "primary"}, "b": {"role": "replica"},
                          "c": {"role": "replica"}}}
    primary = Observation(up=True, semisync_on=True, semisync_clients=1, semisync_waiting=1)
    gone = Observation(up=False, error="host down")
    stopped = Observation(up=True, io_running=False)
    assert _writes(record, {"a": primary, "b": gone, "c": stopped}).startswith("WRITES WAIT")
    fine = Observation(up=True, io_running=True)
    assert "acknowledged by a replica" in _writes(record, {"a": primary, "b": gone, "c": fine})
