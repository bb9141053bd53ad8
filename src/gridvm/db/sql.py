"""What gridvm says to a member's MariaDB, from the host side (PyMySQL, blocking: run in
the `POOL` threads): the probe, and the steps of promotion, demotion and repointing.

Every call opens its own short connection with tight timeouts (a member whose host lost
power never answers; a connection must not wait for it) as gridvm's admin account.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pymysql
import pymysql.cursors
from pymysql.constants import CLIENT

from gridvm.db.decide import Observation
from gridvm.errors import GridvmError

POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="db-sql")
ADMIN = "gridvm"
REPL = "repl"
CONNECT_S = 0.7
QUERY_S = 2.0
SYSTEM_DBS = ("mysql", "information_schema", "performance_schema", "sys")


class SqlError(GridvmError):
    """A member's MariaDB refused or did not answer."""


@dataclass(frozen=True)
class Target:
    """One member's server and gridvm's credentials for it."""

    name: str
    ip: str
    password: str
    port: int = 3306


@contextlib.contextmanager
def connect(t: Target, *, timeout: float = QUERY_S) -> Iterator[pymysql.cursors.DictCursor]:
    try:
        conn = pymysql.connect(host=t.ip, port=t.port, user=ADMIN, password=t.password,
                               connect_timeout=CONNECT_S, read_timeout=timeout,
                               write_timeout=timeout, autocommit=True,
                               client_flag=CLIENT.MULTI_STATEMENTS,
                               cursorclass=pymysql.cursors.DictCursor)
    except pymysql.MySQLError as exc:
        raise SqlError(f"{t.name}: {_why(exc)}") from exc
    try:
        with conn.cursor() as cur:
            yield cur
    except pymysql.MySQLError as exc:
        raise SqlError(f"{t.name}: {_why(exc)}") from exc
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _why(exc: Exception) -> str:
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 2:
        return f"{args[1]} ({args[0]})"
    return str(exc) or type(exc).__name__


def probe(t: Target) -> Observation:
    """The member's role-relevant state, or why it does not answer."""
    try:
        with connect(t, timeout=CONNECT_S) as cur:
            cur.execute("SELECT @@global.read_only AS ro, @@global.gtid_current_pos AS cur, "
                        "@@global.gtid_binlog_state AS bst, @@global.gtid_slave_pos AS sp")
            v = cur.fetchone() or {}
            cur.execute("SHOW SLAVE STATUS")
            s = cur.fetchone() or {}
            cur.execute("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_%'")
            st = {r["Variable_name"]: r["Value"] for r in cur.fetchall()}
    except SqlError as exc:
        return Observation(False, error=str(exc).split(": ", 1)[-1])
    lag = s.get("Seconds_Behind_Master")
    return Observation(
        True, read_only=bool(int(v.get("ro") or 0)), current_pos=v.get("cur") or "",
        binlog_state=v.get("bst") or "", slave_pos=v.get("sp") or "",
        io_pos=s.get("Gtid_IO_Pos") or "", master_host=s.get("Master_Host") or None,
        io_running=s.get("Slave_IO_Running") == "Yes",
        sql_running=s.get("Slave_SQL_Running") == "Yes",
        io_state=s.get("Slave_IO_Running") or "",
        lag=float(lag) if lag is not None else None,
        last_error=s.get("Last_IO_Error") or s.get("Last_SQL_Error") or "",
        semisync_on=st.get("Rpl_semi_sync_master_status") == "ON",
        semisync_clients=int(st.get("Rpl_semi_sync_master_clients") or 0),
        semisync_waiting=int(st.get("Rpl_semi_sync_master_wait_sessions") or 0))


def wait_applied(t: Target, timeout: float) -> str:
    """Wait until the member applied everything its IO thread received; its position."""
    with connect(t, timeout=timeout + 2) as cur:
        cur.execute("SHOW SLAVE STATUS")
        s = cur.fetchone() or {}
        pos = s.get("Gtid_IO_Pos") or ""
        if pos:
            cur.execute("SELECT MASTER_GTID_WAIT(%s, %s) AS r", (pos, timeout))
            if int((cur.fetchone() or {}).get("r", -1)) != 0:
                raise SqlError(f"{t.name}: did not apply its relay log ({pos}) in "
                               f"{timeout:g}s")
        cur.execute("SELECT @@global.gtid_current_pos AS p")
        return str((cur.fetchone() or {}).get("p") or "")


def batch(cur: pymysql.cursors.DictCursor, statements: list[str], args: Any = None) -> None:
    """Several statements in one round trip (a TCG guest answers each one slowly)."""
    cur.execute(";\n".join(statements), args)
    while cur.nextset():
        pass


def make_primary(t: Target) -> None:
    """Stop replicating, forget the old primary, wait for a replica's acknowledgement
    before each commit (only a primary does: a replica that did would wait for replicas of
    its own), accept writes."""
    with connect(t, timeout=10) as cur:
        batch(cur, ["STOP SLAVE", "RESET SLAVE ALL",
                    "SET GLOBAL rpl_semi_sync_master_enabled = ON",
                    "SET GLOBAL read_only = OFF"])


def stop_io(t: Target) -> None:
    """Stop receiving (the primary is gone): what was received stays in the relay log."""
    with connect(t, timeout=15) as cur:
        cur.execute("STOP SLAVE IO_THREAD")


def start_io(t: Target) -> None:
    with connect(t, timeout=15) as cur:
        cur.execute("START SLAVE IO_THREAD")


def set_read_only(t: Target, on: bool) -> None:
    with connect(t, timeout=10) as cur:
        cur.execute(f"SET GLOBAL read_only = {'ON' if on else 'OFF'}")


def demote(t: Target) -> str:
    """Read-only, every client connection ended but replication's and gridvm's (clients
    reconnect through the writer VIP, to the new primary); the final binlog position."""
    with connect(t, timeout=10) as cur:
        cur.execute("SET GLOBAL read_only = ON")
        _kill_clients(cur)
        cur.execute("SELECT @@global.gtid_binlog_pos AS p")
        return str((cur.fetchone() or {}).get("p") or "")


def kill_clients(t: Target) -> int:
    with connect(t) as cur:
        return _kill_clients(cur)


def _kill_clients(cur: pymysql.cursors.DictCursor) -> int:
    cur.execute("SELECT id FROM information_schema.processlist WHERE id <> CONNECTION_ID() "
                "AND user NOT IN ('system user', %s, %s, 'event_scheduler') "
                "AND command <> 'Binlog Dump'", (ADMIN, REPL))
    ids = [int(r["id"]) for r in cur.fetchall()]
    for i in ids:
        with contextlib.suppress(pymysql.MySQLError):
            cur.execute(f"KILL CONNECTION {i}")
    return len(ids)


def binlog_pos(t: Target) -> str:
    with connect(t) as cur:
        cur.execute("SELECT @@global.gtid_binlog_pos AS p")
        return str((cur.fetchone() or {}).get("p") or "")


def wait_pos(t: Target, pos: str, timeout: float) -> bool:
    """Has the member applied up to `pos` within `timeout`?"""
    if not pos:
        return True
    with connect(t, timeout=timeout + 2) as cur:
        cur.execute("SELECT MASTER_GTID_WAIT(%s, %s) AS r", (pos, timeout))
        return int((cur.fetchone() or {}).get("r", -1)) == 0


MASTER_INFO_BROKEN = 1201      # "Could not initialize master info structure"


def repoint(t: Target, primary_ip: str, repl_password: str) -> None:
    """Replicate from `primary_ip` from where this member is (its own writes included),
    read-only. Relay logs are not kept (with GTIDs it fetches again from its position):
    after a power loss they can be torn, and then every START SLAVE fails until they are
    gone, so a torn replication state is reset whole and the step done again."""
    steps = ["SET GLOBAL read_only = ON",
             "SET GLOBAL rpl_semi_sync_master_enabled = OFF",
             "STOP SLAVE",
             "RESET SLAVE",
             "SET GLOBAL gtid_slave_pos = @@global.gtid_current_pos",
             "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=3306, MASTER_USER=%s, "
             "MASTER_PASSWORD=%s, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, "
             "MASTER_HEARTBEAT_PERIOD=1",
             "START SLAVE"]
    args = (primary_ip, REPL, repl_password)
    torn = False
    with connect(t, timeout=15) as cur:
        try:
            batch(cur, steps, args)
        except pymysql.MySQLError as exc:
            if not exc.args or exc.args[0] != MASTER_INFO_BROKEN:
                raise
            torn = True
    if torn:                   # a fresh session: the failed batch's results are unread
        with connect(t, timeout=15) as cur:
            cur.execute("RESET SLAVE ALL")
            batch(cur, steps, args)


def user_databases(t: Target) -> list[str]:
    with connect(t) as cur:
        cur.execute("SHOW DATABASES")
        return [str(next(iter(r.values()))) for r in cur.fetchall()
                if next(iter(r.values())) not in SYSTEM_DBS]


def execute(t: Target, statements: list[str], timeout: float = 10) -> None:
    with connect(t, timeout=timeout) as cur:
        for s in statements:
            cur.execute(s)


def execute_args(t: Target, statements: list[tuple[str, Any]], timeout: float = 10) -> None:
    with connect(t, timeout=timeout) as cur:
        for s, args in statements:
            cur.execute(s, args)


def query(t: Target, statement: str, args: Any = None) -> list[dict[str, Any]]:
    with connect(t) as cur:
        cur.execute(statement, args)
        return list(cur.fetchall())
