"""The database service of one gridvmd: the verbs, the members it hosts, the controllers.

Every host runs a `DbManager`. It
* runs the controller of each database whose writer VIP this host holds (every ROUND_S);
* provisions and removes the members placed on this host when asked by the host that runs
  a `db create` / `db delete`;
* answers status from anywhere (it probes the members itself) and forwards a switchover to
  the controller's host;
* takes part in `host evacuate`: the databases' primaries leave the host by switchover and
  their members there are stopped cleanly (they rejoin when the host is back in service).
Creation (db/create.py) runs as a job in the gridvmd that was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from gridvm.cluster.etcd import EtcdError
from gridvm.cluster.node import ClusterNode
from gridvm.db import create, model, roles, sql
from gridvm.db.controller import ROUND_S, DbController, Stale
from gridvm.db.decide import Observation
from gridvm.db.env import PREFIX, ClusterDbEnv, target
from gridvm.db.roles import Role
from gridvm.errors import Conflict, GridvmError, NotFound
from gridvm.host.manager import HostManager
from gridvm.lb.services import ServiceManager

log = logging.getLogger("gridvm.db")


class DbManager:
    def __init__(self, manager: HostManager, node: ClusterNode,
                 services: ServiceManager) -> None:
        self.m = manager
        self.node = node
        self.services = services
        self.env = ClusterDbEnv(node, services)
        self.controllers: dict[str, DbController] = {}
        self.jobs = create.Jobs(self)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="db-controllers")

    async def close(self) -> None:
        await self.jobs.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # ----- records ----------------------------------------------------------------------

    async def records(self) -> dict[str, dict[str, Any]]:
        if not self.node.joined:
            return {}
        _, cluster = self.node.need()
        kvs = await asyncio.to_thread(cluster.etcd.range, PREFIX)
        return {kv.key.removeprefix(PREFIX): kv.json() for kv in kvs}

    async def record(self, name: str) -> dict[str, Any]:
        got = await self.env.load(name)
        if got is None:
            raise NotFound(f"database {name!r} does not exist")
        return got[0]

    # ----- controllers ------------------------------------------------------------------

    def owns(self, record: dict[str, Any]) -> bool:
        """Does this host hold the database's writer VIP (and so control it)?"""
        return bool(self.services.peers.owner(record["writer"]["vip"]))

    def controller(self, name: str) -> DbController:
        return self.controllers.setdefault(name, DbController(self.env, name))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(ROUND_S)
            try:
                recs = await self.records()
            except (EtcdError, GridvmError) as exc:
                log.debug("databases: %s", exc)
                continue
            mine = [n for n, r in recs.items() if r.get("phase") == "ready" and self.owns(r)]
            for name in set(self.controllers) - set(recs):
                del self.controllers[name]
            results = await asyncio.gather(*(self.controller(n).tick() for n in mine),
                                           return_exceptions=True)
            for name, res in zip(mine, results, strict=True):
                if isinstance(res, Stale):
                    log.info("db %s: %s", name, res)
                elif isinstance(res, GridvmError):
                    log.warning("db %s: round: %s", name, res)
                elif isinstance(res, BaseException):
                    log.error("db %s: round failed", name, exc_info=res)

    async def _at_controller(self, record: dict[str, Any], path: str,
                             body: dict[str, Any]) -> Any:
        """Forward to the host that controls the database."""
        owner = await asyncio.to_thread(self.services.peers.owner_name,
                                        record["writer"]["vip"])
        if owner is None:
            raise Conflict(f"database {record['name']}: no host holds its writer VIP now")
        return await self.node.call(owner, "POST", path, body, timeout=120)

    async def switchover(self, name: str, to: str | None) -> dict[str, Any]:
        record = await self.record(name)
        if self.owns(record):
            return await self.controller(name).switchover(to)
        result: dict[str, Any] = await self._at_controller(
            record, f"/v1/databases/{name}/switchover", {"to": to})
        return result

    async def add_user(self, name: str, user: str, password: str,
                       database: str | None) -> dict[str, Any]:
        """An application account on every member (made on the primary, replicated):
        all privileges on `database` (made if missing), or on everything."""
        record = await self.record(name)
        p = record.get("primary")
        if p is None:
            raise Conflict(f"database {name} has no primary now")
        grant = f"`{database}`.*" if database else "*.*"
        stmts = [f"CREATE DATABASE IF NOT EXISTS `{database}`"] if database else []
        stmts += ["CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s",
                  f"GRANT ALL PRIVILEGES ON {grant} TO %s@'%%'"]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(sql.POOL, sql.execute_args, target(record, p), [
            (s, None) if s.startswith("CREATE DATABASE") else
            (s, (user, password) if "IDENTIFIED" in s else (user,)) for s in stmts])
        return {"database": name, "user": user, "grants": grant, "made_on": p}

    # ----- evacuation -------------------------------------------------------------------

    async def host_leaving(self, host: str) -> list[str]:
        """The evacuation hook: for each database with a member on `host`, switch its
        primary away and stop the member cleanly (at its controller)."""
        done: list[str] = []
        for name, record in (await self.records()).items():
            if record.get("phase") != "ready" or not any(
                    v["host"] == host for v in record["members"].values()):
                continue
            if self.owns(record):
                done += await self.leave(name, host)
            else:
                got = await self._at_controller(record, f"/v1/databases/{name}/leave",
                                                {"host": host})
                done += list(got["done"])
        return done

    async def leave(self, name: str, host: str) -> list[str]:
        """At the controller: move the primary role off `host`, then stop its members."""
        ctl = self.controller(name)
        record = await self.record(name)
        done = []
        primary = record.get("primary")
        if primary and record["members"][primary]["host"] == host:
            await ctl.tick()
            rec = await self.record(name)
            cands = [m for m, v in rec["members"].items() if v["host"] != host
                     and Role(v["role"]) == Role.REPLICA]
            if not cands:
                raise Conflict(f"database {name}: its primary {primary} is on {host} and no "
                               "replica elsewhere can take over")
            res = await ctl.switchover(None if len(cands) > 1 else cands[0])
            done.append(f"db {name}: primary switched over {res['from']} → {res['to']} "
                        f"(writes blocked {res['blocked_s']:.2f}s)")
        async with ctl.lock:
            got = await self.env.load(name)
            assert got is not None
            record, rev = got
            for m, v in record["members"].items():
                if v["host"] != host or Role(v["role"]) not in (Role.REPLICA, Role.LOST):
                    continue
                roles.transition(record, m, Role.STOPPED, f"host {host} is being evacuated")
                if await self.env.save(record, rev) is None:
                    raise Conflict(f"database {name} changed during the evacuation")
                got = await self.env.load(name)
                assert got is not None
                record, rev = got
                with contextlib.suppress(GridvmError):
                    await self.node.call(host, "POST", f"/v1/domains/{m}/shutdown",
                                         {"wait": True, "timeout": 90}, timeout=120)
                done.append(f"db {name}: member {m} stopped (it rejoins when {host} is "
                            "back in service)")
        return done

    # ----- views ------------------------------------------------------------------------

    async def view(self, name: str) -> dict[str, Any]:
        failed = self.jobs.failed.get(name)
        try:
            record = await self.record(name)
        except NotFound:
            if failed:
                return {"name": name, "phase": "failed", "error": failed}
            raise
        loop = asyncio.get_running_loop()
        names = sorted(record["members"])
        obs: list[Observation] = list(await asyncio.gather(*(
            loop.run_in_executor(sql.POOL, sql.probe, target(record, m)) for m in names)))
        hosts = await self.env.hosts()
        domains = await self.env.domains(record)
        members = []
        for m, o in zip(names, obs, strict=True):
            v = record["members"][m]
            members.append({
                "name": m, "host": v["host"], "host_state": hosts.get(v["host"], "unknown"),
                "ip": v["ip"], "server_id": v["server_id"], "role": v["role"],
                "since": v["since"], "why": v["why"], "domain": domains.get(m, "missing"),
                "answers": o.up, "error": o.error or None, "read_only": o.read_only,
                "gtid": o.current_pos, "received": o.io_pos or None,
                "replicates_from": o.master_host, "io": o.io_state or None,
                "sql": o.sql_running if o.master_host else None, "lag_s": o.lag,
                "last_error": o.last_error or None,
                "semisync": ({"on": o.semisync_on, "replicas": o.semisync_clients,
                              "waiting": o.semisync_waiting}
                             if m == record.get("primary") and o.up else None),
                "rejoined": v.get("rejoined")})
        owner = await asyncio.to_thread(self.services.peers.owner_name,
                                        record["writer"]["vip"])
        ctl = self.controllers.get(name)
        out = {**model.public(record), "members": members,
               "controller": owner, "waiting": ctl.waiting if ctl and self.owns(record)
               else None, "writes": _writes(record, dict(zip(names, obs, strict=True)))}
        return out

    async def views(self) -> list[dict[str, Any]]:
        recs = await self.records()
        return [{**model.public(r), "members": {m: {"host": v["host"], "role": v["role"]}
                                                for m, v in r["members"].items()}}
                for _, r in sorted(recs.items())]


def _writes(record: dict[str, Any], obs: dict[str, Observation]) -> str:
    """Whether writes can commit now, in plain words."""
    p = record.get("primary")
    if record.get("phase") != "ready":
        return f"the database is {record.get('phase')}"
    if p is None or not obs[p].up or Role(record["members"][p]["role"]) != Role.PRIMARY:
        return "no primary accepts writes now (a failover is under way or waits)"
    o = obs[p]
    ack = record["settings"].get("ack_timeout")
    replicas = len(record["members"]) - 1
    # The primary counts a replica's connection until TCP notices it is gone: a replica
    # whose host lost power still counts for minutes, so count only what answers probes.
    receiving = sum(1 for m, om in obs.items() if m != p and om.up and om.io_running)
    if o.semisync_clients == 0 or receiving == 0:
        if ack is None:
            return ("WRITES WAIT: no replica is replicating to acknowledge them; commits block "
                    "until one is (semi-synchronous replication never falls back to "
                    "asynchronous unless the database was made with --ack-timeout)")
        return ("writes are ASYNCHRONOUS: no replica is replicating (--ack-timeout "
                f"{ack:g}s chose to go on without one); they are lost if {p} is lost")
    if not o.semisync_on:
        return (f"writes are ASYNCHRONOUS: no acknowledgement within --ack-timeout {ack}s; "
                "semi-synchronous replication resumes once a replica catches up")
    waiting = f"; {o.semisync_waiting} waiting now" if o.semisync_waiting else ""
    return (f"writes are acknowledged by a replica before they commit "
            f"({o.semisync_clients} of {replicas} replicas connected{waiting})")
