"""The one place gridvm runs external programs and inspects processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gridvm.errors import GridvmError


class CommandError(GridvmError):
    """An external command failed or timed out."""


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run(argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None,
        check: bool = True, cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; raise CommandError (with stderr's tail) on failure.

    `env` adds to (or overrides) this process's environment.
    """
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                              cwd=cwd, check=False, env=full_env)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise CommandError(f"{argv[0]} not found: install it (scripts/setup.sh)") from exc
    if check and proc.returncode != 0:
        err = _tail(proc.stderr.decode(errors="replace") or proc.stdout.decode(errors="replace"))
        raise CommandError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {err}")
    return proc


def stream(argv: Sequence[str], on_line: Callable[[str], None], *, timeout: float = 600,
           env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
    """Run a long command, handing each output line (stdout and stderr) to `on_line`.

    Raises CommandError with the output's tail on failure or after `timeout` seconds (the
    command's whole process group is killed then).
    """
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=True)
    except FileNotFoundError as exc:
        raise CommandError(f"{argv[0]} not found: install it (scripts/setup.sh)") from exc
    assert proc.stdout is not None
    tail: list[str] = []
    timer = threading.Timer(timeout, lambda: _kill_group(proc.pid))
    timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail = [*tail[-19:], line]
            on_line(line)
        code = proc.wait()
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        timer.cancel()
        proc.stdout.close()
    if code != 0:
        if code == -signal.SIGKILL:
            raise CommandError(f"{Path(argv[0]).name} killed (timeout {timeout:.0f}s?): "
                               + _tail("\n".join(tail)))
        errors = [t for t in tail if t.startswith(("E:", "Error", "error"))] or tail
        raise CommandError(f"{Path(argv[0]).name} failed (exit {code}): "
                           + _tail("\n".join(errors)))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


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
