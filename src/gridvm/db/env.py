"""The database controller's environment: everything a round touches, behind one Protocol.

`DbController` (db/controller.py) sees the world only through a `DbEnv`: a clock, the
database's record with its compare-and-swap, the hosts' states and the members' domains,
probes of the members' MariaDB, the SQL steps of promotion and repointing, killing and
starting a member's domain, re-cloning a member, and where the writer VIP sends new
connections. `ClusterDbEnv` is the real one (etcd, HostPeers, PyMySQL, the lb layer); tests
give the controller a simulated one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gridvm.cluster.etcd import Compare, put_op
from gridvm.cluster.node import ClusterNode
from gridvm.db import model, sql
from gridvm.db.decide import Observation
from gridvm.errors import GridvmError
from gridvm.lb.services import ServiceManager

log = logging.getLogger("gridvm.db")
T = TypeVar("T")
PREFIX = "/gridvm/databases/"


class DbEnv(Protocol):
    """What one controller round needs from the world, and nothing else."""

    def now(self) -> float:
        """Seconds on a clock that never jumps."""

    async def load(self, name: str) -> tuple[dict[str, Any], int] | None:
        """The database's record and its revision (None: it was deleted)."""

    async def save(self, record: dict[str, Any], rev: int) -> int | None:
        """Write the record if it is still at `rev`; the new revision, or None."""

    async def hosts(self) -> dict[str, str]:
        """up | down | fenced | maintenance for every host."""

    async def domains(self, record: dict[str, Any]) -> dict[str, str]:
        """Each member's domain state as the registry has it (absent: no domain)."""

    async def probe(self, record: dict[str, Any], member: str) -> Observation: ...

    async def kill(self, record: dict[str, Any], member: str) -> None:
        """Destroy the member's domain through its host (GridvmError if not done)."""

    async def start(self, record: dict[str, Any], member: str) -> None: ...

    async def promote(self, record: dict[str, Any], member: str) -> str:
        """Apply its relay log, stop replicating, accept writes; its GTID position."""

    async def repoint(self, record: dict[str, Any], member: str, primary: str) -> None: ...

    async def demote(self, record: dict[str, Any], member: str) -> str:
        """Read-only, clients disconnected; the final binlog position."""

    async def wait_pos(self, record: dict[str, Any], member: str, pos: str,
                       timeout: float) -> bool: ...

    async def receiving(self, record: dict[str, Any], member: str, on: bool) -> None:
        """Start or stop a replica's IO thread (what it received stays)."""

    async def writable(self, record: dict[str, Any], member: str) -> None:
        """Accept writes again (an aborted switchover)."""

    async def reclone(self, record: dict[str, Any], member: str, primary: str) -> None:
        """Replace the member's data with a copy of the primary's."""

    async def route_writer(self, record: dict[str, Any], member: str | None) -> None:
        """The writer VIP sends new connections to `member` only (None: to nobody)."""

    def log(self, level: int, message: str) -> None: ...


def target(record: dict[str, Any], member: str) -> sql.Target:
    m = record["members"][member]
    return sql.Target(member, m["ip"], record["secrets"]["admin"])


class ClusterDbEnv:
    """The real environment of a controller running in a gridvmd."""

    def __init__(self, node: ClusterNode, services: ServiceManager) -> None:
        self.node = node
        self.services = services

    def now(self) -> float:
        return time.monotonic()

    async def _sql(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(sql.POOL, fn, *args)

    async def load(self, name: str) -> tuple[dict[str, Any], int] | None:
        _, cluster = self.node.need()
        kv = await asyncio.to_thread(cluster.etcd.get, PREFIX + name)
        return (kv.json(), kv.mod_revision) if kv else None

    async def save(self, record: dict[str, Any], rev: int) -> int | None:
        _, cluster = self.node.need()
        key = PREFIX + record["name"]
        ok = await asyncio.to_thread(cluster.etcd.txn, [Compare(key, "MOD", rev)],
                                     [put_op(key, json.dumps(record, sort_keys=True))])
        if not ok:
            return None
        kv = await asyncio.to_thread(cluster.etcd.get, key)
        return kv.mod_revision if kv else None

    async def hosts(self) -> dict[str, str]:
        _, cluster = self.node.need()
        return await asyncio.to_thread(cluster.host_states)

    async def domains(self, record: dict[str, Any]) -> dict[str, str]:
        _, cluster = self.node.need()
        regs = await asyncio.to_thread(cluster.domains)
        by_name = {str(r.get("name")): r for r in regs.values()}
        return {m: str(by_name[m].get("state")) for m in record["members"] if m in by_name}

    async def probe(self, record: dict[str, Any], member: str) -> Observation:
        return await self._sql(sql.probe, target(record, member))

    async def _host_call(self, record: dict[str, Any], member: str, method: str, path: str,
                         body: Any = None, timeout: float = 30) -> Any:
        host = record["members"][member]["host"]
        return await self.node.call(host, method, path, body, timeout=timeout)

    async def kill(self, record: dict[str, Any], member: str) -> None:
        await self._host_call(record, member, "POST", f"/v1/domains/{member}/destroy")

    async def start(self, record: dict[str, Any], member: str) -> None:
        await self._host_call(record, member, "POST", f"/v1/domains/{member}/start", {},
                              timeout=120)

    async def promote(self, record: dict[str, Any], member: str) -> str:
        t = target(record, member)
        pos = await self._sql(sql.wait_applied, t, 60.0)
        await self._sql(sql.make_primary, t)
        return pos

    async def repoint(self, record: dict[str, Any], member: str, primary: str) -> None:
        await self._sql(sql.repoint, target(record, member),
                        record["members"][primary]["ip"], record["secrets"]["repl"])

    async def demote(self, record: dict[str, Any], member: str) -> str:
        return await self._sql(sql.demote, target(record, member))

    async def receiving(self, record: dict[str, Any], member: str, on: bool) -> None:
        await self._sql(sql.start_io if on else sql.stop_io, target(record, member))

    async def wait_pos(self, record: dict[str, Any], member: str, pos: str,
                       timeout: float) -> bool:
        return await self._sql(sql.wait_pos, target(record, member), pos, timeout)

    async def writable(self, record: dict[str, Any], member: str) -> None:
        await self._sql(sql.set_read_only, target(record, member), False)

    async def reclone(self, record: dict[str, Any], member: str, primary: str) -> None:
        dbs = await self._sql(sql.user_databases, target(record, primary))
        script = reclone_script(record["members"][primary]["ip"], record["secrets"]["admin"],
                                dbs)
        await guest_sh(self.node, record["members"][member]["host"], member, script, 600)

    async def route_writer(self, record: dict[str, Any], member: str | None) -> None:
        await self.services.route_only(model.writer_service(record["name"]), member)

    def log(self, level: int, message: str) -> None:
        log.log(level, "%s", message)


async def guest_sh(node: ClusterNode, host: str, member: str, script: str,
                   timeout: float = 120) -> str:
    """Run a shell script (given on stdin, so no secret shows in a process list) in a
    member through its host's guest agent; its output, or GridvmError with its errors."""
    res = await node.call(host, "POST", f"/v1/domains/{member}/guest-exec", {
        "argv": ["/bin/sh", "-s"], "input": base64.b64encode(script.encode()).decode(),
        "timeout": timeout}, timeout=timeout + 30)
    out = base64.b64decode(res["stdout"]).decode(errors="replace")
    if res["returncode"] != 0:
        err = base64.b64decode(res["stderr"]).decode(errors="replace").strip()
        raise GridvmError(f"{member}: {err.splitlines()[-1] if err else 'failed'} "
                          f"(exit {res['returncode']})")
    return out


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def reclone_script(primary_ip: str, password: str, dbs: list[str]) -> str:
    """Drop the member's data and binary log, and load a consistent copy of the primary's
    databases and accounts with the GTID position it was taken at (nothing of it goes to
    the member's own binary log)."""
    names = " ".join(_q(d) for d in dbs)
    return f"""set -e
mariadb -e 'STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = ON'
for db in $(mariadb -N -e 'SHOW DATABASES' | grep -vxE \
        'mysql|information_schema|performance_schema|sys'); do
    mariadb -e "SET sql_log_bin = 0; DROP DATABASE \\`$db\\`"
done
mariadb -e 'RESET MASTER'
MYSQL_PWD={_q(password)} mariadb-dump -h {_q(primary_ip)} -u {sql.ADMIN} \
    --single-transaction --gtid --master-data=1 --system=users --insert-ignore \
    --routines --events --triggers --databases {names} \
    | mariadb --init-command='SET sql_log_bin = 0'
"""
