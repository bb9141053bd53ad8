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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, field_validator

from gridvm.config.model import DomainConfig, Path_
from gridvm.errors import Conflict, GridvmError, NotFound, PeerUnreachable, QemuError
from gridvm.host import hostinfo, links, procs, snapshots
from gridvm.host.manager import HostManager
from gridvm.host.vm import Vm
from gridvm.qemu.argv import drive_id
from gridvm.qemu.qmp import Monitor
from gridvm.store.records import DomainRecord

log = logging.getLogger("gridvm.migration")

RELOCATION_PORT = 8002              # xend's relocation port
HOLD_ENV = "GRIDVM_MIGRATION_HOLD"  # tests: a directory of gates (see `hold`)
POLL_S = 0.05
PROGRESS_S = 0.25                   # query-migrate at most this often between QEMU's events
PEER_CHECK_S = 1.0
PEER_MISSES = 3                     # unanswered status checks before the source gives up
SETTLE_S = 30.0
STALL_PASSES = 3                    # passes without progress that mean "stalled"
STALL_STEP_S = 3.0                  # at least this long without progress per raise
STALL_MIN_S = 10.0                  # at the ceiling, stalled this long: "cannot converge"
KEEP = 50                           # finished migrations remembered for `status`
UNLIMITED_MIBS = 10 * 1024          # QEMU's max-bandwidth when none is asked for
DEFAULT_DOWNTIME_MS = 300           # ceiling of the downtime limit: QEMU's default
INITIAL_DOWNTIME_MS = 10            # the limit a migration starts with
MIB = 1024 * 1024
JOURNAL_OUT = "migration.out"
JOURNAL_IN = "migration.in"
CAPS = ("events", "return-path", "validate-uuid", "auto-converge", "pause-before-switchover")
TERMINAL = ("completed", "failed", "cancelled")


class MigrateOptions(BaseModel):
    """What `gridvm migrate` asks for."""

    live: bool = False
    downtime_ms: int | None = Field(default=None, ge=1, le=600_000)
    bandwidth: int | None = Field(default=None, ge=1, le=1_000_000, description="MiB/s")
    auto_converge: bool = False
    copy_storage: bool = False
    timeout: float = Field(default=600, ge=5, le=86_400)


class DiskCopy(BaseModel):
    """A disk the destination creates and the source mirrors into (--copy-storage)."""

    index: int = Field(ge=0)
    vdev: str
    path: Path_                 # on the source
    local: str | None = None    # relative to the source's storage directory, if under it
    format: Literal["raw", "qcow2"]
    size: int = Field(ge=0)     # virtual size in bytes
    ident: tuple[int, int]      # (st_dev, st_ino) on the source: detects a shared file

    @field_validator("local")
    @classmethod
    def _local(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("/") or "\0" in v or ".." in Path(v).parts
                              or not v.strip()):
            raise ValueError(f"{v[:80]!r} is not a path inside the storage directory")
        return v


class PrepareRequest(BaseModel):
    id: str
    source: str                 # "<hostname>:<home>" of the source gridvmd
    config: DomainConfig
    managed: bool = False
    started_at: float | None = None
    restarts: list[float] = Field(default_factory=list)
    vcpu_pins: dict[int, str] = Field(default_factory=dict)
    resume: bool = False        # non-live: resume the guest once it has arrived
    copies: list[DiskCopy] = Field(default_factory=list)
    capabilities: dict[str, bool] = Field(default_factory=dict)
    timeout: float = 600


class PrepareAnswer(BaseModel):
    id: str
    # QEMU's stream, e.g. tcp:10.77.0.12:40123 (never exec: or file: from a peer)
    uri: str = Field(pattern=r"^tcp:(\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}$")
    domid: int
    nbd: dict[str, str] = Field(default_factory=dict)      # drive id -> NBD URI
    targets: dict[str, str] = Field(default_factory=dict)  # vdev -> image on the destination

    @field_validator("nbd")
    @classmethod
    def _nbd(cls, v: dict[str, str]) -> dict[str, str]:
        for uri in v.values():
            if not uri.startswith("nbd://") or any(c in uri for c in ", \0\n"):
                raise ValueError(f"bad NBD URI {uri[:80]!r}")
        return v


IncomingState = Literal["waiting", "running", "paused", "failed"]


class IncomingView(BaseModel):
    id: str
    name: str
    state: IncomingState
    domid: int | None = None
    error: str | None = None


class Peer(Protocol):
    """The destination's gridvmd as the source sees it (gridvm.api.hostpeer implements it)."""

    address: str

    async def prepare(self, req: PrepareRequest) -> PrepareAnswer: ...

    async def status(self, mid: str) -> IncomingView: ...

    async def abort(self, mid: str) -> IncomingView: ...

    async def close(self) -> None: ...


class _Abort(GridvmError):
    """gridvmd itself stops a migration (cancel, timeout, no convergence, peer gone)."""


async def hold(phase: str) -> None:
    """Test hook: wait while the gate file `$GRIDVM_MIGRATION_HOLD/<phase>` exists (≤120 s)."""
    root = os.environ.get(HOLD_ENV)
    if not root or not (Path(root) / phase).exists():
        return
    (Path(root) / f"{phase}.reached").touch()
    deadline = time.monotonic() + 120
    while (Path(root) / phase).exists() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)


def _holding(phase: str) -> bool:
    root = os.environ.get(HOLD_ENV)
    return bool(root) and (Path(str(root)) / phase).exists()


def _hostport(address: str, port: int | str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _caps(caps: dict[str, bool]) -> dict[str, Any]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ----- the source's view of one migration -------------------------------------------------


@dataclass
class Job:
    """One outgoing migration, as `gridvm migrate` follows it."""

    id: str
    name: str
    uuid: str
    target: str
    opts: MigrateOptions
    phase: str = "starting"   # preparing storage memory switchover switched | completed failed …
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)   # QEMU's last query-migrate
    storage: tuple[int, int] = (0, 0)                    # disk bytes mirrored, total
    dest_domid: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_reason: str | None = None
    peer_problem: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> dict[str, Any]:
        info = self.info
        ram = info.get("ram", {})
        return {
            "id": self.id, "domain": self.name, "uuid": self.uuid, "target": self.target,
            "live": self.opts.live, "copy_storage": self.opts.copy_storage,
            "phase": self.phase, "status": info.get("status"), "error": self.error,
            "ram": {"total": ram.get("total", 0), "transferred": ram.get("transferred", 0),
                    "remaining": ram.get("remaining", 0), "mbps": ram.get("mbps", 0),
                    "dirty_rate": ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096),
                    "iterations": ram.get("dirty-sync-count", 0)},
            "expected_downtime_ms": info.get("expected-downtime"),
            "storage": {"copied": self.storage[0], "total": self.storage[1]},
            "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"), "dest_domid": self.dest_domid,
            "started": self.started, "finished": self.finished,
        }


@dataclass
class Incoming:
    """One incoming migration on the destination."""

    id: str
    uuid: str
    name: str
    source: str
    managed: bool
    resume: bool
    started_at: float | None
    deadline: float                                        # wall clock
    created: list[str] = field(default_factory=list)       # images made for --copy-storage
    nbd: bool = False
    state: IncomingState = "waiting"
    error: str | None = None
    domid: int | None = None
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> IncomingView:
        return IncomingView(id=self.id, name=self.name, state=self.state, domid=self.domid,
                            error=self.error)

    def journal(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "source": self.source,
                "managed": self.managed, "resume": self.resume, "started_at": self.started_at,
                "deadline": self.deadline, "created": self.created, "nbd": self.nbd}


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

    def _note(self, key: str, mid: str, entry: dict[str, Any] | None) -> None:
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
            if vm.rec.state in ("shutdown", "crashed"):
                raise Conflict(f"domain {vm.name} is {vm.rec.state}; destroy or restart it first")
            if opts.copy_storage and snapshots.count(vm.rec.config, self.m.home.root):
                raise Conflict(f"domain {vm.name} has snapshots, which --copy-storage would "
                               "lose (it copies only the disks' current state)")
            job = Job(uuidlib.uuid4().hex[:12], vm.name, vm.rec.uuid, target, opts)
            vm.busy = f"migrating to {target}"
            vm.expected_exit = True    # a QEMU exit is judged by the migration, not on_crash
        self._keep(self.jobs, job.id, job)
        self._spawn(_Outgoing(self, job, vm).run(), f"migrate-{vm.name}")
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
        self._note(JOURNAL_IN, inc.id, inc.journal())
        vm: Vm | None = None
        try:
            for copy in req.copies:
                path = targets[copy.vdev]
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                await procs.arun(["qemu-img", "create", "-q", "-f", copy.format, path,
                                  str(copy.size)], timeout=60)
                inc.created.append(path)
                self._note(JOURNAL_IN, inc.id, inc.journal())
            vm = await m._launch(rec, incoming=True)
            vm.busy = f"migrating in from {req.source}"
            vm.expected_exit = True
            inc.domid = rec.domid
            await vm.monitor.execute("migrate-set-capabilities", _caps(req.capabilities))
            nbd = await self._export(vm, inc, req, address)
            await vm.monitor.execute("migrate-incoming", {"uri": f"tcp:{_hostport(address, 0)}"})
            sockets = (await vm.monitor.execute("query-migrate")).get("socket-address", [])
            if not sockets:
                raise QemuError("QEMU reported no address for the incoming migration")
            port = sockets[0]["port"]
        except BaseException as exc:
            inc.error = _one_line(exc)
            await self._discard(inc, vm, rec)
            raise
        log.info("%s: waiting for migration %s from %s (domid %s, port %s)", cfg.name, inc.id,
                 req.source, rec.domid, port)
        self._spawn(self._await_incoming(inc, vm), f"incoming-{cfg.name}")
        assert rec.domid is not None
        return PrepareAnswer(id=inc.id, uri=f"tcp:{_hostport(address, port)}", domid=rec.domid,
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
        self._note(JOURNAL_IN, inc.id, inc.journal())
        nodes = {b["device"]: b["inserted"]["node-name"]
                 for b in await mon.execute("query-block") if "inserted" in b}
        uris = {}
        for copy in req.copies:
            drive = drive_id(copy.vdev)
            await mon.execute("block-export-add", {"type": "nbd", "id": drive,
                                                   "node-name": nodes[drive],
                                                   "writable": True, "name": drive})
            uris[drive] = f"nbd://{_hostport(address, port)}/{drive}"
        return uris

    async def _await_incoming(self, inc: Incoming, vm: Vm) -> None:
        try:
            await self._receive(inc, vm)
        except Exception as exc:
            inc.error = _one_line(exc)
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
                    raise _Abort("aborted by the source")
                if time.time() > inc.deadline:
                    raise _Abort("the source did not complete the migration in time")
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
        with contextlib.suppress(QemuError):
            rec.state = "running" if await vm.status() == "running" else "paused"
        self.m.store.put(rec)
        self.m.store.arrived(rec)   # e.g. the cluster's registry: this host runs it now
        vm.busy = None
        vm.expected_exit = False
        inc.state = "running" if rec.state == "running" else "paused"
        self._note(JOURNAL_IN, inc.id, None)
        log.info("%s: arrived from %s as domid %s (%s)", inc.name, inc.source, rec.domid,
                 rec.state)
        if not procs.pid_alive(vm.pid):
            await self.m._on_event(vm, "died")

    async def _discard(self, inc: Incoming, vm: Vm | None, rec: DomainRecord | None) -> None:
        """Remove all an incoming migration made: QEMU, taps, record, disk images."""
        m = self.m
        inc.state = "failed"
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
            self._note(JOURNAL_IN, inc.id, None)

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
            self._note(JOURNAL_OUT, mid, None)

    async def _resume_incoming(self, mid: str, entry: dict[str, Any]) -> None:
        inc = Incoming(mid, entry["uuid"], entry["name"], entry["source"], entry["managed"],
                       entry["resume"], entry["started_at"], entry["deadline"],
                       created=list(entry["created"]), nbd=entry["nbd"])
        self._keep(self.incoming, mid, inc)
        vm = self.m.vms.get(inc.uuid)
        if vm is None:
            log.warning("%s: incoming migration %s died with gridvmd; cleaning up", inc.name, mid)
            await self._discard(inc, None, self.m.store.get(inc.uuid))
            inc.error = "gridvmd restarted and the incoming QEMU was gone"
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
        vm.busy = f"migrating in from {inc.source}"
        log.info("%s: watching incoming migration %s again", inc.name, mid)
        self._spawn(self._await_incoming(inc, vm), f"incoming-{inc.name}")

    async def _settle_outgoing(self, mid: str, entry: dict[str, Any]) -> None:
        vm = self.m.vms.get(entry["uuid"])
        if vm is None:
            return
        job = Job(mid, vm.name, vm.rec.uuid, entry["target"], MigrateOptions())
        self._keep(self.jobs, mid, job)
        out = _Outgoing(self, job, vm)
        out.stopped, out.migrating = entry["stopped"], True
        out.peer_id, out.local = entry["peer_id"], [Path(p) for p in entry["local"]]
        vm.busy = f"migrating to {job.target}"
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


class _Outgoing:
    """The source side of one migration, from prepare to a single outcome."""

    def __init__(self, svc: Migrations, job: Job, vm: Vm) -> None:
        self.svc, self.m, self.job, self.vm = svc, svc.m, job, vm
        self.peer: Peer | None = None
        self.peer_id: str | None = None
        self.uri = ""
        self.nbd: dict[str, str] = {}
        self.copies: list[DiskCopy] = []
        self.local: list[Path] = []      # source images under the storage dir, moved away
        self.mirrors: list[str] = []
        self.caps: dict[str, bool] = {}
        self.stopped = False             # we paused the guest (non-live)
        self.stopped_at: float | None = None
        self.migrating = False           # QEMU's `migrate` was issued
        self.continued = False
        self.deadline = time.monotonic() + job.opts.timeout
        self.begun = time.monotonic()
        self.ceiling = job.opts.downtime_ms or DEFAULT_DOWNTIME_MS
        self.limit = min(INITIAL_DOWNTIME_MS, self.ceiling)   # raised while not converging
        self.raise_limit = False
        self.last_sync = 0
        self.since = 0                   # passes seen when the limit was last raised
        self.raised_at = self.begun

    @property
    def mon(self) -> Monitor:
        return self.vm.monitor

    async def run(self, *, resume: bool = False) -> None:
        job = self.job
        try:
            if resume:
                self.mirrors = [j["device"] for j in await self.mon.execute("query-block-jobs")
                                if str(j["device"]).startswith("mirror-")]
                self.peer = self.svc.connect(job.target)
                owned = await self._recover(_Abort("gridvmd restarted during the migration"))
            else:
                try:
                    await self._migrate()
                    owned = True
                except Exception as exc:
                    owned = await self._recover(exc)
            if owned:
                await self._retire_source()
        except Exception as exc:
            log.exception("%s: migration %s could not be settled", job.name, job.id)
            job.error = job.error or f"migration of {job.name} could not be settled: " \
                                     f"{_one_line(exc)}"
        finally:
            if job.phase != "completed":
                job.phase = "cancelled" if job.cancel_reason == "cancelled" else "failed"
            job.finished = time.time()
            self.svc._note(JOURNAL_OUT, job.id, None)
            if self.peer is not None:
                await self.peer.close()
            if self.m.vms.get(self.vm.rec.uuid) is self.vm:
                self.vm.busy = None
                self.vm.expected_exit = False
            job.done.set()

    def _journal(self) -> None:
        self.svc._note(JOURNAL_OUT, self.job.id, {
            "uuid": self.job.uuid, "target": self.job.target, "peer_id": self.peer_id,
            "stopped": self.stopped, "local": [str(p) for p in self.local]})

    async def _migrate(self) -> None:
        job = self.job
        job.phase = "preparing"
        self.peer = self.svc.connect(job.target)
        req = await self._request()
        answer = await self.peer.prepare(req)
        self.peer_id, self.uri, self.nbd = answer.id, answer.uri, answer.nbd
        job.dest_domid = answer.domid
        self._journal()
        await hold("prepared")
        watcher = asyncio.create_task(self._watch_peer(answer.id))
        try:
            if self.copies:
                job.phase = "storage"
                await self._mirror()
                await hold("storage")
            self._check()
            try:     # the destination must still be there when the stream starts
                view = await self.peer.status(answer.id)
            except GridvmError as exc:
                raise _Abort(f"the destination is gone ({exc})") from exc
            if view.state == "failed":
                raise _Abort(f"the destination gave up: {view.error}")
            await self.mon.execute("migrate-set-capabilities", _caps(self.caps))
            await self.mon.execute("migrate-set-parameters", {
                "downtime-limit": self.limit,
                "max-bandwidth": (job.opts.bandwidth or UNLIMITED_MIBS) * MIB})
            if req.resume:
                await self.mon.execute("stop")
                self.stopped, self.stopped_at = True, time.monotonic()
                self._journal()
            job.phase = "memory"
            self.begun = self.raised_at = time.monotonic()
            self.migrating = True
            await self.mon.execute("migrate", {"uri": self.uri})
            job.info = await self._follow()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _request(self) -> PrepareRequest:
        job, rec = self.job, self.vm.rec
        if job.opts.copy_storage:
            self.copies = await self._copies()
        self.caps = {"events": True, "return-path": True, "validate-uuid": True,
                     "auto-converge": job.opts.auto_converge,
                     "pause-before-switchover": bool(self.copies) or _holding("switchover")}
        resume = not job.opts.live and await self.vm.status() == "running"
        return PrepareRequest(
            id=job.id, source=self.svc.identity, config=rec.config, managed=rec.managed,
            started_at=rec.started_at, restarts=rec.restarts, vcpu_pins=rec.vcpu_pins,
            resume=resume, copies=self.copies, capabilities=self.caps, timeout=job.opts.timeout)

    async def _copies(self) -> list[DiskCopy]:
        sizes = {b["device"]: b["inserted"]["image"]["virtual-size"]
                 for b in await self.mon.execute("query-block") if "inserted" in b}
        storage = self.svc.storage_dir.resolve()
        copies = []
        for i, d in enumerate(self.vm.rec.config.disks):
            if d.devtype != "disk" or d.mode != "w":
                continue     # read-only images and CD-ROMs must exist on the destination
            path = Path(d.target).resolve()
            st = path.stat()
            local = str(path.relative_to(storage)) if path.is_relative_to(storage) else None
            if local:
                self.local.append(path)
            copies.append(DiskCopy(index=i, vdev=d.vdev, path=d.target, local=local,
                                   format=d.format, size=sizes[drive_id(d.vdev)],
                                   ident=(st.st_dev, st.st_ino)))
        return copies

    def _check(self) -> None:
        """Raise if the migration must stop: cancelled, destination gone, out of time."""
        job = self.job
        if job.cancel_reason:
            raise _Abort(job.cancel_reason)
        if job.peer_problem:
            raise _Abort(job.peer_problem)
        if time.monotonic() > self.deadline:
            raise _Abort(f"it did not finish within {job.opts.timeout:.0f}s")

    async def _watch_peer(self, mid: str) -> None:
        """Give up when the destination's gridvmd is gone or reports its half failed."""
        assert self.peer is not None
        misses = 0
        while True:
            await asyncio.sleep(PEER_CHECK_S)
            try:
                view = await self.peer.status(mid)
            except PeerUnreachable as exc:
                misses += 1
                if exc.refused or misses >= PEER_MISSES:
                    self.job.peer_problem = f"the destination's gridvmd is unreachable ({exc})"
                    return
                continue
            except GridvmError as exc:
                self.job.peer_problem = f"the destination lost the migration ({exc})"
                return
            misses = 0
            if view.state == "failed":
                self.job.peer_problem = f"the destination gave up: {view.error}"
                return

    async def _mirror(self) -> None:
        """Mirror every copied disk into the destination's NBD exports until in sync."""
        mon = self.mon
        async with mon.listen("BLOCK_JOB_COMPLETED", "BLOCK_JOB_READY",
                              "BLOCK_JOB_ERROR") as events:
            for copy in self.copies:
                drive = drive_id(copy.vdev)
                await mon.execute("drive-mirror", {
                    "device": drive, "job-id": f"mirror-{drive}", "target": self.nbd[drive],
                    "format": "raw", "sync": "full", "mode": "existing"})
                self.mirrors.append(f"mirror-{drive}")
            while True:
                jobs = {j["device"]: j for j in await mon.execute("query-block-jobs")}
                mine = [jobs[m] for m in self.mirrors if m in jobs]
                self.job.storage = (sum(j["offset"] for j in mine), sum(j["len"] for j in mine))
                if len(mine) < len(self.mirrors):
                    raise QemuError("a disk mirror stopped before it was in sync")
                if all(j.get("ready") for j in mine):
                    return
                self._check()
                with contextlib.suppress(TimeoutError):
                    event = await asyncio.wait_for(events.get(), 4 * POLL_S)
                    if event["event"] == "BLOCK_JOB_ERROR":
                        raise QemuError(f"disk mirror I/O error: {dict(event).get('data')}")

    async def _finish_mirrors(self, *, force: bool = False) -> None:
        """Complete (or with force, abandon) the mirrors; wait until QEMU has dropped them."""
        if not self.mirrors:
            return
        mon = self.mon
        for jid in self.mirrors:
            with contextlib.suppress(QemuError):
                await mon.execute("block-job-cancel", {"device": jid, "force": force})
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            jobs = {j["device"] for j in await mon.execute("query-block-jobs")}
            if not jobs & set(self.mirrors):
                self.mirrors = []
                return
            await asyncio.sleep(0.01)
        raise QemuError("the disk mirrors did not finish within 30s")

    async def _follow(self) -> dict[str, Any]:
        """Follow QEMU's migration to `completed`; handle the switchover pause."""
        mon = self.mon
        passes: dict[int, int] = {}      # dirty-sync-count -> largest remaining seen
        async with mon.listen("MIGRATION", "MIGRATION_PASS") as events:
            while True:
                info: dict[str, Any] = await mon.execute("query-migrate", timeout=10)
                self.job.info = info
                status = info.get("status")
                if status == "completed":
                    return await self._figures(info)
                if status in ("failed", "cancelled"):
                    raise QemuError(f"QEMU's migration {status}: "
                                    f"{info.get('error-desc', 'no detail')}")
                if status == "pre-switchover" and not self.continued:
                    await self._switchover()
                    continue
                if status == "active":
                    self._check()
                    self._check_convergence(info, passes)
                    if self.raise_limit:
                        self.raise_limit = False
                        log.info("%s: downtime limit raised to %d ms", self.job.name,
                                 self.limit)
                        await mon.execute("migrate-set-parameters",
                                          {"downtime-limit": self.limit})
                with contextlib.suppress(TimeoutError):   # each pass and state change wakes
                    await asyncio.wait_for(events.get(), PROGRESS_S)

    async def _figures(self, info: dict[str, Any]) -> dict[str, Any]:
        """QEMU's final figures (it reports `completed` a moment before it computes them);
        for a non-live migration the downtime is the whole pause."""
        paused = time.monotonic() - self.stopped_at if self.stopped_at is not None else None
        for _ in range(40):
            if info.get("total-time"):
                break
            await asyncio.sleep(0.025)
            info = await self.mon.execute("query-migrate", timeout=10)
        if paused is not None:
            info["downtime"] = round(paused * 1000)
        return info

    async def _switchover(self) -> None:
        """The guest is paused and its RAM sent: finish the disks, then let QEMU switch."""
        self.job.phase = "switchover"
        await self._finish_mirrors()
        await hold("switchover")
        self._check()
        self.continued = True
        await self.mon.execute("migrate-continue", {"state": "pre-switchover"})

    def _check_convergence(self, info: dict[str, Any], passes: dict[int, int]) -> None:
        """Raise the downtime limit towards its ceiling while passes make no progress; give
        up when even the ceiling does not let the copy converge."""
        ram = info.get("ram", {})
        sync = int(ram.get("dirty-sync-count", 0))
        passes[sync] = max(passes.get(sync, 0), int(ram.get("remaining", 0)))
        if sync == self.last_sync:
            return
        self.last_sync = sync
        sizes = [passes[k] for k in sorted(passes)[1:-1]]   # whole passes after the first
        if len(sizes) - self.since < 2 * STALL_PASSES or \
                time.monotonic() - self.raised_at < STALL_STEP_S or \
                min(sizes[-STALL_PASSES:]) < 0.9 * min(sizes[-2 * STALL_PASSES:-STALL_PASSES]):
            return
        if self.limit < self.ceiling:
            self.limit = min(2 * self.limit, self.ceiling)
            self.since, self.raised_at = len(sizes), time.monotonic()
            self.raise_limit = True
            return
        opts = self.job.opts
        if opts.auto_converge or time.monotonic() - self.begun < STALL_MIN_S:
            return
        rate = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096) / MIB
        raise _Abort(
            f"it cannot converge: the guest dirties {rate:.0f} MiB/s and "
            f"{sizes[-1] / MIB:.0f} MiB stay to copy, more than {self.ceiling} ms of "
            f"downtime allows at {ram.get('mbps', 0):.0f} Mbit/s; try --auto-converge, a "
            "larger --downtime-ms or more --bandwidth")

    # ----- outcome -----------------------------------------------------------------------

    async def _settle_qemu(self) -> str:
        """Cancel QEMU's migration unless it is already switching over; its final status."""
        asked = False
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            info: dict[str, Any] = await self.mon.execute("query-migrate", timeout=10)
            status = info.get("status")
            if status is None or status in TERMINAL:
                if status is not None:
                    self.job.info = info
                return str(status)
            if not asked:
                switching = status == "device" or (
                    status == "active" and await self.vm.status() == "finish-migrate")
                if not switching:   # once switching, the destination may already run it
                    await self.mon.execute("migrate_cancel")
                    asked = True
            await asyncio.sleep(POLL_S)
        raise QemuError("QEMU's migration did not stop within 30s")

    async def _recover(self, exc: BaseException) -> bool:
        """After a failure: settle QEMU, keep the domain here; True if the destination has it."""
        job, vm = self.job, self.vm
        reason = _one_line(exc)
        log.warning("%s: migration to %s stopping: %s", job.name, job.target, reason)
        alive = procs.pid_alive(vm.pid)
        if alive:
            try:
                final = await self._settle_qemu() if self.migrating else "none"
                if final == "completed":
                    log.info("%s: the migration completed before it could be stopped", job.name)
                    return True
                await self._finish_mirrors(force=True)
                await self.mon.execute("migrate-set-capabilities",
                                       _caps(dict.fromkeys(CAPS, False)))
                if self.stopped and await vm.status() in ("paused", "postmigrate"):
                    await self.mon.execute("cont")
            except QemuError as err:
                alive = procs.pid_alive(vm.pid)
                if alive:
                    log.error("%s: cleaning up the failed migration: %s", job.name, err)
        dest = await self._abort_peer()
        if dest is not None and dest.state in ("running", "paused"):
            log.error("%s: the destination completed the switch; it owns the domain", job.name)
            return True
        if not alive:
            job.error = f"migration of {job.name} to {job.target} failed: {reason}; " \
                        "the source's QEMU exited"
            if dest is None:   # the outcome is unknown: never start a second copy here
                vm.rec.managed = False
                await self.m._teardown(vm, reason="qemu-died")
            else:
                await self.m._on_event(vm, "died")
            return False
        where = "it keeps running on this host" if await vm.status() == "running" \
            else "it stays on this host"
        if job.cancel_reason == "cancelled":
            job.error = f"migration of {job.name} cancelled; {where}"
        else:
            job.error = f"migration of {job.name} to {job.target} failed: {reason}; {where}"
        return False

    async def _abort_peer(self) -> IncomingView | None:
        """Tell the destination to drop its half; its state afterwards (None: unreachable)."""
        if self.peer is None:
            return IncomingView(id="", name=self.job.name, state="failed")
        mid = self.peer_id or self.job.id    # a prepare that timed out may still have worked
        try:
            return await self.peer.abort(mid)
        except PeerUnreachable as exc:
            log.warning("%s: cannot reach the destination to abort: %s", self.job.name, exc)
            return None
        except GridvmError as exc:      # it does not know the migration: nothing left there
            log.info("%s: abort: %s", self.job.name, exc)
            return IncomingView(id=mid, name=self.job.name, state="failed")

    async def _retire_source(self) -> None:
        """The destination runs the domain: remove it here (definition included)."""
        job, vm = self.job, self.vm
        job.phase = "switched"
        await hold("switched")
        self.m.store.departing(vm.rec.uuid)   # the destination takes the registry record
        async with vm.lock:
            vm.rec.managed = False       # the definition moved with the domain
            if self.m.vms.get(vm.rec.uuid) is vm:
                await self.m._teardown(vm, reason="migrated")
            elif self.m.store.get(vm.rec.uuid) is not None:
                self.m.store.delete(vm.rec.uuid)
        for path in self.local:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                log.info("%s: removed %s (moved to %s)", job.name, path, job.target)
        if self.peer is not None and self.peer_id is not None:
            with contextlib.suppress(GridvmError):
                job.dest_domid = (await self.peer.status(self.peer_id)).domid
        job.phase = "completed"
        info = job.info
        log.info("%s: migrated to %s in %s ms (downtime %s ms)", job.name, job.target,
                 info.get("total-time"), info.get("downtime"))
