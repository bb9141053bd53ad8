"""A thin typed wrapper over `qemu.qmp` for one domain's monitor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

from gridvm.errors import QemuError


class Monitor:
    """One QMP connection; events are consumed through scoped listeners only."""

    def __init__(self, name: str, socket: Path) -> None:
        self.socket = socket
        self.client = QMPClient(name)
        # The default listener (which cannot be removed) would keep every event forever.
        self.client.events.event_filter = lambda _event: False

    async def connect(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await asyncio.wait_for(self.client.connect(str(self.socket)), timeout=5)
                return
            except (TimeoutError, OSError, Exception) as exc:  # qemu.qmp wraps OSError
                if loop.time() > deadline:
                    raise QemuError(f"cannot connect to QMP at {self.socket}: {exc}") from exc
                await asyncio.sleep(0.05)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(cmd, args), timeout=timeout)
        except ExecuteError as exc:
            raise QemuError(f"QEMU refused {cmd}: {exc.error.error.desc}") from exc
        except TimeoutError as exc:
            raise QemuError(f"QEMU did not answer {cmd} within {timeout:.0f}s") from exc
        except (EOFError, ConnectionError, Exception) as exc:
            if isinstance(exc, QemuError):
                raise
            raise QemuError(f"QMP {cmd} failed: {type(exc).__name__}: {exc}") from exc

    async def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU descriptor `fd` as `name` (SCM_RIGHTS + getfd): for `fd:NAME`
        migration URIs and dumps, which a confined QEMU could not open by path."""
        with contextlib.suppress(QemuError):
            await self.execute("closefd", {"fdname": name})    # a stale one of that name
        try:
            self.client.send_fd_scm(fd)
        except Exception as exc:
            raise QemuError(f"cannot pass a descriptor to QEMU: {exc}") from exc
        await self.execute("getfd", {"fdname": name})

    async def add_fd(self, fd: int, opaque: str, fdset: int | None = None) -> int:
        """Put `fd` in an fd set of QEMU's (a new one unless `fdset`); return the set's id
        (`/dev/fdset/ID` then opens it)."""
        try:
            self.client.send_fd_scm(fd)
        except Exception as exc:
            raise QemuError(f"cannot pass a descriptor to QEMU: {exc}") from exc
        args: dict[str, Any] = {"opaque": opaque}
        if fdset is not None:
            args["fdset-id"] = fdset
        result = await self.execute("add-fd", args)
        return int(result["fdset-id"])

    @contextlib.asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventListener]:
        listener = EventListener(names or None)
        with self.client.listen(listener):
            yield listener

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.disconnect()


class StreamListener(EventListener):
    """An EventListener that keeps no history (for listeners that live as long as a domain)."""

    async def put(self, event: Any) -> None:
        if self.accept(event):
            await self._queue.put(event)
