"""The guest agent client against a real qemu-ga, run on the host on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridvm.qemu.guestagent import AgentError, GuestAgent

# Never let the host's agent freeze the host's filesystems or power it off.
BLOCKED = "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-shutdown,guest-suspend-disk," \
          "guest-suspend-ram,guest-suspend-hybrid,guest-set-time,guest-set-user-password"


@pytest.fixture
def qga(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "qga.sock"
    proc = subprocess.Popen(["qemu-ga", "-m", "unix-listen", "-p", str(sock), "-t",
                             str(tmp_path), "-b", BLOCKED],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-ga did not create its socket"
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_exec_output_exit_codes_and_stdin(qga: Path) -> None:
    async def go() -> None:
        async with GuestAgent(qga, timeout=5) as ga:
            await ga.ping()
            res = await ga.exec(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (res.exitcode, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
            res = await ga.exec(["/usr/bin/tr", "a-z", "A-Z"], input=b"hello\n")
            assert res.stdout == b"HELLO\n" and res.returncode == 0
            res = await ga.exec(["/bin/sh", "-c", "kill -TERM $$"])
            assert res.signal == 15 and res.returncode == 143
            with pytest.raises(AgentError, match="did not finish"):
                await ga.exec(["/bin/sleep", "5"], timeout=0.5)
            with pytest.raises(AgentError, match="refused guest-exec"):
                await ga.exec(["/nonexistent/program"])
            assert (await ga.info())["version"]
            assert await ga.hostname() == socket.gethostname()
            names = {i.name for i in await ga.interfaces()}
            assert "lo" in names
            lo = next(i for i in await ga.interfaces() if i.name == "lo")
            assert "127.0.0.1" in lo.ipv4()
            assert await ga.fsfreeze_status() == "thawed"
            with pytest.raises(AgentError, match="refused"):
                await ga.fsfreeze()  # blocked here: it would freeze the host
    run(go())


def test_a_new_connection_skips_what_an_abandoned_one_left(qga: Path) -> None:
    async def go() -> None:
        r, w = await asyncio.open_unix_connection(str(qga))
        for _ in range(3):  # requests whose replies nobody reads
            w.write(b'{"execute":"guest-info"}\n')
        await w.drain()
        await asyncio.sleep(0.3)
        w.close()
        async with GuestAgent(qga, timeout=5) as ga:
            assert await ga.hostname() == socket.gethostname()
    run(go())


@contextlib.contextmanager
def silent_server(path: Path) -> Iterator[list[socket.socket]]:
    """A Unix socket that accepts and never answers (a guest without an agent); yields the
    accepted connections."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield held
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


def test_no_agent_is_an_error_within_the_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "silent.sock"
    with silent_server(sock) as held:
        started = time.monotonic()
        with pytest.raises(AgentError, match="did not answer"):
            run(GuestAgent(sock, timeout=0.5).connect())
        assert time.monotonic() - started < 3
        # QEMU serves one client at a time: the failed connection must not stay open
        assert len(held) == 1
        held[0].settimeout(2)
        while held[0].recv(4096):
            pass
    with pytest.raises(AgentError, match="no guest agent channel"):
        run(GuestAgent(tmp_path / "missing.sock").connect())
    assert not os.path.exists(tmp_path / "missing.sock")
