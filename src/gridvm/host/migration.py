"""Live migration between hosts (xm migrate): the source and the destination halves.

Source (`Migrations.start`): the destination's gridvmd prepares the domain (`Peer.prepare`);
with --copy-storage the disks are mirrored into its NBD server until they are in sync; then
QEMU migrates with `events`, `return-path` (the destination acknowledges that it loaded the
state) and `validate-uuid`. QEMU's own final status decides the outcome: `completed` means the
destination runs the domain and the source retires its copy; anything else leaves the domain
running on the source (resumed if it was paused for the copy) and the destination removes
everything it made.

Destination (`Migrations.prepare`): validates, creates the disk images to mirror into, starts
QEMU with `-incoming defer` (without -S: the guest runs there the moment its state is loaded),
then announces it on the LAN. It never removes a domain whose incoming migration completed.

Both halves are journalled in the store, so a gridvmd restarted mid-migration settles it.
The domain is `migrating` on the source and `incoming` on the destination meanwhile (other
verbs are refused); the source's phases and the destination's states are explicit types with
transition tables (gridvm.host.migration_model). The source's half is gridvm.host.migration_out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid as uuidlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict, GridvmError, NotFound, PeerUnreachable, QemuError
from gridvm.host import hostinfo, links, procs, snapshots
from gridvm.host.manager import HostManager
from gridvm.host.migration_model import (
    HOLD_ENV,
    JOURNAL_IN,
    JOURNAL_OUT,
    KEEP,
    POLL_S,
    PROGRESS_S,
    RELOCATION_PORT,
    SETTLE_S,
    Abort,
    DiskCopy,
    Incoming,
    IncomingState,
    IncomingView,
    Job,
    MigrateOptions,
    Peer,
    PrepareAnswer,
    PrepareRequest,
    caps_arg,
    hostport,
    one_line,
)
from gridvm.host.migration_out import Outgoing
from gridvm.host.vm import Vm
from gridvm.lifecycle import DomainState
from gridvm.qemu.argv import drive_id
from gridvm.store.records import DomainRecord

__all__ = ["HOLD_ENV", "RELOCATION_PORT", "DiskCopy", "IncomingView", "MigrateOptions",
           "Migrations", "Peer", "PeerUnreachable", "PrepareAnswer", "PrepareRequest"]

log = logging.getLogger("gridvm.migration")

S = DomainState


class Migrations:
    """Migrations into and out of this host."""

    def __init__(self, manager: HostManager, connect: Callable[[str], Peer]) -> None:
        self.m = manager
        self.connect = connect
        self.jobs: dict[str, Job] = {}
        self.incoming: dict[str, Incoming] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def identity(self) -> str:
        return f"{socket.gethostname()}:{self.m.home.root}"

    @property
    def storage_dir(self) -> Path:
        """This host's local disk storage: disks under it move with --copy-storage."""
        return self.m.home.root / "disks"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- journal -----------------------------------------------------------------------

    def _journal(self, key: str) -> dict[str, dict[str, Any]]:
        raw = self.m.store.get_meta(key)
        data: dict[str, dict[str, Any]] = json.loads(raw) if raw else {}
        return data

    def note(self, key: str, mid: str, entry: dict[str, Any] | None) -> None:
        data = self._journal(key)
        if entry is None:
            data.pop(mid, None)
        else:
            data[mid] = entry
        self.m.store.set_meta(key, json.dumps(data))

    # ----- source ------------------------------------------------------------------------

    async def start(self, ref: str, target: str, opts: MigrateOptions) -> Job:
        """Begin migrating `ref` to the gridvmd at `target` (ADDR:PORT); follow it by `job`."""
        async with self.m.operation(ref, "migrate") as vm:
            if opts.copy_storage and snapshots.count(vm.rec.config, self.m.home.root):
                raise Conflict(f"domain {vm.name} has snapshots, which --copy-storage would "
                               "lose (it copies only the disks' current state)")
            job = Job(uuidlib.uuid4().hex[:12], vm.name, vm.rec.uuid, target, opts)
            self.m.set_state(vm.rec, S.MIGRATING, f"to {target}, migration {job.id}")
            vm.expected_exit = True    # a QEMU exit is judged by the migration, not on_crash
        self._keep(self.jobs, job.id, job)
        self._spawn(Outgoing(self, job, vm).run(), f"migrate-{vm.name}")
        return job

    def job(self, mid: str) -> Job:
        job = self.jobs.get(mid)
        if job is None:
            raise NotFound(f"no migration {mid!r} on this host")
        return job

    def cancel(self, ref: str) -> Job:
        """Ask the running migration of `ref` to stop; the domain stays on this host."""
        rec = self.m.lookup(ref)
        for job in reversed(self.jobs.values()):
            if job.uuid == rec.uuid and not job.done.is_set():
                job.cancel_reason = "cancelled"
                return job
        raise Conflict(f"domain {rec.name} is not being migrated")

    @staticmethod
    def _keep(table: dict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        for old in list(table)[:-KEEP]:
            if table[old].done.is_set():
                del table[old]

    # ----- destination -------------------------------------------------------------------

    async def prepare(self, req: PrepareRequest, address: str) -> PrepareAnswer:
        """Validate, create the disks, start QEMU listening for the stream on `address`."""
        m = self.m
        if req.source == self.identity:
            raise Conflict(f"domain {req.config.name} already runs on this host")
        if req.id in self.incoming:
            raise Conflict(f"migration {req.id} is already being received")
        cfg, targets = self._retarget(req)
        hostinfo.check_memory(cfg.memory)
        await self._check_networks(cfg)
        async with m._create_lock:
            m._check_new(cfg)
            # Unmanaged until it has arrived: a crash meanwhile leaves no definition behind.
            rec = DomainRecord(config=cfg, managed=False, restarts=req.restarts,
                               vcpu_pins=req.vcpu_pins)
            m.store.put(rec)
        inc = Incoming(req.id, cfg.uuid, cfg.name, req.source, req.managed,
                       req.resume, req.started_at, time.time() + req.timeout + 60)
        self._keep(self.incoming, inc.id, inc)
        self.note(JOURNAL_IN, inc.id, inc.journal())
        vm: Vm | None = None
        try:
            for copy in req.copies:
                path = targets[copy.vdev]
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                await procs.arun(["qemu-img", "create", "-q", "-f", copy.format, path,
                                  str(copy.size)], timeout=60)
                inc.created.append(path)
                self.note(JOURNAL_IN, inc.id, inc.journal())
            vm = await m._launch(rec, incoming=S.INCOMING)
            vm.expected_exit = True
            inc.domid = rec.domid
            await vm.monitor.execute("migrate-set-capabilities", caps_arg(req.capabilities))
            nbd = await self._export(vm, inc, req, address)
            await vm.monitor.execute("migrate-incoming", {"uri": f"tcp:{hostport(address, 0)}"})
            sockets = (await vm.monitor.execute("query-migrate")).get("socket-address", [])
            if not sockets:
                raise QemuError("QEMU reported no address for the incoming migration")
            port = sockets[0]["port"]
        except BaseException as exc:
            inc.error = one_line(exc)
            await self._discard(inc, vm, rec)
            raise
        log.info("%s: waiting for migration %s from %s (domid %s, port %s)", cfg.name, inc.id,
                 req.source, rec.domid, port)
        self._spawn(self._await_incoming(inc, vm), f"incoming-{cfg.name}")
        assert rec.domid is not None
        return PrepareAnswer(id=inc.id, uri=f"tcp:{hostport(address, port)}", domid=rec.domid,
                             nbd=nbd, targets=targets)

    def _retarget(self, req: PrepareRequest) -> tuple[DomainConfig, dict[str, str]]:
        """The config with this host's disk paths; refuse disks that cannot be placed."""
        cfg = req.config
        copies = {c.vdev: c for c in req.copies}
        targets: dict[str, str] = {}
        disks = []
        for d in cfg.disks:
            copy = copies.get(d.vdev)
            if copy is None:
                if not Path(d.target).exists():
                    raise NotFound(f"disk {d.vdev}: {d.target} does not exist on this host "
                                   "(without --copy-storage disks must be on shared storage)")
                disks.append(d)
                continue
            path = str(self.storage_dir / copy.local) if copy.local else copy.path
            if os.path.lexists(path):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == tuple(copy.ident):
                    raise Conflict(f"disk {d.vdev}: {path} is the same file on both hosts "
                                   "(shared storage); migrate without --copy-storage")
                raise Conflict(f"disk {d.vdev}: {path} already exists on this host; "
                               "refusing to overwrite it")
            if not copy.local and not Path(path).parent.is_dir():
                raise NotFound(f"disk {d.vdev}: directory {Path(path).parent} does not exist "
                               "on this host")
            targets[d.vdev] = path
            disks.append(d.model_copy(update={"target": path}))
        return cfg.model_copy(update={"disks": disks}), targets

    async def _check_networks(self, cfg: DomainConfig) -> None:
        for i, vif in enumerate(cfg.vifs):
            bridge = await self.m.net.bridge_for(vif)
            if bridge and not await asyncio.to_thread(links.link_exists, bridge):
                raise NotFound(f"vif {i}: bridge {bridge} does not exist on this host")

    async def _export(self, vm: Vm, inc: Incoming, req: PrepareRequest,
                      address: str) -> dict[str, str]:
        """Serve the new images over NBD for the source's drive-mirror."""
        if not req.copies:
            return {}
        mon = vm.monitor
        port = 0
        for attempt in range(5):
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
                s.bind((address, 0))
                port = s.getsockname()[1]
            try:
                await mon.execute("nbd-server-start", {"addr": {
                    "type": "inet", "data": {"host": address, "port": str(port)}}})
                break
            except QemuError:
                if attempt == 4:
                    raise
        inc.nbd = True
        self.note(JOURNAL_IN, inc.id, inc.journal())
        nodes = {b["device"]: b["inserted"]["node-name"]
                 for b in await mon.execute("query-block") if "inserted" in b}
        uris = {}
        for copy in req.copies:
            drive = drive_id(copy.vdev)
            await mon.execute("block-export-add", {"type": "nbd", "id": drive,
                                                   "node-name": nodes[drive],
                                                   "writable": True, "name": drive})
            uris[drive] = f"nbd://{hostport(address, port)}/{drive}"
        return uris

    async def _await_incoming(self, inc: Incoming, vm: Vm) -> None:
        try:
            await self._receive(inc, vm)
        except Exception as exc:
            inc.error = one_line(exc)
            log.warning("%s: incoming migration %s failed: %s", inc.name, inc.id, inc.error)
            await self._discard(inc, vm, vm.rec)
        else:
            await self._arrived(inc, vm)
        finally:
            inc.done.set()

    async def _receive(self, inc: Incoming, vm: Vm) -> None:
        """Return once QEMU has loaded the whole state; raise if it cannot any more."""
        mon = vm.monitor
        async with mon.listen("MIGRATION") as events:
            while True:
                try:
                    info = await mon.execute("query-migrate", timeout=10)
                except QemuError as exc:
                    if not procs.pid_alive(vm.pid):
                        raise QemuError("QEMU exited during the incoming migration") from None
                    # Never give up on a live QEMU without knowing it has not arrived.
                    log.warning("%s: incoming migration: %s", inc.name, exc)
                    await asyncio.sleep(POLL_S)
                    continue
                status = info.get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise QemuError(f"incoming migration {status}: "
                                    f"{info.get('error-desc', 'no detail')}")
                if inc.abort.is_set():
                    raise Abort("aborted by the source")
                if time.time() > inc.deadline:
                    raise Abort("the source did not complete the migration in time")
                with contextlib.suppress(TimeoutError):   # QMP here shares the stream's loop
                    await asyncio.wait_for(events.get(), PROGRESS_S)

    async def _arrived(self, inc: Incoming, vm: Vm) -> None:
        """The domain runs here now: resume it if asked, announce it, record it."""
        mon = vm.monitor
        try:
            if inc.resume and await vm.status() == "paused":
                await mon.execute("cont")
            await mon.execute("announce-self", {"initial": 0, "max": 500, "rounds": 5,
                                                "step": 100})
            if inc.nbd:
                await mon.execute("nbd-server-stop")
        except QemuError as exc:
            log.warning("%s: after the switch: %s", inc.name, exc)
        rec = vm.rec
        rec.managed = inc.managed
        rec.started_at = inc.started_at or rec.started_at
        await self.m.settle(vm, f"arrived from {inc.source}")
        self.m.store.arrived(rec)   # e.g. the cluster's registry: this host runs it now
        vm.expected_exit = False
        inc.set_state(IncomingState.RUNNING if rec.state is S.RUNNING else IncomingState.PAUSED,
                      "arrived")
        self.note(JOURNAL_IN, inc.id, None)
        log.info("%s: arrived from %s as domid %s (%s)", inc.name, inc.source, rec.domid,
                 rec.state)
        if not procs.pid_alive(vm.pid):
            await self.m._on_event(vm, "died")

    async def _discard(self, inc: Incoming, vm: Vm | None, rec: DomainRecord | None) -> None:
        """Remove all an incoming migration made: QEMU, taps, record, disk images."""
        m = self.m
        inc.set_state(IncomingState.FAILED, inc.error or "failed")
        try:
            if vm is not None and m.vms.get(vm.rec.uuid) is vm:
                vm.rec.managed = False
                await m._teardown(vm, reason="migration-failed")
            elif rec is not None and rec.uuid not in m.vms and m.store.get(rec.uuid) is not None:
                m.store.delete(rec.uuid)
        finally:
            for path in inc.created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self.note(JOURNAL_IN, inc.id, None)

    def incoming_view(self, mid: str) -> IncomingView:
        inc = self.incoming.get(mid)
        if inc is None:
            raise NotFound(f"no incoming migration {mid!r} on this host")
        return inc.view()

    async def abort(self, mid: str) -> IncomingView:
        """The source gave up: remove the half-made domain (unless it already arrived)."""
        inc = self.incoming.get(mid)
        if inc is None:
            raise NotFound(f"no incoming migration {mid!r} on this host")
        inc.abort.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inc.done.wait(), timeout=SETTLE_S)
        return inc.view()

    # ----- restart and shutdown ----------------------------------------------------------

    async def reconcile(self) -> None:
        """Settle migrations a previous gridvmd left half-way (after domains are re-adopted)."""
        incoming = self._journal(JOURNAL_IN)
        for entry in incoming.values():
            vm = self.m.vms.get(entry["uuid"])
            if vm is not None:      # before its watcher could apply on_crash to it
                vm.expected_exit = True
        for mid, entry in incoming.items():
            await self._resume_incoming(mid, entry)
        for mid, entry in self._journal(JOURNAL_OUT).items():
            try:
                await self._settle_outgoing(mid, entry)
            except GridvmError as exc:
                log.error("migration %s: cannot settle after restart: %s", mid, exc)
            self.note(JOURNAL_OUT, mid, None)

    async def _resume_incoming(self, mid: str, entry: dict[str, Any]) -> None:
        inc = Incoming(mid, entry["uuid"], entry["name"], entry["source"], entry["managed"],
                       entry["resume"], entry["started_at"], entry["deadline"],
                       created=list(entry["created"]), nbd=entry["nbd"])
        self._keep(self.incoming, mid, inc)
        vm = self.m.vms.get(inc.uuid)
        if vm is None:
            log.warning("%s: incoming migration %s died with gridvmd; cleaning up", inc.name, mid)
            inc.error = "gridvmd restarted and the incoming QEMU was gone"
            await self._discard(inc, None, self.m.store.get(inc.uuid))
            inc.done.set()
            return
        inc.domid = vm.rec.domid
        try:
            started = (await vm.monitor.execute("query-migrate", timeout=10)).get("status")
        except QemuError:
            started = None
        if started is None:     # its source gave up when this gridvmd stopped answering
            log.warning("%s: incoming migration %s had not started; removing it", inc.name, mid)
            inc.error = "gridvmd restarted before the source started the stream"
            await self._discard(inc, vm, vm.rec)
            inc.done.set()
            return
        if vm.rec.state is not S.INCOMING:
            log.warning("%s: incoming migration %s resumed while %s", inc.name, mid,
                        vm.rec.state)
        log.info("%s: watching incoming migration %s again", inc.name, mid)
        self._spawn(self._await_incoming(inc, vm), f"incoming-{inc.name}")

    async def _settle_outgoing(self, mid: str, entry: dict[str, Any]) -> None:
        vm = self.m.vms.get(entry["uuid"])
        if vm is None:
            return
        job = Job(mid, vm.name, vm.rec.uuid, entry["target"], MigrateOptions())
        self._keep(self.jobs, mid, job)
        out = Outgoing(self, job, vm)
        out.stopped, out.migrating = entry["stopped"], True
        out.peer_id, out.local = entry["peer_id"], [Path(p) for p in entry["local"]]
        self.m.set_state(vm.rec, S.MIGRATING, f"settling migration {mid}")
        vm.expected_exit = True
        log.warning("%s: gridvmd restarted during migration %s; settling it", vm.name, mid)
        await out.run(resume=True)

    async def close(self) -> None:
        """Stop outgoing migrations (guests stay here); leave incoming ones to the next gridvmd."""
        for job in self.jobs.values():
            if not job.done.is_set():
                job.cancel_reason = "gridvmd is stopping"
        waiting = [j.done.wait() for j in self.jobs.values() if not j.done.is_set()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting), timeout=SETTLE_S)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
