"""The host runtime: creates, supervises, re-adopts and tears down this host's domains.

Every step that acquires something (store row, tap, run directory, QEMU process) is undone
if a later step fails, so a failed `create` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from gridvm import __version__
from gridvm.config.macs import assign_macs
from gridvm.config.model import DomainConfig, Sched, VifSpec, check_name
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound, QemuError
from gridvm.host import hostinfo, links, procs, savefile, vnc
from gridvm.host.boot import BootLoader, NoBootLoader, uses_bootloader, with_placeholder_kernel
from gridvm.host.devices import live_taps
from gridvm.host.guest import Guests
from gridvm.host.resources import Resources, validate_sched, vif_index
from gridvm.host.stats import Sampler
from gridvm.host.vm import Vm, qemu_taps, release
from gridvm.images.store import template_of
from gridvm.paths import Home
from gridvm.qemu import accel as accelmod
from gridvm.qemu.argv import build_argv
from gridvm.qemu.qmp import Monitor
from gridvm.store.records import DomainRecord, Store

log = logging.getLogger("gridvm.host")

RESTART_WINDOW_S = 60.0
RESTART_LIMIT = 5
MIGRATION_POLL_S = 0.05


class NetPlug(Protocol):
    """What the network layer does for domains (gridvm.host.networks implements it)."""

    async def bridge_for(self, vif: VifSpec) -> str | None:
        """The Linux bridge a vif's taps join (a gridvm network's bridge, or `vif.bridge`)."""
        ...

    async def domain_started(self, rec: DomainRecord) -> None: ...

    async def domain_stopped(self, rec: DomainRecord) -> None: ...

    async def leases(self, rec: DomainRecord) -> dict[str, str]:
        """MAC -> address of the DHCP leases the domain's vifs hold (NAT networks)."""
        ...


class PlainBridges:
    """Without a network layer: `bridge=` names a Linux bridge, created if missing."""

    async def bridge_for(self, vif: VifSpec) -> str | None:
        return vif.bridge

    async def domain_started(self, rec: DomainRecord) -> None:
        return None

    async def domain_stopped(self, rec: DomainRecord) -> None:
        return None

    async def leases(self, rec: DomainRecord) -> dict[str, str]:
        return {}


class HostManager:
    """All domains of one gridvmd home."""

    def __init__(self, home: Home, store: Store, *, accel: str = "auto") -> None:
        self.home = home
        self.store = store
        self.accel_mode = accel
        self.qemu = hostinfo.qemu_binary()
        self.verdict: accelmod.Verdict | None = None
        self.vms: dict[str, Vm] = {}          # by uuid
        self._create_lock = asyncio.Lock()
        self.net: NetPlug = PlainBridges()
        self.bootloader: BootLoader = NoBootLoader()
        self.res = Resources(home)
        self.stats = Sampler(self)            # usage counters for top, /v1/stats, /metrics
        self.guests = Guests(self)            # guest agent: exec, addresses, fsfreeze

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

    @property
    def accel(self) -> str:
        return self.verdict.accel if self.verdict else "tcg"

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
        self.vms[rec.uuid] = vm
        await self.res.adopt(vm)
        status = await vm.status()
        vm.start_watching(self._on_event)
        log.info("%s: re-adopted domid %s (pid %s, %s)", rec.name, rec.domid, pid, status)
        if status == "running" and rec.state not in ("running", "blocked"):
            rec.state = "running"
            self.store.put(rec)
        elif status == "paused" and rec.state == "running":
            rec.state = "paused"
            self.store.put(rec)
        elif status == "shutdown" and rec.state in ("running", "blocked", "paused"):
            # The guest shut down while no daemon watched: apply its action now.
            await self._on_event(vm, "poweroff")

    async def _forget(self, rec: DomainRecord, rundir: Path) -> None:
        await self.res.release(rec)
        await release(rec.name, rec.taps, rundir, self.home.tag)
        self._retire(rec)

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

    def _retire(self, rec: DomainRecord) -> None:
        """A domain stopped: managed ones stay defined (shutoff), others vanish (as in Xen)."""
        if rec.managed:
            rec.domid, rec.state, rec.started_at, rec.taps = None, "shutoff", None, []
            self.store.put(rec)
        else:
            self.store.delete(rec.uuid)

    # ----- lookups ------------------------------------------------------------------------

    def lookup(self, ref: str) -> DomainRecord:
        """A domain by name, domid or UUID."""
        rec = self.store.by_name(ref)
        if rec is None and ref.isascii() and ref.isdigit():
            rec = next((r for r in self.store.all() if r.domid == int(ref)), None)
        if rec is None:
            with contextlib.suppress(ValueError):
                rec = self.store.get(str(uuidlib.UUID(ref)))
        if rec is None:
            raise NotFound(f"domain {ref!r} does not exist")
        vm = self.vms.get(rec.uuid)
        return vm.rec if vm else rec

    def running(self, ref: str) -> Vm:
        rec = self.lookup(ref)
        vm = self.vms.get(rec.uuid)
        if vm is None:
            raise Conflict(f"domain {rec.name} is not running")
        return vm

    @contextlib.asynccontextmanager
    async def operation(self, ref: str, what: str) -> AsyncIterator[Vm]:
        """Run one state-changing operation on a running domain, refusing during another."""
        vm = self.running(ref)
        if vm.busy:
            raise Conflict(f"domain {vm.name} is busy ({vm.busy}); try again when it is done")
        async with vm.lock:
            yield vm

    # ----- create / start -----------------------------------------------------------------

    def _used_macs(self) -> set[str]:
        return {v.mac for r in self.store.all() for v in r.config.vifs if v.mac}

    async def create(self, cfg: DomainConfig, *, managed: bool = False, start: bool = True,
                     paused: bool = False) -> DomainRecord:
        """Define (and usually start) a domain; on any failure nothing is left behind."""
        async with self._create_lock:
            self._check_new(cfg)
            cfg = assign_macs(cfg, self._used_macs())
            rec = DomainRecord(config=cfg, managed=managed)
            self.store.put(rec)
        if not start:
            return rec
        try:
            await self._launch(rec, paused=paused)
        except BaseException:
            if not managed:
                self.store.delete(rec.uuid)
            raise
        return rec

    def _check_new(self, cfg: DomainConfig) -> None:
        if self.store.by_name(cfg.name) is not None:
            raise Conflict(f"domain name {cfg.name!r} is already in use")
        if self.store.get(cfg.uuid) is not None:
            raise Conflict(f"domain uuid {cfg.uuid} is already in use")

    async def start_domain(self, ref: str, *, paused: bool = False) -> DomainRecord:
        rec = self.lookup(ref)
        if rec.uuid in self.vms:
            raise Conflict(f"domain {rec.name} is already running")
        await self._launch(rec, paused=paused)
        return rec

    def _preflight(self, cfg: DomainConfig) -> None:
        for label, path in (("kernel", cfg.kernel), ("ramdisk", cfg.ramdisk)):
            if path and not Path(path).is_file():
                raise NotFound(f"domain {cfg.name}: {label} {path} does not exist")
        for d in cfg.disks:
            if not Path(d.target).exists():
                raise NotFound(f"domain {cfg.name}: disk {d.vdev} {d.target} does not exist")
            template = template_of(self.home.images, d.target) if d.mode == "w" else None
            if template is not None:
                raise Conflict(f"domain {cfg.name}: disk {d.vdev} is the read-only template "
                               f"{template}; boot a clone (gridvm clone {template} NAME)")
        hostinfo.check_memory(cfg.memory)
        vnc.check_display(cfg)

    async def _launch(self, rec: DomainRecord, *, paused: bool = False,
                      incoming: bool = False) -> Vm:
        """Start QEMU for `rec`; undo every acquired piece if a step fails."""
        cfg = rec.config
        self._preflight(cfg)
        domid = self.store.next_domid()
        rundir = self.home.run / str(domid)
        taps = [v.vifname or f"vif{domid}.{i}" for i, v in enumerate(cfg.vifs)]
        # pygrub domains get their argv once the boot loader has found the kernel (below);
        # built here first, it checks everything else before anything is acquired.
        argv = build_argv(self.qemu, with_placeholder_kernel(cfg), accel=self.accel,
                          rundir=rundir, taps=taps, incoming=incoming)
        # Intent first: a crash from here on is reconciled by the next gridvmd (the planned
        # taps are released by name, and only if they carry this home's tag).
        rec.domid, rec.taps, rec.state, rec.accel = domid, list(taps), "dying", self.accel
        rec.shutdown_reason = None
        self.store.put(rec)
        made: list[str] = []
        pid: int | None = None
        monitor: Monitor | None = None
        try:
            shutil.rmtree(rundir, ignore_errors=True)
            rundir.mkdir(parents=True)
            if uses_bootloader(cfg):   # pygrub: the kernel from its own disk
                booted = await asyncio.to_thread(self.bootloader.boot, cfg, rundir)
                argv = build_argv(self.qemu, booted, accel=self.accel, rundir=rundir,
                                  taps=taps, incoming=incoming)
            if paused and not incoming:
                argv.append("-S")
            for tap, vif in zip(taps, cfg.vifs, strict=True):
                bridge = await self.net.bridge_for(vif)
                await asyncio.to_thread(links.create_tap, tap, bridge, None, self.home.tag)
                made.append(tap)
            try:
                await procs.arun(argv, timeout=30)
            except procs.CommandError as exc:
                raise QemuError(f"QEMU failed to start domain {cfg.name}: {exc}") from exc
            pid = procs.read_pidfile(rundir / "qemu.pid")
            if pid is None:
                raise QemuError(f"QEMU for {cfg.name} wrote no pid file")
            monitor = Monitor(f"gridvmd-{cfg.name}", rundir / "qmp.sock")
            await monitor.connect(timeout=10)
            vm = Vm(rec, pid, rundir, monitor, self.home.tag)
            status = await vm.status()
            await self.res.apply(vm)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.res.release(rec)
            if monitor is not None:
                await monitor.close()
            if pid is not None:
                with contextlib.suppress(Exception):
                    await procs.kill_and_wait(pid, timeout=2)
            await release(cfg.name, made, rundir, self.home.tag)
            rec.domid, rec.taps, rec.state, rec.started_at = None, [], "shutoff", None
            if self.store.get(rec.uuid) is not None:
                self.store.put(rec)
            raise
        rec.state = "running" if status == "running" else "paused"
        rec.started_at = time.time()
        self.store.put(rec)
        self.vms[rec.uuid] = vm
        vm.start_watching(self._on_event)
        await self.net.domain_started(rec)
        log.info("%s: started domid %s pid %s (%s)", cfg.name, domid, pid, self.accel)
        return vm

    # ----- events and on_* actions -------------------------------------------------------

    async def _on_event(self, vm: Vm, kind: str) -> None:
        rec = vm.rec
        if kind == "died":
            log.error("%s: QEMU exited unexpectedly", rec.name)
            vm.expected_exit = True
            await vm.detach()
            await self._teardown(vm, reason="qemu-died")
            if rec.config.actions.on_crash in ("restart", "coredump-restart", "rename-restart"):
                with contextlib.suppress(GridvmError):
                    await self._relaunch(rec)
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
        elif action_kind == "destroy":
            await self._teardown(vm, reason=kind)
        else:  # preserve, or a restart refused by the loop guard
            if kind == "reset":
                await vm.monitor.execute("stop")
            rec.state = "crashed" if kind == "crash" else "shutdown"
            self.store.put(rec)

    def _restart_allowed(self, rec: DomainRecord) -> bool:
        now = time.time()
        rec.restarts = [t for t in rec.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(rec.restarts) > RESTART_LIMIT:
            log.error("%s: restarting too fast (%d in %.0fs); preserving it",
                      rec.name, len(rec.restarts), RESTART_WINDOW_S)
            return False
        return True

    async def _reset(self, vm: Vm, *, already: bool = False) -> None:
        """Restart in the same QEMU: a fresh boot with the same domid and devices."""
        if already:
            self._mark_restarted(vm)
            return
        async with vm.monitor.listen("RESET") as reset:
            await vm.monitor.execute("system_reset")
            # The reset happens asynchronously; `cont` before it is refused.
            await asyncio.wait_for(reset.get(), timeout=10)
        vm.firmware_reset_until = time.monotonic() + 1.5
        await vm.monitor.execute("cont")
        self._mark_restarted(vm)

    def _mark_restarted(self, vm: Vm) -> None:
        vm.rec.state, vm.rec.started_at = "running", time.time()
        self.store.put(vm.rec)
        vm.restarted.set()
        vm.restarted = asyncio.Event()

    async def _rename_restart(self, vm: Vm) -> None:
        """Keep the dead domain (renamed, new UUID) for inspection; start a fresh copy."""
        old = vm.rec
        fresh = DomainRecord(config=old.config.model_copy(), managed=old.managed)
        kept = old.config.model_copy(update={"name": f"{old.name}-{old.domid}",
                                             "uuid": str(uuidlib.uuid4())})
        self.store.delete(old.uuid)
        self.vms.pop(old.uuid, None)
        old.config, old.managed, old.state = kept, False, "crashed"
        self.store.put(old)
        self.vms[old.uuid] = vm
        self.store.put(fresh)
        await self._launch(fresh)

    async def _coredump(self, vm: Vm) -> None:
        dumps = self.home.root / "dumps"
        dumps.mkdir(exist_ok=True)
        path = dumps / f"{vm.name}.{vm.rec.domid}.{int(time.time())}.core"
        try:
            await vm.monitor.execute("dump-guest-memory",
                                     {"paging": False, "protocol": f"file:{path}"}, timeout=120)
            log.info("%s: core dumped to %s", vm.name, path)
        except QemuError as exc:
            log.error("%s: core dump failed: %s", vm.name, exc)

    async def _teardown(self, vm: Vm, *, reason: str) -> None:
        """Stop QEMU, free taps and files, and retire the record."""
        vm.rec.state = "dying"
        self.guests.forget(vm.rec.uuid)
        await vm.stop_process()
        await self.res.release(vm.rec)
        await vm.release_resources()
        self.vms.pop(vm.rec.uuid, None)
        try:
            await self.net.domain_stopped(vm.rec)
        except GridvmError as exc:
            log.warning("%s: network cleanup: %s", vm.name, exc)
        vm.rec.shutdown_reason = reason
        self._retire(vm.rec)
        vm.gone.set()

    async def _relaunch(self, rec: DomainRecord) -> None:
        if not self._restart_allowed(rec):
            return
        fresh = DomainRecord(config=rec.config, managed=rec.managed, restarts=rec.restarts)
        self.store.put(fresh)
        try:
            await self._launch(fresh)
        except GridvmError:
            if not fresh.managed:
                self.store.delete(fresh.uuid)
            raise

    # ----- verbs --------------------------------------------------------------------------

    async def shutdown(self, ref: str, *, wait: bool = False, timeout: float = 120,
                       agent: str = "fallback") -> None:
        """ACPI power button; `agent`: fallback (ask the guest agent if ACPI is ignored for
        a while), only (ask the agent straight away) or never."""
        async with self.operation(ref, "shutdown") as vm:
            if agent == "only":
                await self.guests.shutdown(ref)
            else:
                await vm.monitor.execute("system_powerdown")
                if agent == "fallback":
                    self.guests.fallback_after_acpi(vm, min(30.0, timeout / 2))
        if wait:
            await self._wait(vm.gone, timeout, f"domain {vm.name} did not shut down")

    async def reboot(self, ref: str, *, wait: bool = False, timeout: float = 120) -> None:
        """ACPI power-off, then restart on the way down (libvirt's 'fake reboot')."""
        async with self.operation(ref, "reboot") as vm:
            done = vm.restarted
            vm.pending_reboot = True
            await vm.monitor.execute("system_powerdown")
        if wait:
            await self._wait(done, timeout, f"domain {vm.name} did not reboot")

    async def destroy(self, ref: str) -> None:
        vm = self.running(ref)
        if vm.busy:
            raise Conflict(f"domain {vm.name} is busy ({vm.busy}); try again when it is done")
        async with vm.lock:
            await self._teardown(vm, reason="destroy")

    async def pause(self, ref: str) -> None:
        async with self.operation(ref, "pause") as vm:
            await vm.monitor.execute("stop")
            vm.rec.state = "paused"
            self.store.put(vm.rec)

    async def unpause(self, ref: str) -> None:
        async with self.operation(ref, "unpause") as vm:
            if vm.rec.state in ("shutdown", "crashed"):
                raise Conflict(f"domain {vm.name} is {vm.rec.state}; destroy or reboot it")
            await vm.monitor.execute("cont")
            vm.rec.state = "running"
            self.store.put(vm.rec)

    async def delete(self, ref: str) -> None:
        """Remove a defined domain that is not running."""
        rec = self.lookup(ref)
        if rec.uuid in self.vms:
            raise Conflict(f"domain {rec.name} is running; shut it down or destroy it first")
        self.store.delete(rec.uuid)

    async def rename(self, ref: str, new: str) -> DomainRecord:
        rec = self.lookup(ref)
        try:
            check_name(new)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.store.by_name(new) is not None:
            raise Conflict(f"domain name {new!r} is already in use")
        rec.config = rec.config.model_copy(update={"name": new})
        self.store.put(rec)
        return rec

    async def _wait(self, event: asyncio.Event, timeout: float, message: str) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout)
        except TimeoutError as exc:
            raise GridvmError(f"{message} within {timeout:.0f}s") from exc

    # ----- resource control (xm sched-credit, vcpu-pin, mem-set, ...) --------------------

    async def sched_credit(self, ref: str, weight: int | None, cap: int | None) -> Sched:
        """Change weight and/or cap (live if running; kept for the next start)."""
        validate_sched(weight, cap)
        rec = self.lookup(ref)
        sched = rec.config.sched.model_copy(update={
            k: v for k, v in (("weight", weight), ("cap", cap)) if v is not None})
        vm = self.vms.get(rec.uuid)
        if vm is not None:
            await self.res.set_sched(vm, sched.weight, sched.cap)
        rec.config = rec.config.model_copy(update={"sched": sched})
        self.store.put(rec)
        return sched

    async def vcpu_pin(self, ref: str, vcpu: str, cpus: str) -> None:
        async with self.operation(ref, "vcpu-pin") as vm:
            if vcpu == "all":
                await self.res.pin(vm, None, cpus)
                vm.rec.config = vm.rec.config.model_copy(update={"cpus": cpus})
                vm.rec.vcpu_pins = {}
            elif vcpu.isascii() and vcpu.isdigit():
                await self.res.pin(vm, int(vcpu), cpus)
                vm.rec.vcpu_pins[int(vcpu)] = cpus
            else:
                raise ConfigError(f"invalid vcpu {vcpu!r}: a number or 'all'")
            self.store.put(vm.rec)

    async def vcpu_list(self, ref: str | None) -> list[dict[str, Any]]:
        vms = [self.running(ref)] if ref else list(self.vms.values())
        return [row for vm in vms for row in await self.res.vcpu_list(vm)]

    async def mem_set(self, ref: str, mb: int) -> None:
        """Balloon a running domain to `mb` MiB (at most its maxmem)."""
        async with self.operation(ref, "mem-set") as vm:
            cfg = vm.rec.config
            if not 16 <= mb <= cfg.max_memory:
                raise ConfigError(f"invalid memory {mb} MiB for {cfg.name}: "
                                  f"must be 16..{cfg.max_memory} (its maxmem)")
            await self.res.balloon(vm, mb)
            vm.rec.config = cfg.model_copy(update={"memory": mb})
            self.store.put(vm.rec)

    async def mem_max(self, ref: str, mb: int) -> None:
        """Set the memory ceiling used from the next start."""
        rec = self.lookup(ref)
        if mb < 16:
            raise ConfigError(f"invalid maxmem {mb} MiB: must be at least 16")
        update: dict[str, Any] = {"maxmem": mb}
        if rec.config.memory > mb:
            update["memory"] = mb
        rec.config = rec.config.model_copy(update=update)
        self.store.put(rec)

    async def block_throttle(self, ref: str, vdev: str, limits: dict[str, int]) -> None:
        async with self.operation(ref, "block-throttle") as vm:
            cfg = vm.rec.config
            found = [i for i, d in enumerate(cfg.disks) if d.vdev == vdev]
            if not found:
                raise NotFound(f"domain {cfg.name} has no disk {vdev!r}")
            if any(v < 0 for v in limits.values()):
                raise ConfigError("throttle limits must be 0 (unlimited) or positive")
            await self.res.block_throttle(vm, found[0], limits)
            new = cfg.disks[found[0]].model_copy(update={k: (v or None) for k, v in limits.items()})
            vm.rec.config = cfg.model_copy(update={
                "disks": [new if d.vdev == vdev else d for d in cfg.disks]})
            self.store.put(vm.rec)

    async def network_rate(self, ref: str, vif: str, rate: str | None) -> None:
        async with self.operation(ref, "network-rate") as vm:
            cfg = vm.rec.config
            index = vif_index(cfg, vif)
            await self.res.vif_rate(vm, index, rate)
            vifs = list(cfg.vifs)
            vifs[index] = vifs[index].model_copy(update={"rate": rate})
            vm.rec.config = cfg.model_copy(update={"vifs": vifs})
            self.store.put(vm.rec)

    # ----- save / restore -----------------------------------------------------------------

    async def save(self, ref: str, path: Path) -> None:
        """Write config + memory to `path` and stop the domain (xm save)."""
        path = path.absolute()
        if path.exists():
            raise Conflict(f"{path} already exists; refusing to overwrite")
        if not path.parent.is_dir():
            raise NotFound(f"directory {path.parent} does not exist")
        async with self.operation(ref, "save") as vm:
            vm.busy = "saving"
            try:
                offset = savefile.write_header(path, vm.rec.config)
                was_running = vm.rec.state == "running"
                await vm.monitor.execute("stop")
                try:
                    await self._migrate_out(vm, f"exec:cat >> {_shq(path)}")
                except BaseException:
                    path.unlink(missing_ok=True)
                    if was_running:
                        await vm.monitor.execute("cont")
                    raise
                log.info("%s: saved to %s (stream at %d)", vm.name, path, offset)
            finally:
                vm.busy = None
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
            vm = await self._launch(rec, incoming=True)
            try:
                uri = f"exec:tail -c +{offset + 1} {_shq(path.absolute())}"
                await vm.monitor.execute("migrate-incoming", {"uri": uri})
                await self._await_incoming(vm)
                if not paused:
                    await vm.monitor.execute("cont")
                rec.state = "paused" if paused else "running"
                self.store.put(rec)
            except BaseException:
                await self._teardown(vm, reason="restore-failed")
                raise
        except BaseException:
            self.store.delete(rec.uuid)
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

def _shq(path: Path) -> str:
    return shlex.quote(str(path))
