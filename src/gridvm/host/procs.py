"""The one place gridvm runs external programs and inspects processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from gridvm.errors import GridvmError


class CommandError(GridvmError):
    """An external command failed or timed out."""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run(argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None,
        check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; raise CommandError (with stderr's tail) on failure."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                              cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise CommandError(f"{argv[0]} not found: install it (scripts/setup.sh)") from exc
    if check and proc.returncode != 0:
        err = _tail(proc.stderr.decode(errors="replace") or proc.stdout.decode(errors="replace"))
        raise CommandError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {err}")
    return proc


async def arun(argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None,
               check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """`run` from asyncio code, in a worker thread."""
    return await asyncio.to_thread(run, argv, timeout=timeout, input=input, check=check)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process and all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def kill_and_wait(pid: int, *, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; returns when the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline:
            if not pid_alive(pid):
                return
            await asyncio.sleep(0.02)
    raise CommandError(f"process {pid} did not exit after SIGKILL")
