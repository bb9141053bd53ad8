"""The source's half of one live migration, from prepare to a single outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from gridvm.errors import GridvmError, PeerUnreachable, QemuError
from gridvm.host import procs
from gridvm.host.migration_model import (
    CAPS,
    DEFAULT_DOWNTIME_MS,
    INITIAL_DOWNTIME_MS,
    JOURNAL_OUT,
    MIB,
    PEER_CHECK_S,
    PEER_MISSES,
    POLL_S,
    PROGRESS_S,
    SETTLE_S,
    STALL_MIN_S,
    STALL_PASSES,
    STALL_STEP_S,
    TERMINAL,
    UNLIMITED_MIBS,
    Abort,
    DiskCopy,
    IncomingState,
    IncomingView,
    Job,
    JobPhase,
    Peer,
    PrepareRequest,
    Source,
    caps_arg,
    hold,
    holding,
    one_line,
)
from gridvm.host.vm import Vm
from gridvm.lifecycle import DomainState
from gridvm.qemu.argv import drive_id
from gridvm.qemu.qmp import Monitor

log = logging.getLogger("gridvm.migration")


class Outgoing:
    """The source side of one migration, from prepare to a single outcome."""

    def __init__(self, svc: Source, job: Job, vm: Vm) -> None:
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
                owned = await self._recover(Abort("gridvmd restarted during the migration"))
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
                                     f"{one_line(exc)}"
        finally:
            if job.phase is not JobPhase.COMPLETED:
                end = JobPhase.CANCELLED if job.cancel_reason == "cancelled" else JobPhase.FAILED
                job.set_phase(end, job.error or end)
            job.finished = time.time()
            self.svc.note(JOURNAL_OUT, job.id, None)
            if self.peer is not None:
                await self.peer.close()
            if self.m.vms.get(self.vm.rec.uuid) is self.vm:
                if self.vm.rec.state is DomainState.MIGRATING:
                    await self.m.settle(self.vm, f"migration {job.id} {job.phase}")
                self.vm.expected_exit = False
            job.done.set()

    def _journal(self) -> None:
        self.svc.note(JOURNAL_OUT, self.job.id, {
            "uuid": self.job.uuid, "target": self.job.target, "peer_id": self.peer_id,
            "stopped": self.stopped, "local": [str(p) for p in self.local]})

    async def _migrate(self) -> None:
        job = self.job
        job.set_phase(JobPhase.PREPARING, f"to {job.target}")
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
                job.set_phase(JobPhase.STORAGE, f"mirroring {len(self.copies)} disks")
                await self._mirror()
                await hold("storage")
            self._check()
            try:     # the destination must still be there when the stream starts
                view = await self.peer.status(answer.id)
            except GridvmError as exc:
                raise Abort(f"the destination is gone ({exc})") from exc
            if view.state == "failed":
                raise Abort(f"the destination gave up: {view.error}")
            await self.mon.execute("migrate-set-capabilities", caps_arg(self.caps))
            await self.mon.execute("migrate-set-parameters", {
                "downtime-limit": self.limit,
                "max-bandwidth": (job.opts.bandwidth or UNLIMITED_MIBS) * MIB})
            if req.resume:
                await self.mon.execute("stop")
                self.stopped, self.stopped_at = True, time.monotonic()
                self._journal()
            job.set_phase(JobPhase.MEMORY, "live" if job.opts.live else "paused")
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
                     "pause-before-switchover": bool(self.copies) or holding("switchover")}
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
            raise Abort(job.cancel_reason)
        if job.peer_problem:
            raise Abort(job.peer_problem)
        if time.monotonic() > self.deadline:
            raise Abort(f"it did not finish within {job.opts.timeout:.0f}s")

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
        self.job.set_phase(JobPhase.SWITCHOVER, "RAM sent")
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
        raise Abort(
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
        reason = one_line(exc)
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
                                       caps_arg(dict.fromkeys(CAPS, False)))
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
                await self.m._teardown(vm, reason="migration-unknown")
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
            return IncomingView(id="", name=self.job.name, state=IncomingState.FAILED)
        mid = self.peer_id or self.job.id    # a prepare that timed out may still have worked
        try:
            return await self.peer.abort(mid)
        except PeerUnreachable as exc:
            log.warning("%s: cannot reach the destination to abort: %s", self.job.name, exc)
            return None
        except GridvmError as exc:      # it does not know the migration: nothing left there
            log.info("%s: abort: %s", self.job.name, exc)
            return IncomingView(id=mid, name=self.job.name, state=IncomingState.FAILED)

    async def _retire_source(self) -> None:
        """The destination runs the domain: remove it here (definition included)."""
        job, vm = self.job, self.vm
        job.set_phase(JobPhase.SWITCHED, f"{job.target} runs it")
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
        job.set_phase(JobPhase.COMPLETED, "source retired")
        info = job.info
        log.info("%s: migrated to %s in %s ms (downtime %s ms)", job.name, job.target,
                 info.get("total-time"), info.get("downtime"))
