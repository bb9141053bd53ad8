"""The host runtime: creates, supervises, re-adopts and tears down this host's domains.

`HostManager` puts the parts together: the core (gridvm.host.runtime: states, lookups,
launch, teardown), the on_* actions (gridvm.host.supervisor), the user verbs
(gridvm.host.verbs) and save/restore (gridvm.host.saverestore). This module adds what only
the whole manager does: starting up (accelerator, re-adopting every QEMU that still runs),
closing, and the views of domains and of the host.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gridvm import __version__
from gridvm.errors import GridvmError, QemuError
from gridvm.host import confine, hostinfo, links, procs
from gridvm.host.devices import live_taps
from gridvm.host.runtime import NetPlug, PlainBridges, log
from gridvm.host.saverestore import SaveRestore
from gridvm.host.stats import Sampler
from gridvm.host.supervisor import RESTART_LIMIT, RESTART_WINDOW_S, Supervisor
from gridvm.host.verbs import Verbs
from gridvm.host.vm import Vm, qemu_taps
from gridvm.lifecycle import BUSY, LIVE, DomainState
from gridvm.paths import Home
from gridvm.qemu import accel as accelmod
from gridvm.qemu.confine import rundir_fd
from gridvm.qemu.qmp import Monitor
from gridvm.store.records import DomainRecord, Store

__all__ = ["RESTART_LIMIT", "RESTART_WINDOW_S", "HostManager", "NetPlug", "PlainBridges"]

S = DomainState


class HostManager(Supervisor, Verbs, SaveRestore):
    """All domains of one gridvmd home."""

    def __init__(self, home: Home, store: Store, *, accel: str = "auto") -> None:
        super().__init__(home, store, accel=accel)
        self.stats = Sampler(self)            # usage counters for top, /v1/stats, /metrics

    # ----- lifecycle of the manager ---------------------------------------------------------

    async def start(self) -> None:
        """Pick the accelerator and re-adopt every QEMU that still runs."""
        self.home.ensure()
        self.verdict = await asyncio.to_thread(self._choose_accel)
        log.info("accelerator %s: %s", self.verdict.accel, self.verdict.reason)
        for rec in self.store.all():
            if rec.domid is not None:
                await self._adopt(rec)
        await self._sweep_taps()
        await self.res.reconcile({vm.rec.domid for vm in self.vms.values()
                                  if vm.rec.domid is not None})
        self.stats.start()

    async def close(self) -> None:
        """Stop watching; guests keep running (the next gridvmd re-adopts them)."""
        await self.stats.close()
        await self.guests.close()
        for vm in list(self.vms.values()):
            await vm.detach()
        self.vms.clear()

    def _choose_accel(self) -> accelmod.Verdict:
        kernel = ramdisk = None
        try:
            from gridvm.images.store import get_image

            img = get_image(self.home.images, "tiny")
            kernel, ramdisk = img.kernel, img.ramdisk
        except (GridvmError, ImportError):
            pass
        return accelmod.choose(self.accel_mode, self.qemu, kernel, ramdisk)

    async def _adopt(self, rec: DomainRecord) -> None:
        assert rec.domid is not None
        rundir = self.home.run / str(rec.domid)
        pid = procs.read_pidfile(rundir / "qemu.pid")
        alive = pid is not None and procs.pid_alive(pid) and any(
            str(rundir) in arg for arg in procs.cmdline(pid)
        )
        if not alive or pid is None:
            log.warning("%s: QEMU (domid %s) is gone; cleaning up", rec.name, rec.domid)
            await self._forget(rec, rundir)
            return
        monitor = Monitor(f"gridvmd-{rec.name}", rundir / "qmp.sock")
        try:
            await monitor.connect(timeout=5)
        except QemuError as exc:
            log.error("%s: cannot re-adopt: %s", rec.name, exc)
            return
        rec.taps = await live_taps(monitor, rec.config, qemu_taps(procs.cmdline(pid)))
        vm = Vm(rec, pid, rundir, monitor, self.home.tag)
        uid = confine.process_uid(pid)
        if uid in confine.uid_range():
            vm.uid, vm.dirfd = uid, rundir_fd(procs.cmdline(pid))
        self.vms[rec.uuid] = vm
        await self.res.adopt(vm)
        status = await vm.status()
        vm.start_watching(self._on_event)
        log.info("%s: re-adopted domid %s (pid %s, %s)", rec.name, rec.domid, pid, status)
        await self._readopted(vm, status)

    async def _readopted(self, vm: Vm, status: str) -> None:
        """The state of a re-adopted domain from its QEMU's status (the truth). A migration
        it was receiving is left to the migrations' reconcile; any other operation that a
        previous gridvmd left half-way (launch, teardown, save, migration) ended with it."""
        rec, state = vm.rec, vm.rec.state
        if state is S.INCOMING:
            return
        if state in BUSY:
            self.set_state(rec, S.RUNNING if status == "running" else S.PAUSED, "re-adopted")
        elif status == "running" and state is S.PAUSED:
            self.set_state(rec, S.RUNNING, "re-adopted")
        elif status == "paused" and state is S.RUNNING:
            self.set_state(rec, S.PAUSED, "re-adopted")
        if status == "shutdown" and rec.state in LIVE:
            # The guest shut down while no daemon watched: apply its action now.
            await self._on_event(vm, "poweroff")

    async def _sweep_taps(self) -> None:
        """Remove taps this home made that no adopted QEMU uses (a gridvmd killed while it
        was making them, before the record named them)."""
        used = {tap for vm in self.vms.values() for tap in vm.rec.taps}
        for tap in await asyncio.to_thread(links.tagged_links, self.home.tag):
            if tap not in used:
                log.warning("removing tap %s: no domain of this host uses it", tap)
                try:
                    await asyncio.to_thread(links.delete_link, tap, self.home.tag)
                except links.LinkError as exc:
                    log.warning("%s", exc)

    # ----- views --------------------------------------------------------------------------

    async def live_view(self, rec: DomainRecord) -> dict[str, Any]:
        """`view` plus what only the running domain knows: the balloon's actual size, and
        the guest's addresses (its agent, else its DHCP leases)."""
        data = self.view(rec)
        vm = self.vms.get(rec.uuid)
        if vm is not None:
            actual = await self.res.current_memory(vm)
            if actual is not None:
                data["memory"] = actual
            await self.guests.annotate(data, vm, lambda: self.net.leases(rec))
        return data

    def view(self, rec: DomainRecord) -> dict[str, Any]:
        vm = self.vms.get(rec.uuid)
        now = time.time()
        cfg = rec.config
        return {
            "name": rec.name,
            "uuid": rec.uuid,
            "domid": rec.domid,
            "state": rec.state,
            "type": cfg.type,
            "memory": cfg.memory,
            "maxmem": cfg.max_memory,
            "vcpus": cfg.vcpus,
            "cpu_time": round(procs.cpu_seconds(vm.pid), 1) if vm else 0.0,
            "uptime": round(now - rec.started_at, 1) if rec.started_at and vm else None,
            "managed": rec.managed,
            "accel": rec.accel if vm else None,
            "pid": vm.pid if vm else None,
            "vifs": [
                {"mac": v.mac, "bridge": v.bridge, "ip": v.ip or cfg.net.ip,
                 "tap": rec.taps[i] if i < len(rec.taps) else None}
                for i, v in enumerate(cfg.vifs)
            ],
            "disks": [d.model_dump() for d in cfg.disks],
            "shutdown_reason": rec.shutdown_reason,
            "config": cfg.public(),
        }

    def info(self) -> dict[str, Any]:
        mem = hostinfo.meminfo_mb()
        verdict = self.verdict
        return {
            "version": __version__,
            "home": str(self.home.root),
            "qemu": self.qemu,
            "accel": verdict.accel if verdict else None,
            "accel_reason": verdict.reason if verdict else None,
            "nr_cpus": hostinfo.ncpus(),
            "total_memory": mem.get("MemTotal", 0),
            "free_memory": mem.get("MemAvailable", 0),
            "domains": len(self.store.all()),
            "running": len(self.vms),
        }
