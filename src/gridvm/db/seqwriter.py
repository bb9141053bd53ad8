"""A client that writes sequence numbers through a VIP (one transaction each) and counts a
number only when its COMMIT returned OK — how the tests, the benchmark and the FermiGrid demo
see a database from an application's side — and the check that every acknowledged number
is there exactly once."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pymysql

from gridvm.host import netns

APP_USER, APP_PASSWORD = "app", "app-secret-1"
TABLE = "CREATE TABLE IF NOT EXISTS seq (id INT AUTO_INCREMENT PRIMARY KEY, n INT NOT NULL)"


def connect(host: str, *, port: int = 3306, timeout: float = 2.0,
            database: str | None = "app") -> pymysql.connections.Connection[Any]:
    return pymysql.connect(host=host, port=port, user=APP_USER, password=APP_PASSWORD,
                           database=database, connect_timeout=timeout, read_timeout=timeout,
                           write_timeout=timeout, autocommit=False)


@dataclass(eq=False)
class Writer(threading.Thread):
    """Inserts 1, 2, 3, … (one transaction each) at host:port from network namespace `ns`.
    A number counts as acknowledged only when its COMMIT returned OK; after any error the
    connection is dropped and the next number is tried (never the same one again)."""

    ns: str
    host: str
    port: int = 3306
    timeout: float = 2.0
    first: int = 1                                                    # the first number
    acked: list[tuple[int, float]] = field(default_factory=list)    # (n, when OK came)
    failed: list[tuple[int, float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def run(self) -> None:
        netns.call_in(self.ns, self._loop)

    def _loop(self) -> None:
        n, conn = self.first - 1, None
        while not self.stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = connect(self.host, port=self.port, timeout=self.timeout)
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO seq (n) VALUES (%s)", (n,))
                conn.commit()
                self.acked.append((n, time.monotonic()))
            except (pymysql.MySQLError, OSError) as exc:
                self.failed.append((n, time.monotonic(), str(exc)[:120]))
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
                time.sleep(0.05)
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()

    def halt(self) -> None:
        self.stop.set()
        self.join(timeout=30)

    def longest_gap(self, since: float = 0.0) -> tuple[float, float]:
        """The longest time between two acknowledged commits (from the last one before
        `since` on) and when it began."""
        before = [t for _, t in self.acked if t < since]
        ts = before[-1:] + [t for _, t in self.acked if t >= since]
        gaps = [(b - a, a) for a, b in zip(ts, ts[1:], strict=False)]
        return max(gaps, default=(0.0, since))


def count_rows(ns: str, host: str, port: int = 3306) -> dict[int, int]:
    """n -> how many rows hold it, read at host:port from namespace `ns`."""
    def read() -> dict[int, int]:
        conn = connect(host, port=port, timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT n, COUNT(*) FROM seq GROUP BY n")
                return {int(a): int(b) for a, b in cur.fetchall()}
        finally:
            conn.close()
    result: dict[int, int] = netns.call_in(ns, read)
    return result


def verify(acked: list[tuple[int, float]], rows: dict[int, int]) -> dict[str, Any]:
    """Every acknowledged number present exactly once? (`lost`, `duplicated` must be [])."""
    nums = [n for n, _ in acked]
    return {"acked": len(nums), "lost": [n for n in nums if rows.get(n, 0) == 0],
            "duplicated": [n for n, c in rows.items() if c > 1],
            "unacked_present": len(set(rows) - set(nums))}


