"""Making and removing a database: checks first, then a job that builds it or takes every
part of it away again.

`db create` is checked before anything is made (hosts up and distinct, names and VIPs free,
the image on every member's host) and answered at once; the job then clones and boots one
member per host, gives each gridvm's settings and account, makes the first member the
primary and the others its replicas, and puts the writer VIP (and the reader VIP) in front
of them. If any step fails, the members, the services and the record are removed and the
error is kept for `db status` to show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from gridvm.cluster.placement import Demand, loads_from, place
from gridvm.config.model import DomainConfig
from gridvm.db import model, roles, sql
from gridvm.db.env import PREFIX, guest_sh, target
from gridvm.db.members import setup_script
from gridvm.db.roles import Role
from gridvm.errors import Conflict, GridvmError, NotFound, ResourceError
from gridvm.lb.model import ServiceSpec

if TYPE_CHECKING:
    from gridvm.db.manager import DbManager

log = logging.getLogger("gridvm.db")
BOOT_S = 300.0
WRITER_CHECK = {"interval": 1.0, "rise": 1, "fall": 3}
READER_CHECK = {"interval": 2.0, "rise": 2, "fall": 2}


class Jobs:
    """The creations this gridvmd runs, and the errors of those that failed."""

    def __init__(self, db: DbManager) -> None:
        self.db = db
        self.failed: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def create(self, req: model.CreateRequest) -> dict[str, Any]:
        """Check, record, and start the job; the record (without secrets)."""
        db = self.db
        _, cluster = db.node.need()
        hosts = await asyncio.to_thread(self._hosts, req)
        await self._check(req, hosts)
        record = model.new_record(req, hosts)
        made = await asyncio.to_thread(cluster.etcd.create, PREFIX + req.name,
                                       json.dumps(record, sort_keys=True))
        if not made:
            raise Conflict(f"database {req.name!r} already exists")
        self.failed.pop(req.name, None)
        task = asyncio.create_task(self._run(record), name=f"db-create-{req.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return model.public(record)

    def _hosts(self, req: model.CreateRequest) -> list[str]:
        """One host per member: as asked (each up), or by placement over distinct hosts."""
        ccfg, cluster = self.db.node.need()
        states = cluster.host_states()
        for h in req.hosts:
            if h not in states:
                raise NotFound(f"unknown host {h!r} (hosts: {', '.join(sorted(states))})")
            if states[h] != "up":
                raise Conflict(f"host {h} is {states[h]}: a member needs a host in service")
        if req.hosts:
            return list(req.hosts)
        up = [h for h, s in states.items() if s == "up"]
        if len(up) < req.members:
            raise ResourceError(f"{req.members} members need {req.members} hosts in service "
                                f"(one member per host); the cluster has {len(up)}: "
                                f"{', '.join(sorted(up)) or 'none'}")
        loads = loads_from(states, cluster.capacity(), cluster.domains())
        demand = Demand.of(DomainConfig(name="member", memory=req.memory))
        chosen: list[str] = []
        for _ in range(req.members):
            best = place(demand, [loads[n] for n in up if n not in chosen],
                         cpu_ratio=ccfg.cpu_ratio)
            chosen.append(best.name)
        return chosen

    async def _check(self, req: model.CreateRequest, hosts: list[str]) -> None:
        db = self.db
        _, cluster = db.node.need()
        for name in req.member_names():
            if await asyncio.to_thread(cluster.find_domain, name):
                raise Conflict(f"domain name {name!r} (a member of {req.name}) is already in "
                               "use in the cluster")
        for svc in (model.writer_service(req.name), model.reader_service(req.name)):
            if svc in db.services.services:
                raise Conflict(f"virtual service {svc!r} already exists")
        vips = {rt.spec.vip: rt.spec.name for rt in db.services.services.values()}
        for vip in (req.vip, req.read_vip):
            addr = vip.rsplit(":", 1)[0] if vip else None
            if addr in vips:
                raise Conflict(f"VIP {addr} is in use by virtual service {vips[addr]}")
        for rec in (await db.records()).values():
            for role in ("writer", "reader"):
                if req.vip.startswith(f"{(rec.get(role) or {}).get('vip')}:") or (
                        req.read_vip and req.read_vip.startswith(
                            f"{(rec.get(role) or {}).get('vip')}:")):
                    raise Conflict(f"VIP {(rec.get(role) or {}).get('vip')} is in use by "
                                   f"database {rec['name']}")
        for h in sorted(set(hosts)):
            images = await db.node.call(h, "GET", "/v1/images")
            got = {i["name"]: i for i in images}
            if req.image not in got:
                raise NotFound(f"unknown recipe image {req.image!r} on host {h} (build it: "
                               "gridvm image build debian --recipe "
                               "examples/recipes/mariadb.toml)")
            if got[req.image].get("kind") != "debian":
                raise Conflict(f"image {req.image} on {h} was not built from a recipe")

    async def _run(self, record: dict[str, Any]) -> None:
        name = record["name"]
        started = time.monotonic()
        try:
            await self._build(record)
            log.info("db %s: created in %.0fs", name, time.monotonic() - started)
        except asyncio.CancelledError:
            self.failed[name] = "gridvmd stopped while the database was being created"
            await self.remove(record, quiet=True)
            raise
        except Exception as exc:
            self.failed[name] = str(exc) if isinstance(exc, GridvmError) else \
                f"{type(exc).__name__}: {exc}"
            log.error("db %s: creation failed: %s", name, self.failed[name])
            await self.remove(record, quiet=True)

    async def _build(self, record: dict[str, Any]) -> None:
        db, name = self.db, record["name"]
        members = sorted(record["members"])
        await asyncio.gather(*(db.node.call(record["members"][m]["host"], "POST",
                                            f"/v1/databases/{name}/members/{m}", {},
                                            timeout=180) for m in members))
        log.info("db %s: members started; waiting for their agents", name)
        await asyncio.gather(*(self._setup(record, m) for m in members))
        primary, replicas = members[0], members[1:]
        loop = asyncio.get_running_loop()

        def run(fn: Any, *args: Any) -> Any:
            return loop.run_in_executor(sql.POOL, fn, *args)

        log.info("db %s: members set up; %s is the primary", name, primary)
        await run(sql.make_primary, target(record, primary))
        await asyncio.gather(*(db.env.repoint(record, r, primary) for r in replicas))
        # a commit waits for a replica's acknowledgement: write once one is connected
        await run(sql.execute, target(record, primary), [
            "CREATE DATABASE IF NOT EXISTS gridvm",
            "CREATE TABLE IF NOT EXISTS gridvm.info (name VARCHAR(64) PRIMARY KEY, "
            "created DOUBLE)",
            f"REPLACE INTO gridvm.info VALUES ('{name}', {record['created']})"], 60)
        pos = await run(sql.binlog_pos, target(record, primary))
        for r in replicas:
            if not await run(sql.wait_pos, target(record, r), pos, 60.0):
                o = await run(sql.probe, target(record, r))
                raise GridvmError(f"{r} did not replicate from {primary} within 60s (IO "
                                  f"{o.io_state or 'off'}, at {o.current_pos or 'nothing'}: "
                                  f"{o.last_error or o.error or 'no error'})")
        for m in members:
            roles.transition(record, m, Role.PRIMARY if m == primary else Role.REPLICA,
                             "created" + (f", replicating from {primary}" if m != primary
                                          else ""))
        record["primary"] = primary
        await self._services(record, primary)
        got = await db.env.load(name)
        if got is None:
            raise GridvmError(f"database {name} was deleted while it was being created")
        record["phase"] = "ready"
        if await db.env.save(record, got[1]) is None:
            raise GridvmError(f"database {name} changed while it was being created")

    async def _setup(self, record: dict[str, Any], member: str) -> None:
        host = record["members"][member]["host"]
        deadline = time.monotonic() + BOOT_S
        while True:
            try:
                await guest_sh(self.db.node, host, member, "true", 15)
                break
            except GridvmError:
                if time.monotonic() > deadline:
                    raise GridvmError(f"{member}: its guest agent did not answer within "
                                      f"{BOOT_S:.0f}s of its start") from None
                await asyncio.sleep(1)
        await guest_sh(self.db.node, host, member, setup_script(record, member), 240)

    async def _services(self, record: dict[str, Any], primary: str) -> None:
        name = record["name"]
        auth = f"{sql.ADMIN}:{record['secrets']['admin']}"
        backends = sorted(record["members"])
        w = record["writer"]
        specs = [ServiceSpec.model_validate({
            "name": model.writer_service(name), "vip": w["vip"], "port": w["port"],
            "check": "mysql:primary", "auth": auth, **WRITER_CHECK,
            "backends": [{"domain": m, "port": 3306, "drained": m != primary}
                         for m in backends]})]
        r = record.get("reader")
        if r:
            specs.append(ServiceSpec.model_validate({
                "name": model.reader_service(name), "vip": r["vip"], "port": r["port"],
                "check": f"mysql:replica:{record['settings']['max_lag']:g}", "auth": auth,
                **READER_CHECK, "backends": [{"domain": m, "port": 3306} for m in backends]}))
        for spec in specs:
            await self.db.services.create(spec)

    async def remove(self, record: dict[str, Any], *, quiet: bool = False) -> list[str]:
        """Take the database away: its services, its members (on hosts that answer), its
        record. What could not be removed, one line each."""
        db, name = self.db, record["name"]
        left = []
        for svc in (model.writer_service(name), model.reader_service(name)):
            if svc in db.services.services:
                with contextlib.suppress(NotFound):
                    await db.services.delete(svc)
        for m, v in sorted(record["members"].items()):
            try:
                await db.node.call(v["host"], "DELETE", f"/v1/databases/{name}/members/{m}",
                                   timeout=120)
            except GridvmError as exc:
                left.append(f"member {m} on {v['host']}: {exc} (remove it there with "
                            f"gridvm delete --purge {m})")
                if not quiet:
                    log.warning("db %s: %s", name, left[-1])
        _, cluster = db.node.need()
        await asyncio.to_thread(cluster.etcd.delete, PREFIX + name)
        db.controllers.pop(name, None)
        return left

    async def delete(self, name: str) -> dict[str, Any]:
        db = self.db
        got = await db.env.load(name)
        if got is None:
            if self.failed.pop(name, None) is not None:
                return {"deleted": name, "left": []}
            raise NotFound(f"database {name!r} does not exist")
        record, rev = got
        if record.get("phase") == "creating":
            raise Conflict(f"database {name} is being created; delete it once that ended")
        record["phase"] = "deleting"
        if await db.env.save(record, rev) is None:
            raise Conflict(f"database {name} changed; try again")
        async with db.controller(name).lock:
            left = await self.remove(record)
        return {"deleted": name, "left": left}
