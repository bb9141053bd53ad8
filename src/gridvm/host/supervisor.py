"""What the host does when a guest or its QEMU stops on its own: the on_* actions.

A guest that powers off, reboots or crashes is handled per its `on_poweroff`, `on_reboot`
and `on_crash` (restart in place, rename-restart, destroy, preserve, coredump-…); a QEMU
that exits is restarted in place when `on_crash` restarts. Restarts are limited to
RESTART_LIMIT within RESTART_WINDOW_S (then the domain is preserved or retired).

When the host does not restart a domain, the store is told why; if another party restarts
it instead (`Store.hands_over`: an HA domain in a cluster, whose registry record then
becomes `lost`), the host keeps no preserved copy of it: a domain never runs on two hosts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid as uuidlib

from gridvm.errors import QemuError
from gridvm.host.runtime import DomainRuntime
from gridvm.host.vm import Vm
from gridvm.lifecycle import BUSY, DomainState
from gridvm.store.records import DomainRecord

log = logging.getLogger("gridvm.host")

S = DomainState
RESTART_WINDOW_S = 60.0
RESTART_LIMIT = 5
RESTARTS = ("restart", "coredump-restart", "rename-restart")


class Supervisor(DomainRuntime):
    """The watcher's handler: QEMU events turned into state changes and on_* actions."""

    async def _on_event(self, vm: Vm, kind: str) -> None:
        rec = vm.rec
        if kind == "stopped":
            if rec.state in (S.RUNNING, S.BLOCKED):
                self.set_state(rec, S.PAUSED, "QEMU stopped the guest")
            return
        if kind == "resumed":
            if rec.state is S.PAUSED:
                self.set_state(rec, S.RUNNING, "QEMU resumed the guest")
            return
        if kind == "died":
            await self._qemu_died(vm)
            return
        if rec.state in BUSY:
            log.warning("%s: guest %s while %s: left to that operation", rec.name, kind,
                        rec.state)
            return
        action = {
            "poweroff": rec.config.actions.on_poweroff,
            "reboot": rec.config.actions.on_reboot,
            "reset": rec.config.actions.on_reboot,
            "crash": rec.config.actions.on_crash,
        }[kind]
        rec.shutdown_reason = kind
        vm.pending_reboot = False
        log.info("%s: %s -> %s", rec.name, kind, action)
        if action.startswith("coredump-"):
            await self._coredump(vm)
        action_kind = action.removeprefix("coredump-")
        if action_kind == "restart" and self._restart_allowed(rec):
            await self._reset(vm, already=kind == "reset")
        elif action_kind == "rename-restart" and self._restart_allowed(rec):
            await self._rename_restart(vm)
        elif action_kind == "destroy" or self.store.hands_over(rec, kind):
            await self._teardown(vm, reason=kind)
        else:  # preserve, or a restart refused by the loop guard
            if kind == "reset":
                await vm.monitor.execute("stop")
            self.set_state(rec, S.CRASHED if kind == "crash" else S.SHUTDOWN, kind)

    async def _qemu_died(self, vm: Vm) -> None:
        """QEMU exited by itself: restart in place per on_crash, else retire the domain."""
        rec = vm.rec
        log.error("%s: QEMU exited unexpectedly", rec.name)
        vm.expected_exit = True
        await vm.detach()
        if rec.config.actions.on_crash not in RESTARTS or not self._restart_allowed(rec):
            await self._teardown(vm, reason="qemu-died")
            return
        await self._teardown(vm, reason="qemu-died", keep=True)
        try:
            await self._launch(rec)
        except Exception as exc:
            log.error("%s: cannot restart it: %s", rec.name, exc)
            if rec.uuid not in self.vms:      # (else it runs: only a later step failed)
                self._retire(rec, "qemu-died")

    def _restart_allowed(self, rec: DomainRecord) -> bool:
        now = time.time()
        rec.restarts = [t for t in rec.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(rec.restarts) > RESTART_LIMIT:
            log.error("%s: restarting too fast (%d in %.0fs); not restarting it",
                      rec.name, len(rec.restarts), RESTART_WINDOW_S)
            return False
        return True

    async def _reset(self, vm: Vm, *, already: bool = False) -> None:
        """Restart in the same QEMU: a fresh boot with the same domid and devices."""
        if not already:
            async with vm.monitor.listen("RESET") as reset:
                await vm.monitor.execute("system_reset")
                # The reset happens asynchronously; `cont` before it is refused.
                await asyncio.wait_for(reset.get(), timeout=10)
            vm.firmware_reset_until = time.monotonic() + 1.5
            await vm.monitor.execute("cont")
        vm.rec.started_at = time.time()
        if not self.set_state(vm.rec, S.RUNNING, "restarted"):
            self.store.put(vm.rec)
        vm.restarted.set()
        vm.restarted = asyncio.Event()

    async def _rename_restart(self, vm: Vm) -> None:
        """Keep the dead domain (renamed, new UUID) for inspection; start a fresh copy."""
        old = vm.rec
        fresh = DomainRecord(config=old.config.model_copy(), managed=old.managed)
        kept = old.config.model_copy(update={"name": f"{old.name}-{old.domid}",
                                             "uuid": str(uuidlib.uuid4())})
        self.store.delete(old.uuid)        # its name and UUID go to the fresh copy
        self.vms.pop(old.uuid, None)
        old.config, old.managed = kept, False
        self.set_state(old, S.CRASHED, "rename-restart")   # stored under its new UUID
        self.vms[old.uuid] = vm
        self.store.put(fresh)
        await self._launch(fresh)

    async def _coredump(self, vm: Vm) -> None:
        dumps = self.home.root / "dumps"
        dumps.mkdir(exist_ok=True)
        path = dumps / f"{vm.name}.{vm.rec.domid}.{int(time.time())}.core"
        try:
            # Into a descriptor gridvmd opened: a confined QEMU cannot open the path.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                await vm.monitor.send_fd(fd, "gridvm-core")
            finally:
                os.close(fd)
            await vm.monitor.execute("dump-guest-memory",
                                     {"paging": False, "protocol": "fd:gridvm-core"},
                                     timeout=120)
            log.info("%s: core dumped to %s", vm.name, path)
        except (QemuError, OSError) as exc:
            log.error("%s: core dump failed: %s", vm.name, exc)

