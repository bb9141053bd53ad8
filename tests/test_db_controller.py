"""The database controller under a simulated environment (no QEMU, no MariaDB, no etcd):
simulated members with GTID histories, hosts that lose power and get fenced, a primary that
dies on a live host, a switchover, returning members rejoined or re-cloned. The controller
is the real one (db/controller.py, db/decide.py); only its `DbEnv` is simulated."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from gridvm.db.controller import DbController
from gridvm.db.decide import Observation

SERVERS = {"db1": 1, "db2": 2, "db3": 3}


@dataclass
class Member:
    name: str
    host: str
    history: list[str] = field(default_factory=list)     # GTIDs applied, in order
    relay: list[str] = field(default_factory=list)       # received, not applied yet
    read_only: bool = True
    master: str | None = None
    running: bool = True                                 # its domain (and MariaDB) runs

    def binlog_state(self) -> str:
        last: dict[str, str] = {}
        for g in self.history:
            last[g.rsplit("-", 1)[0]] = g
        return ",".join(sorted(last.values()))

    def pos(self) -> str:
        return self.history[-1] if self.history else ""


class SimEnv:
    """A DbEnv over simulated members, hosts and a registry (one etcd record)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.host_state = {"h1": "up", "h2": "up", "h3": "up"}
        self.m = {n: Member(n, f"h{n[-1]}") for n in SERVERS}
        self.rev = 1
        self.stored: dict[str, Any] = {}
        self.writer: str | None = None
        self.seq = 0
        self.said: list[str] = []
        self.loop = asyncio.new_event_loop()        # one loop, as in gridvmd

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # -- the world's side ------------------------------------------------------------------
    def commit(self, *, acked_by: list[str] | None = None) -> str | None:
        """A client commit on the writer: in the primary's binlog, then in the relay log of
        the replicas that receive; acknowledged (returned) if one received it."""
        p = self.m.get(self.writer or "")
        if p is None or not p.running or p.read_only:
            return None
        self.seq += 1
        g = f"0-{SERVERS[p.name]}-{self.seq}"
        p.history.append(g)
        got = [r for r in self.m.values() if r.master == p.name and r.running
               and (acked_by is None or r.name in acked_by)]
        for r in got:
            r.relay.append(g)
        return g if got else None

    def power_off(self, host: str) -> None:
        self.host_state[host] = "down"
        for mem in self.m.values():
            if mem.host == host:
                mem.running = False

    # -- DbEnv -----------------------------------------------------------------------------
    def now(self) -> float:
        return self.t

    async def load(self, name: str) -> tuple[dict[str, Any], int] | None:
        return copy.deepcopy(self.stored), self.rev

    async def save(self, record: dict[str, Any], rev: int) -> int | None:
        if rev != self.rev:
            return None
        self.stored = json.loads(json.dumps(record))
        self.rev += 1
        return self.rev

    async def hosts(self) -> dict[str, str]:
        return dict(self.host_state)

    async def domains(self, record: dict[str, Any]) -> dict[str, str]:
        return {n: "running" if m.running else "shutoff" for n, m in self.m.items()}

    async def probe(self, record: dict[str, Any], member: str) -> Observation:
        m = self.m[member]
        if not m.running:
            return Observation(False, error="no route to host")
        io = m.relay[-1] if m.relay else m.pos()
        return Observation(True, read_only=m.read_only, current_pos=m.pos(),
                           binlog_state=m.binlog_state(), io_pos=io if m.master else "",
                           master_host=record["members"][m.master]["ip"] if m.master else None,
                           io_running=bool(m.master), sql_running=bool(m.master),
                           io_state="Yes" if m.master else "", lag=0.0,
                           semisync_on=not m.read_only,
                           semisync_clients=sum(r.master == member and r.running
                                                for r in self.m.values()))

    async def kill(self, record: dict[str, Any], member: str) -> None:
        self.m[member].running = False

    async def start(self, record: dict[str, Any], member: str) -> None:
        self.m[member].running = True
        self.m[member].read_only = True

    def _apply(self, m: Member) -> None:
        m.history += m.relay
        m.relay = []

    async def promote(self, record: dict[str, Any], member: str) -> str:
        m = self.m[member]
        self._apply(m)
        m.master, m.read_only = None, False
        return m.pos()

    async def repoint(self, record: dict[str, Any], member: str, primary: str) -> None:
        m, p = self.m[member], self.m[primary]
        self._apply(m)
        assert all(g in p.history for g in m.history), f"{member} diverged from {primary}"
        m.history = list(p.history)
        m.master, m.read_only = primary, True

    async def demote(self, record: dict[str, Any], member: str) -> str:
        self.m[member].read_only = True
        return self.m[member].pos()

    async def wait_pos(self, record: dict[str, Any], member: str, pos: str,
                       timeout: float) -> bool:
        self._apply(self.m[member])
        return pos in self.m[member].history or not pos

    async def receiving(self, record: dict[str, Any], member: str, on: bool) -> None:
        self.receiving_now = {**getattr(self, "receiving_now", {}), member: on}

    async def writable(self, record: dict[str, Any], member: str) -> None:
        self.m[member].read_only = False

    async def reclone(self, record: dict[str, Any], member: str, primary: str) -> None:
        self.m[member].history = list(self.m[primary].history)
        self.m[member].relay = []

    async def route_writer(self, record: dict[str, Any], member: str | None) -> None:
        self.writer = member

    def log(self, level: int, message: str) -> None:
        self.said.append(message)


def ready_env() -> tuple[SimEnv, DbController]:
    env = SimEnv()
    env.stored = {"name": "t", "phase": "ready", "primary": "db1", "events": [],
                  "members": {n: {"host": f"h{n[-1]}", "ip": f"10.0.0.{i}", "server_id": i,
                                  "role": "primary" if n == "db1" else "replica",
                                  "since": 0.0, "why": ""} for n, i in SERVERS.items()}}
    env.m["db1"].read_only = False
    for r in ("db2", "db3"):
        env.m[r].master = "db1"
    env.writer = "db1"
    return env, DbController(env, "t", detect_s=2.0)  # type: ignore[arg-type]


def rounds(env: SimEnv, ctl: DbController, seconds: float) -> None:
    for _ in range(int(seconds / 0.5)):
        env.run(ctl.tick())
        env.t += 0.5


def role(env: SimEnv, m: str) -> str:
    return str(env.stored["members"][m]["role"])


def test_power_loss_promotes_after_fencing_and_keeps_every_acknowledged_commit() -> None:
    env, ctl = ready_env()
    acked = [g for _ in range(5) if (g := env.commit())]
    acked.append(env.commit(acked_by=["db3"]))      # only db3 received the last one
    env.power_off("h1")
    rounds(env, ctl, 3)
    assert role(env, "db1") == "lost" and env.stored["primary"] == "db1"
    assert env.writer is None, "the writer VIP left the lost primary at once"
    assert "fenced" in (ctl.waiting or "")
    env.run(asyncio.sleep(0))
    assert env.receiving_now == {"db2": False, "db3": False}, "replicas stop receiving at once"
    env.host_state["h1"] = "fenced"
    rounds(env, ctl, 1)
    assert env.stored["primary"] == "db3" and role(env, "db1") == "fenced"
    assert env.writer == "db3" and env.m["db2"].master == "db3"
    assert all(g in env.m["db3"].history for g in acked)
    assert env.commit() is not None                 # writes go on, acknowledged by db2
    assert any("db1 lost → fenced" in s for s in env.said)


def test_dead_mariadb_on_a_live_host_is_killed_then_replaced_then_rejoins() -> None:
    env, ctl = ready_env()
    env.commit()
    env.m["db1"].running = False                    # MariaDB died; h1 is still up
    env.host_state["h1"] = "up"
    rounds(env, ctl, 4)
    assert env.stored["primary"] in ("db2", "db3") and role(env, "db1") in ("fenced",
                                                                             "rejoining",
                                                                             "replica")
    rounds(env, ctl, 2)                             # started again, repointed
    assert role(env, "db1") == "replica"
    assert env.stored["members"]["db1"]["rejoined"]["how"] == "rejoin"


def test_returning_primary_with_an_unacknowledged_commit_is_recloned() -> None:
    env, ctl = ready_env()
    env.commit()
    assert env.commit(acked_by=[]) is None          # in db1's binlog only: never acked
    env.power_off("h1")
    env.host_state["h1"] = "fenced"
    rounds(env, ctl, 1.5)
    new = env.stored["primary"]
    assert new != "db1"
    env.commit()
    env.host_state["h1"] = "up"
    env.m["db1"].running = True
    rounds(env, ctl, 1.5)                           # the re-clone is a job of its own
    rej = env.stored["members"]["db1"]["rejoined"]
    assert role(env, "db1") == "replica" and rej["how"] == "reclone"
    assert "errant" in rej["why"] and env.m["db1"].history == env.m[new].history


def test_switchover_loses_nothing() -> None:
    env, ctl = ready_env()
    acked = [env.commit() for _ in range(3)]
    res = env.run(ctl.switchover("db2"))
    assert res["from"] == "db1" and res["to"] == "db2" and env.writer == "db2"
    assert role(env, "db1") == "replica" and env.m["db1"].master == "db2"
    assert all(g in env.m["db2"].history for g in acked)
    with pytest.raises(Exception, match="already the primary"):
        env.run(ctl.switchover("db2"))
    logging.getLogger().debug("%s", env.said)
