"""Health checks: asyncio TCP and HTTP probes, MySQL role checks, and keepalived/HAProxy-style
rise/fall."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from gridvm.lb import mysqlcheck
from gridvm.lb.model import Check


async def probe(check: Check, ip: str, port: int, timeout: float,
                auth: str | None = None) -> str | None:
    """Run one check against ip:port: None if it passed, else why it failed (one line)."""
    try:
        if check.kind == "mysql":
            return await mysqlcheck.probe(check, ip, port, timeout, auth or ":")
        return await asyncio.wait_for(_probe(check, ip, port), timeout)
    except TimeoutError:
        return f"no answer in {timeout:.1f}s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


async def _probe(check: Check, ip: str, port: int) -> str | None:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        if check.kind == "tcp":
            return None
        writer.write(f"GET {check.path} HTTP/1.0\r\nHost: {ip}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").split()
        code = status[1] if len(status) >= 2 else ""
        if code.isascii() and code.isdigit() and 200 <= int(code) < 400:
            return None
        return f"HTTP {status[1]}" if len(status) >= 2 else "no HTTP status line"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Hysteresis:
    """Up after `rise` passes in a row, down after `fall` failures in a row.

    The first result decides at once (a new service routes to what answers right away).
    """

    rise: int
    fall: int
    up: bool | None = None
    passes: int = 0
    failures: int = 0

    def feed(self, ok: bool) -> bool:
        """Record one result; True if the state changed."""
        if ok:
            self.passes, self.failures = self.passes + 1, 0
        else:
            self.passes, self.failures = 0, self.failures + 1
        before = self.up
        if self.up is None:
            self.up = ok
        elif not self.up and self.passes >= self.rise:
            self.up = True
        elif self.up and self.failures >= self.fall:
            self.up = False
        return self.up != before

    def force_down(self) -> bool:
        """The backend is known to be gone (its domain stopped): down now, no hysteresis."""
        before = self.up
        self.up, self.passes, self.failures = False, 0, max(self.failures, self.fall)
        return before is not False
