"""The MySQL-aware health check: log in, and find the server in the role a service wants.

A `primary` must accept writes (`read_only` off, not replicating from anyone); a `replica`
must be read-only with both replication threads running and lag at most `max_lag` seconds.
PyMySQL is blocking: probes run in a small pool of their own (never the event loop's
default executor, which the daemon's etcd calls need), bounded by the check's timeout.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pymysql
import pymysql.cursors

from gridvm.lb.model import Check

POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lb-mysql")


def _check(check: Check, ip: str, port: int, timeout: float, auth: str) -> str | None:
    user, _, password = auth.partition(":")
    try:
        conn = pymysql.connect(host=ip, port=port, user=user, password=password,
                               connect_timeout=timeout, read_timeout=timeout,
                               cursorclass=pymysql.cursors.DictCursor)
    except pymysql.MySQLError as exc:
        return _why(exc)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@global.read_only AS ro")
            ro = bool(int((cur.fetchone() or {}).get("ro") or 0))
            cur.execute("SHOW SLAVE STATUS")
            s = cur.fetchone() or {}
    except pymysql.MySQLError as exc:
        return _why(exc)
    finally:
        conn.close()
    running = s.get("Slave_IO_Running") == "Yes" and s.get("Slave_SQL_Running") == "Yes"
    if check.role == "primary":
        if ro:
            return "read-only: not the primary"
        return "replicates from another server: not the primary" if running else None
    if not ro:
        return "writable: not a replica"
    if not s:
        return "not replicating"
    if not running:
        return (f"replication stopped (IO {s.get('Slave_IO_Running')}, SQL "
                f"{s.get('Slave_SQL_Running')})")
    lag = s.get("Seconds_Behind_Master")
    if lag is None or float(lag) > check.max_lag:
        return f"lags {lag}s (at most {check.max_lag:g}s)"
    return None


def _why(exc: Exception) -> str:
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    return str(args[1]) if len(args) >= 2 else (str(exc) or type(exc).__name__)


async def probe(check: Check, ip: str, port: int, timeout: float, auth: str) -> str | None:
    """None if the server is in the check's role, else why not (one line)."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(
            loop.run_in_executor(POOL, _check, check, ip, port, timeout, auth), timeout + 1)
    except TimeoutError:
        return f"no answer in {timeout:.1f}s"
