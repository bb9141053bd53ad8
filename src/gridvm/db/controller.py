"""One database's controller: observe the members, decide (db/decide.py), act, record.

It runs on the host that holds the database's writer VIP (so the host that moves the VIP is
the host that decides where it points), every ROUND_S. A round loads the record, probes
every member at once, notes how long each has not answered, asks `decide` for a plan and
carries it out through the `DbEnv`, changing roles only through `roles.transition`. The
record is written back with a compare-and-swap: a round that finds it changed by someone
else stops. A switchover runs here too, between rounds.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

from gridvm.db import roles
from gridvm.db.decide import Action, Observation, Plan, World, decide
from gridvm.db.env import DbEnv
from gridvm.db.roles import Role
from gridvm.errors import Conflict, GridvmError

ROUND_S = 0.5
DETECT_S = 2.0
SWITCH_WAIT_S = 5.0


class Steps:
    """How long each step of a procedure took (for status and the benchmark)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.took: dict[str, float] = {}

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.took[step] = round(now - self.last, 3)
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.took.items())


class Stale(GridvmError):
    """The record changed under this controller (another one acted): start over."""


class DbController:
    """The controller of one database (on the writer VIP's host)."""

    def __init__(self, env: DbEnv, name: str, *, detect_s: float = DETECT_S) -> None:
        self.env = env
        self.name = name
        self.detect_s = detect_s
        self.failing_since: dict[str, float] = {}
        self.last: dict[str, Observation] = {}
        self.waiting: str | None = None
        self.lock = asyncio.Lock()
        self.record: dict[str, Any] | None = None
        self.rev = 0
        self.stopping: dict[str, asyncio.Task[None]] = {}   # replicas' IO threads stopping
        self.busy: dict[str, asyncio.Task[None]] = {}       # members a job works on

    def _say(self, level: int, message: str) -> None:
        self.env.log(level, message)

    async def _load(self) -> dict[str, Any]:
        got = await self.env.load(self.name)
        if got is None:
            raise Stale(f"database {self.name} was deleted")
        self.record, self.rev = got
        return self.record

    async def _save(self, record: dict[str, Any]) -> None:
        rev = await self.env.save(record, self.rev)
        if rev is None:
            raise Stale(f"database {self.name}: its record changed during the round")
        self.record, self.rev = record, rev

    def _transition(self, record: dict[str, Any], member: str, to: Role, why: str) -> None:
        roles.transition(record, member, to, why, say=self._say)

    async def observe(self, record: dict[str, Any]) -> World:
        names = sorted(record["members"])
        hosts, domains = await asyncio.gather(self.env.hosts(), self.env.domains(record))

        async def probe(m: str) -> Observation:
            host = record["members"][m]["host"]
            if hosts.get(host) in ("down", "fenced"):      # no waiting for a dead machine
                return Observation(False, error=f"its host {host} is {hosts.get(host)}")
            return await self.env.probe(record, m)

        obs = await asyncio.gather(*(probe(m) for m in names))
        now = self.env.now()
        seen = dict(zip(names, obs, strict=True))
        for m, o in seen.items():
            if o.up:
                self.failing_since.pop(m, None)
            else:
                self.failing_since.setdefault(m, now)
        self.last = seen
        return World(hosts, domains, seen,
                      {m: now - t for m, t in self.failing_since.items()})

    async def tick(self) -> Plan:
        """One round (under the lock: a switchover never runs beside it)."""
        async with self.lock:
            record = copy.deepcopy(await self._load())
            if record.get("phase") != "ready":
                return Plan()
            world = await self.observe(record)
            plan = decide(record, world, detect_s=self.detect_s)
            self.waiting = plan.waiting
            for action in plan.actions:
                if action.member not in self.busy:
                    await self._act(record, action, world)
            return plan

    async def _act(self, record: dict[str, Any], a: Action, world: World) -> None:
        m = a.member
        if a.kind == "lost":
            self._transition(record, m, Role.LOST, a.why)
            if m == record.get("primary"):
                await self.env.route_writer(record, None)     # no new writes to it
                self._stop_receiving(record, world)
            await self._save(record)
        elif a.kind == "recovered":
            back = Role.PRIMARY if m == record.get("primary") else Role.REPLICA
            self._transition(record, m, back, a.why)
            if back == Role.PRIMARY:
                await self._resume_receiving(record)
                await self.env.route_writer(record, m)
            await self._save(record)
        elif a.kind == "fence":
            await self.env.kill(record, m)
            self._transition(record, m, Role.FENCED, f"{a.why}: domain destroyed")
            await self._save(record)
        elif a.kind == "fenced":
            self._transition(record, m, Role.FENCED, a.why)
            await self._save(record)
        elif a.kind == "promote":
            await self._promote(record, a)
        elif a.kind == "start":
            await self.env.start(record, m)
            roles.note(record, m, f"domain started ({a.why})", say=self._say)
            self.failing_since[m] = self.env.now()
            await self._save(record)
        elif a.kind in ("rejoin", "reclone"):
            await self._rejoin(record, a)
        elif a.kind == "repoint":
            await self.env.repoint(record, m, a.other or str(record["primary"]))
            roles.note(record, m, f"repointed: {a.why}", say=self._say)
            await self._save(record)
        elif a.kind == "switchover":
            await self._switch(record, a.member, a.why)

    def _stop_receiving(self, record: dict[str, Any], world: World) -> None:
        """The primary is lost: stop the replicas' IO threads now, in the background. A
        thread stuck on a dead primary's connection makes STOP SLAVE wait; this overlaps
        that wait with the wait for fencing. What they received stays in their relay logs."""
        for r, v in record["members"].items():
            if Role(v["role"]) == Role.REPLICA and world.obs.get(r, Observation(False)).up:
                task = asyncio.create_task(self.env.receiving(record, r, False))
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
                self.stopping[r] = task

    async def _stopped(self) -> None:
        tasks, self.stopping = list(self.stopping.values()), {}
        if tasks:
            await asyncio.wait(tasks, timeout=15)

    async def _resume_receiving(self, record: dict[str, Any]) -> None:
        """A lost primary answers again before anything was done: receive from it again."""
        await self._stopped()
        await asyncio.gather(*(self.env.receiving(record, r, True)
                               for r, v in record["members"].items()
                               if Role(v["role"]) == Role.REPLICA),
                             return_exceptions=True)

    async def _promote(self, record: dict[str, Any], a: Action) -> None:
        m, old = a.member, a.other
        self._transition(record, m, Role.PROMOTING, a.why)
        await self._save(record)
        steps = Steps()
        await self._stopped()
        steps.done("replicas stopped receiving")
        try:
            pos = await self.env.promote(record, m)
            steps.done("relay log applied, writable")
        except GridvmError as exc:
            self._transition(record, m, Role.REPLICA, f"promotion failed: {exc}")
            await self._save(record)
            raise
        record["primary"] = m
        self._transition(record, m, Role.PRIMARY, f"promoted at {pos or 'an empty history'}"
                         + (f" (was {old})" if old else ""))
        await self._save(record)
        steps.done("recorded")
        await asyncio.gather(self._follow(record, m, exclude={m}),
                             self.env.route_writer(record, m))
        steps.done("replicas repointed, writer VIP moved")
        roles.note(record, m, f"the writer VIP sends new connections here ({steps})",
                   say=self._say)
        await self._save(record)

    async def _follow(self, record: dict[str, Any], primary: str, exclude: set[str]) -> None:
        """Repoint every serving replica at `primary`, side by side."""
        todo = [m for m, v in record["members"].items()
                if m not in exclude and Role(v["role"]) == Role.REPLICA
                and self.last.get(m, Observation(False)).up]
        results = await asyncio.gather(*(self.env.repoint(record, m, primary) for m in todo),
                                       return_exceptions=True)
        for m, res in zip(todo, results, strict=True):
            if isinstance(res, BaseException):
                self._say(logging.ERROR, f"db {self.name}: {m}: repoint failed: {res}")
            else:
                roles.note(record, m, f"follows {primary}", say=self._say)

    async def _rejoin(self, record: dict[str, Any], a: Action) -> None:
        m, primary = a.member, a.other or str(record["primary"])
        if Role(record["members"][m]["role"]) not in (Role.REJOINING, Role.RECLONING):
            self._transition(record, m, Role.REJOINING, "answers again; checking its GTIDs")
        if a.kind == "reclone":
            if Role(record["members"][m]["role"]) != Role.RECLONING:
                self._transition(record, m, Role.RECLONING, a.why)
            await self._save(record)
            job = asyncio.create_task(self._reclone(m, primary, a.why), name=f"reclone-{m}")
            self.busy[m] = job
            job.add_done_callback(lambda _: self.busy.pop(m, None))
            return
        await self.env.repoint(record, m, primary)
        self._transition(record, m, Role.REPLICA, a.why)
        record["members"][m]["rejoined"] = {"at": time.time(), "how": a.kind, "why": a.why}
        await self._save(record)

    async def _reclone(self, m: str, primary: str, why: str) -> None:
        """Copy the primary's data into `m` and make it a replica (a job of its own: the
        rounds go on meanwhile)."""
        assert self.record is not None
        record = copy.deepcopy(self.record)
        t0, took = time.monotonic(), 0.0
        try:
            await self.env.reclone(record, m, primary)
            await self.env.repoint(record, m, primary)
            took = time.monotonic() - t0
            error = None
        except Exception as exc:      # reported; the next round decides again
            error = str(exc) if isinstance(exc, GridvmError) else f"{type(exc).__name__}: {exc}"
        async with self.lock:
            record = copy.deepcopy(await self._load())
            if Role(record["members"][m]["role"]) != Role.RECLONING:
                return
            if error is not None:
                self._transition(record, m, Role.REJOINING, f"re-clone failed: {error}")
            else:
                self._transition(record, m, Role.REPLICA,
                                 f"re-cloned from {primary} in {took:.0f}s ({why})")
                record["members"][m]["rejoined"] = {"at": time.time(), "how": "reclone",
                                                    "why": why}
            await self._save(record)

    # ----- planned switchover ---------------------------------------------------------------

    async def switchover(self, to: str | None = None) -> dict[str, Any]:
        """Move the primary role to `to` (default: the most caught-up replica) without
        losing a write; the seconds writes were blocked."""
        async with self.lock:
            record = copy.deepcopy(await self._load())
            if record.get("phase") != "ready":
                raise Conflict(f"database {self.name} is {record.get('phase')}")
            world = await self.observe(record)
            if to is None:
                ready = [m for m, v in record["members"].items()
                         if Role(v["role"]) == Role.REPLICA and world.obs[m].up
                         and world.obs[m].io_running and world.obs[m].sql_running]
                if not ready:
                    raise Conflict(f"database {self.name} has no replica ready to take over")
                to = max(ready, key=lambda m: (len(world.obs[m].received()),
                                               sum(g.seq for g in
                                                   world.obs[m].received().values()),
                                               m))
            return await self._switch(record, to, "switchover asked for")

    async def _switch(self, record: dict[str, Any], to: str, why: str) -> dict[str, Any]:
        old = record.get("primary")
        if to not in record["members"]:
            raise Conflict(f"database {self.name} has no member {to!r} "
                           f"(members: {', '.join(sorted(record['members']))})")
        if old is None or Role(record["members"][old]["role"]) != Role.PRIMARY:
            raise Conflict(f"database {self.name} has no working primary to switch from")
        if to == old:
            raise Conflict(f"{to} is already the primary of {self.name}")
        o = self.last.get(to)
        if Role(record["members"][to]["role"]) != Role.REPLICA or o is None or not (
                o.up and o.io_running and o.sql_running):
            raise Conflict(f"{to} is not a replica that replicates now: it cannot take over")
        self._transition(record, old, Role.DEMOTING, f"switchover to {to}: {why}")
        self._transition(record, to, Role.PROMOTING, f"switchover from {old}: {why}")
        await self._save(record)
        steps = Steps()
        await self.env.route_writer(record, None)
        steps.done("writer VIP closed")
        pos = await self.env.demote(record, old)
        steps.done("old primary read-only")
        if not await self.env.wait_pos(record, to, pos, SWITCH_WAIT_S):
            await self.env.writable(record, old)
            await self.env.route_writer(record, old)
            self._transition(record, old, Role.PRIMARY, f"switchover aborted: {to} did not "
                             f"reach {pos} in {SWITCH_WAIT_S:g}s")
            self._transition(record, to, Role.REPLICA, "switchover aborted")
            await self._save(record)
            raise Conflict(f"switchover aborted: {to} did not catch up with {old} in "
                           f"{SWITCH_WAIT_S:g}s; {old} is the primary again")
        steps.done("caught up")
        # `to` has everything: the others may follow it while it becomes writable
        record["primary"] = to
        self._transition(record, to, Role.PRIMARY, f"switchover from {old} at {pos}")
        self._transition(record, old, Role.REPLICA, f"switchover to {to}")
        await asyncio.gather(self.env.promote(record, to), self.env.repoint(record, old, to),
                             self._follow(record, to, exclude={to, old}))
        steps.done("promoted, replicas repointed")
        await self.env.route_writer(record, to)
        steps.done("writer VIP moved")
        blocked = time.monotonic() - steps.t0
        roles.note(record, to, f"switchover done: writes blocked {blocked:.2f}s ({steps})",
                   say=self._say)
        await self._save(record)
        return {"database": self.name, "from": old, "to": to, "position": pos,
                "blocked_s": round(blocked, 3), "steps": steps.took}
