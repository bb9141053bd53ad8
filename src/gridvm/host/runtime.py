"""The core of the host runtime: this host's domains, their states, launch and teardown.

`DomainRuntime` holds what every part of the host manager shares: the running `Vm`s, the
one method that changes a domain's state (`set_state`, over gridvm.lifecycle), the guard
every verb passes (`operation`), and the two halves of a domain's life on this host:
`_launch` (QEMU up) and `_teardown` (QEMU gone). Every step that acquires something (store
row, tap, run directory, QEMU process) is undone if a later step fails, so a failed start
leaves nothing behind. The mixins built on it (events, verbs, save/restore) and
`HostManager` (gridvm.host.manager) complete it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from gridvm.config.macs import assign_macs
from gridvm.config.model import DomainConfig, VifSpec
from gridvm.errors import Conflict, GridvmError, NotFound, QemuError
from gridvm.host import confine, hostinfo, links, procs, vnc
from gridvm.host.boot import BootLoader, NoBootLoader, uses_bootloader, with_placeholder_kernel
from gridvm.host.guest import Guests
from gridvm.host.resources import Resources
from gridvm.host.vm import Vm, release
from gridvm.images.store import template_of
from gridvm.lifecycle import DomainState, change, removed, require
from gridvm.paths import Home
from gridvm.qemu import accel as accelmod
from gridvm.qemu.argv import build_argv
from gridvm.qemu.qmp import Monitor
from gridvm.store.records import DomainRecord, Store

log = logging.getLogger("gridvm.host")

S = DomainState


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


class DomainRuntime:
    """All domains of one gridvmd home: state, lookups, launch and teardown."""

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
        self.guests = Guests(self)            # guest agent: exec, addresses, fsfreeze

    @property
    def accel(self) -> str:
        return self.verdict.accel if self.verdict else "tcg"

    # ----- state ----------------------------------------------------------------------------

    def set_state(self, rec: DomainRecord, new: DomainState, reason: str, *,
                  persist: bool = True) -> bool:
        """The one way a domain's state changes: checked, persisted, logged."""
        return change(rec, new, reason, (lambda: self.store.put(rec)) if persist else None)

    async def settle(self, vm: Vm, reason: str) -> None:
        """After an operation that owned the domain: running or paused, as QEMU says."""
        try:
            status = await vm.status()
        except QemuError as exc:
            log.warning("%s: %s", vm.name, exc)
            status = "unknown"
        self.set_state(vm.rec, S.RUNNING if status == "running" else S.PAUSED, reason)

    # ----- lookups --------------------------------------------------------------------------

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
    async def operation(self, ref: str, verb: str) -> AsyncIterator[Vm]:
        """Run `verb` (a key of gridvm.lifecycle.VERBS) on a domain with a QEMU, holding its
        lock; refused (Conflict) unless the domain's state is one the verb accepts."""
        rec = self.lookup(ref)
        require(verb, rec.name, rec.state)
        vm = self.running(ref)
        async with vm.lock:
            require(verb, vm.name, vm.rec.state)   # it may have changed while we waited
            if self.vms.get(vm.rec.uuid) is not vm:
                raise Conflict(f"domain {vm.name} is not running")
            yield vm

    # ----- create / launch ------------------------------------------------------------------

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
                vm = self.vms.get(rec.uuid)
                if vm is not None:         # QEMU runs, a later step failed: undo it too
                    await self._teardown(vm, reason="create failed")
                else:
                    self._remove(rec, "create failed")
            raise
        return rec

    def _check_new(self, cfg: DomainConfig) -> None:
        if self.store.by_name(cfg.name) is not None:
            raise Conflict(f"domain name {cfg.name!r} is already in use")
        if self.store.get(cfg.uuid) is not None:
            raise Conflict(f"domain uuid {cfg.uuid} is already in use")

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
                      incoming: DomainState | None = None) -> Vm:
        """Start QEMU for `rec` (shutoff, or dying when restarted in place); undo every
        acquired piece if a step fails. With `incoming` (INCOMING or RESTORING) QEMU waits
        for a migration stream and the domain is left in that state."""
        cfg = rec.config
        self._preflight(cfg)
        domid = self.store.next_domid()
        rundir = self.home.run / str(domid)
        taps = [v.vifname or f"vif{domid}.{i}" for i, v in enumerate(cfg.vifs)]
        # pygrub domains get their argv once the boot loader has found the kernel (below);
        # built here first, it checks everything else before anything is acquired.
        argv = build_argv(self.qemu, with_placeholder_kernel(cfg), accel=self.accel,
                          rundir=rundir, taps=taps, incoming=incoming is not None)
        # Intent first: a crash from here on is reconciled by the next gridvmd (the planned
        # taps are released by name, and only if they carry this home's tag).
        before = (rec.domid, rec.taps, rec.accel, rec.shutdown_reason)
        rec.domid, rec.taps, rec.accel, rec.shutdown_reason = domid, list(taps), self.accel, None
        try:
            self.set_state(rec, S.STARTING, f"domid {domid}")
        except BaseException:
            rec.domid, rec.taps, rec.accel, rec.shutdown_reason = before
            raise
        made: list[str] = []
        pid: int | None = None
        monitor: Monitor | None = None
        owner = f"{self.home.tag} {rec.uuid}"
        uid: int | None = None
        try:
            shutil.rmtree(rundir, ignore_errors=True)
            rundir.mkdir(parents=True)
            booted = cfg
            if uses_bootloader(cfg):   # pygrub: the kernel from its own disk
                booted = await asyncio.to_thread(self.bootloader.boot, cfg, rundir)
                argv = build_argv(self.qemu, booted, accel=self.accel, rundir=rundir,
                                  taps=taps, incoming=incoming is not None)
            if confine.enabled():
                uid = await asyncio.to_thread(confine.claim_uid, owner)
            for tap, vif in zip(taps, cfg.vifs, strict=True):
                bridge = await self.net.bridge_for(vif)
                await asyncio.to_thread(links.create_tap, tap, bridge, None, self.home.tag,
                                        uid)
                made.append(tap)
            monitor = Monitor(f"gridvmd-{cfg.name}", rundir / "qmp.sock")
            if uid is None:
                if paused and incoming is None:
                    argv.append("-S")
                try:
                    await procs.arun(argv, timeout=30)
                except procs.CommandError as exc:
                    raise QemuError(f"QEMU failed to start domain {cfg.name}: {exc}") from exc
                pid = procs.read_pidfile(rundir / "qemu.pid")
                if pid is None:
                    raise QemuError(f"QEMU for {cfg.name} wrote no pid file")
                await monitor.connect(timeout=10)
            else:
                pid, dirfd = await self._spawn_confined(booted, rundir, taps, uid, monitor,
                                                        paused=paused and incoming is None,
                                                        incoming=incoming)
            vm = Vm(rec, pid, rundir, monitor, self.home.tag)
            if uid is not None:
                vm.uid, vm.dirfd = uid, dirfd
            status = await vm.status()
            await self.res.apply(vm)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self.res.release(rec)
            if monitor is not None:
                await monitor.close()
            if pid is not None:
                with contextlib.suppress(Exception):
                    await procs.kill_and_wait(pid, timeout=2)
            await release(cfg.name, made, rundir, self.home.tag)
            confine.release_uid(uid, owner)
            rec.domid, rec.taps, rec.started_at = None, [], None
            self.set_state(rec, S.SHUTOFF, f"launch failed: {type(exc).__name__}",
                           persist=self.store.get(rec.uuid) is not None)
            raise
        rec.started_at = time.time()
        new = incoming or (S.RUNNING if status == "running" else S.PAUSED)
        self.set_state(rec, new, f"started domid {domid}")
        self.vms[rec.uuid] = vm
        vm.start_watching(self._on_event)
        await self.net.domain_started(rec)
        log.info("%s: started domid %s pid %s (%s)", cfg.name, domid, pid, self.accel)
        return vm

    async def _spawn_confined(self, cfg: DomainConfig, rundir: Path, taps: list[str],
                              uid: int, monitor: Monitor, *, paused: bool,
                              incoming: DomainState | None) -> tuple[int, int]:
        """Start QEMU as `uid` with its files as descriptors (gridvm.host.confine) and
        connect `monitor`; return its pid and run-dir descriptor. A QEMU that exits while
        starting is an error with the tail of its output."""
        launch = await asyncio.to_thread(functools.partial(
            confine.prepare, cfg, rundir, uid, self.qemu, lock=incoming is not S.INCOMING))
        try:
            argv = build_argv(self.qemu, cfg, accel=self.accel, rundir=rundir, taps=taps,
                              incoming=incoming is not None, confined=launch.spec)
            if paused:
                argv.append("-S")
            proc = confine.spawn(argv, launch, kvm=self.accel == "kvm")
        finally:
            launch.close()
        connect = asyncio.ensure_future(monitor.connect(timeout=30))
        exited = asyncio.ensure_future(asyncio.to_thread(_wait_exit, proc.pid, 31))
        try:
            done, _ = await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
            if connect in done:
                connect.result()
                (rundir / "qemu.pid").write_text(f"{proc.pid}\n")
                return proc.pid, launch.spec.dirfd
            raise QemuError(f"QEMU failed to start domain {cfg.name}: "
                            f"{confine.log_tail(rundir)}")
        except BaseException:
            with contextlib.suppress(Exception):
                await procs.kill_and_wait(proc.pid, timeout=2)
            raise
        finally:
            for task in (connect, exited):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(connect, exited, return_exceptions=True)

    async def _on_event(self, vm: Vm, kind: str) -> None:
        """What a QEMU's watcher reports (gridvm.host.supervisor implements it)."""
        raise NotImplementedError

    # ----- teardown -------------------------------------------------------------------------

    async def _teardown(self, vm: Vm, *, reason: str, keep: bool = False) -> None:
        """Stop QEMU, free taps and files; retire the record, or with `keep` leave it dying
        for a restart in place (`_launch` again: the record never leaves the store)."""
        rec = vm.rec
        self.set_state(rec, S.DYING, reason)
        self.guests.forget(rec.uuid)
        await vm.stop_process()
        await self.res.release(rec)
        await vm.release_resources()
        confine.release_uid(vm.uid, f"{self.home.tag} {rec.uuid}")
        self.vms.pop(rec.uuid, None)
        try:
            await self.net.domain_stopped(rec)
        except GridvmError as exc:
            log.warning("%s: network cleanup: %s", vm.name, exc)
        if keep:
            rec.domid, rec.taps, rec.started_at, rec.vcpu_pins = None, [], None, {}
            rec.shutdown_reason = reason
        else:
            self._retire(rec, reason)
        vm.gone.set()

    def _retire(self, rec: DomainRecord, reason: str) -> None:
        """A domain stopped for `reason` and this host does not restart it: managed ones
        stay defined (shutoff), others vanish (as in Xen). The store hears the reason (in a
        cluster an HA domain that stopped unexpectedly becomes `lost`, never deleted)."""
        rec.shutdown_reason = reason
        if rec.managed:
            rec.domid, rec.started_at, rec.taps = None, None, []
            if not self.set_state(rec, S.SHUTOFF, reason):
                self.store.put(rec)
        else:
            removed(rec, reason)
            self.store.delete(rec.uuid, reason=reason)

    def _remove(self, rec: DomainRecord, reason: str) -> None:
        """Delete a record that has no QEMU (a failed create or restore, `delete`)."""
        if self.store.get(rec.uuid) is not None:
            removed(rec, reason)
            self.store.delete(rec.uuid)

    async def _forget(self, rec: DomainRecord, rundir: Path) -> None:
        """Re-adoption found the domain's QEMU gone: free what it held and retire it."""
        await self.res.release(rec)
        await release(rec.name, rec.taps, rundir, self.home.tag)
        await asyncio.to_thread(confine.release_owner, f"{self.home.tag} {rec.uuid}")
        # Mid-migration the other host may run it: never have it restarted for that.
        reason = "migration-unknown" if rec.state in (S.MIGRATING, S.INCOMING) else "gone"
        if rec.state is not S.SHUTOFF:
            self.set_state(rec, S.DYING, "its QEMU is gone")
        self._retire(rec, reason)


def _wait_exit(pid: int, timeout: float) -> None:
    """Block until process `pid` is gone (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and procs.pid_alive(pid):
        time.sleep(0.05)
