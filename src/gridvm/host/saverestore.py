"""xm save and xm restore: a domain's config and memory to a file, and back.

The file is a header (gridvm.host.savefile) followed by QEMU's migration stream. While a
domain is being saved or restored it is `saving` / `restoring` and other verbs are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from gridvm.errors import Conflict, GridvmError, NotFound, QemuError
from gridvm.host import savefile
from gridvm.host.runtime import DomainRuntime
from gridvm.host.vm import Vm
from gridvm.lifecycle import DomainState
from gridvm.store.records import DomainRecord

log = logging.getLogger("gridvm.host")

S = DomainState
MIGRATION_POLL_S = 0.05


class SaveRestore(DomainRuntime):
    """Save a domain to a file (it stops here) and restore one from a file."""

    async def save(self, ref: str, path: Path) -> None:
        """Write config + memory to `path` and stop the domain (xm save)."""
        path = path.absolute()
        if path.exists():
            raise Conflict(f"{path} already exists; refusing to overwrite")
        if not path.parent.is_dir():
            raise NotFound(f"directory {path.parent} does not exist")
        async with self.operation(ref, "save") as vm:
            was_running = vm.rec.state is S.RUNNING
            self.set_state(vm.rec, S.SAVING, f"to {path}")
            try:
                offset = savefile.write_header(path, vm.rec.config)
                await vm.monitor.execute("stop")
                # QEMU writes to a descriptor gridvmd opened (a sandboxed QEMU can neither
                # open the path nor run a shell for an exec: URI).
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    await vm.monitor.send_fd(fd, "gridvm-save")
                finally:
                    os.close(fd)
                await self._migrate_out(vm, "fd:gridvm-save")
            except BaseException:
                path.unlink(missing_ok=True)
                try:
                    if was_running:
                        await vm.monitor.execute("cont")
                finally:
                    await self.settle(vm, "save failed")
                raise
            log.info("%s: saved to %s (stream at %d)", vm.name, path, offset)
            await self._teardown(vm, reason="save")

    async def _migrate_out(self, vm: Vm, uri: str, timeout: float = 600) -> dict[str, Any]:
        await vm.monitor.execute("migrate-set-parameters", {"max-bandwidth": 10 * 1024**3})
        await vm.monitor.execute("migrate", {"uri": uri})
        return await self._await_migration(vm, timeout)

    async def _await_migration(self, vm: Vm, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            info: dict[str, Any] = await vm.monitor.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info.get('error-desc', 'no detail')}")
            await asyncio.sleep(MIGRATION_POLL_S)
        with contextlib.suppress(QemuError):
            await vm.monitor.execute("migrate_cancel")
        raise QemuError(f"migration did not finish within {timeout:.0f}s")

    async def restore(self, path: Path, *, paused: bool = False,
                      read_timeout: float = 30) -> DomainRecord:
        """Start a domain from a save file (xm restore)."""
        try:
            cfg, offset = await asyncio.wait_for(
                asyncio.to_thread(savefile.read_header, path.absolute()), read_timeout)
        except TimeoutError:
            raise GridvmError(f"{path}: could not read the save file within "
                              f"{read_timeout:.0f}s") from None
        async with self._create_lock:
            self._check_new(cfg)
            rec = DomainRecord(config=cfg)
            self.store.put(rec)
        try:
            vm = await self._launch(rec, incoming=S.RESTORING)
            try:
                fd = os.open(path.absolute(), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.lseek(fd, offset, os.SEEK_SET)
                    await vm.monitor.send_fd(fd, "gridvm-restore")
                finally:
                    os.close(fd)
                await vm.monitor.execute("migrate-incoming", {"uri": "fd:gridvm-restore"})
                await self._await_incoming(vm)
                if not paused:
                    await vm.monitor.execute("cont")
                self.set_state(rec, S.PAUSED if paused else S.RUNNING, f"restored from {path}")
            except BaseException:
                await self._teardown(vm, reason="restore-failed")
                raise
        except BaseException:
            self._remove(rec, "restore failed")
            raise
        return rec

    async def _await_incoming(self, vm: Vm, timeout: float = 600) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            status = await vm.status()
            if status in ("paused", "postmigrate", "running"):
                info = await vm.monitor.execute("query-migrate")
                if info.get("status") in ("completed", None):
                    return
                if info.get("status") == "failed":
                    raise QemuError(f"incoming migration failed: {info.get('error-desc')}")
            elif status in ("shutdown", "internal-error"):
                raise QemuError(f"incoming migration failed (QEMU is {status})")
            await asyncio.sleep(MIGRATION_POLL_S)
        raise QemuError(f"incoming migration did not finish within {timeout:.0f}s")

