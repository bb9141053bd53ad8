"""`gridvm backup DOM --to STORE`: full and incremental backups into a deduplicating chunk
store (`gridvm.host.chunkstore`).

A running domain is backed up without stopping it (libvirt's "pull mode"): in one QMP
transaction — inside a filesystem freeze when the guest has an agent — each disk gets a
new persistent dirty bitmap, the bitmap of the previous backup is frozen, and a copy-before-
write job starts that keeps the point-in-time view in a small temporary overlay (image
fleecing). That view is exported over NBD on a socket in the run directory; gridvmd reads it
(only the chunks the frozen bitmap marks, for an incremental), hashes 4 MiB chunks and stores
the new ones. A stopped domain's disks are read the same way through `qemu-nbd`.

A disk is backed up incrementally when it is qcow2, this store's last backup of the domain
has it, and the disk carries that backup's bitmap (`gridvm-<store>-<backup>`) in a consistent
state. Persistent bitmaps live in the image, so they survive a gridvmd restart, a guest
reboot, save/restore, and a restart on another host (shared storage) after a clean stop; a
QEMU that died (a crash, a fenced host) leaves them inconsistent, a snapshot revert removes
them: such a disk gets a full backup and the summary says why. A failed backup merges the
new bitmap back into the old one, so no change is ever lost to the next incremental.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gridvm.config.model import DiskSpec, DomainConfig
from gridvm.errors import Conflict, GridvmError, QemuError
from gridvm.host import confine, qemuimg
from gridvm.host.chunkstore import CHUNK, ZERO, ChunkStore, Index, digest, store_error
from gridvm.host.vm import Vm
from gridvm.qemu import hotplug
from gridvm.qemu.nbd import ALLOCATION, STATE_DIRTY, STATE_ZERO, NbdClient, dirty_bitmap
from gridvm.store.records import DomainRecord

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.backup")

NBD_WAIT_S = 10.0
READ_AHEAD = 2      # chunks read ahead of the one being hashed and stored
Commit = Callable[[list["Plan"], str], Awaitable[dict[str, Any]]]


def backup_disks(cfg: DomainConfig) -> list[DiskSpec]:
    """Every disk but CD-ROMs."""
    return [d for d in cfg.disks if d.devtype == "disk"]


def bitmap_name(store_id: str, backup_id: str) -> str:
    return f"gridvm-{store_id[:8]}-{backup_id}"


@dataclass
class Plan:
    """One disk's part in a backup."""

    spec: DiskSpec
    size: int = 0
    base: Index | None = None          # the previous index, for an incremental
    old: str | None = None             # the bitmap since the previous backup
    new: str | None = None             # the bitmap this backup starts
    reason: str = ""
    stale: list[str] = field(default_factory=list)   # this store's other bitmaps on it
    index: Index | None = None
    read: int = 0
    stored: int = 0
    new_chunks: int = 0
    written: list[Path] = field(default_factory=list)

    @property
    def vdev(self) -> str:
        return self.spec.vdev

    @property
    def incremental(self) -> bool:
        return self.base is not None


def plan_disk(spec: DiskSpec, size: int, bitmaps: list[dict[str, Any]], store: ChunkStore,
              last: dict[str, Any] | None, bid: str, full: bool) -> Plan:
    """Full or incremental, and why."""
    sid = store.id
    mine = [b for b in bitmaps if str(b["name"]).startswith(f"gridvm-{sid[:8]}-")]
    plan = Plan(spec, size, stale=[str(b["name"]) for b in mine])
    if spec.format == "qcow2" and spec.mode == "w":
        plan.new = bitmap_name(sid, bid)
    prev = next((d for d in last["disks"] if d["vdev"] == spec.vdev), None) if last else None
    want = bitmap_name(sid, last["id"]) if last else ""
    found = next((b for b in mine if b["name"] == want), None)
    if full:
        plan.reason = "full backup asked for"
    elif last is None:
        plan.reason = "first backup of this domain in this store"
    elif prev is None:
        plan.reason = f"{spec.vdev} is not in the last backup ({last['id']})"
    elif prev["size"] != size:
        plan.reason = f"{spec.vdev} changed size since the last backup"
    elif last.get("verified", {}).get("ok") is False:
        plan.reason = f"the last backup ({last['id']}) failed verification"
    elif spec.format != "qcow2":
        plan.reason = f"{spec.vdev} is raw: it cannot keep a persistent dirty bitmap"
    elif spec.mode != "w":
        plan.reason = f"{spec.vdev} is read-only: no dirty bitmap (unchanged chunks are " \
                      "deduplicated)"
    elif found is None:
        plan.reason = (f"{spec.vdev} has no dirty bitmap since backup {last['id']}: its QEMU "
                       "stopped without ever writing it to the image (a crash or a host "
                       "failure), or the disk was reverted to a snapshot, converted or copied")
    elif found.get("inconsistent"):
        plan.reason = (f"the dirty bitmap of {spec.vdev} since backup {last['id']} cannot be "
                       "trusted: its QEMU did not close the disk cleanly (a crash or a host "
                       "failure)")
    else:
        plan.base = store.index(last, spec.vdev)
        plan.old = want
        plan.reason = f"changes since {last['id']}"
    if plan.old is None:
        plan.stale = [b for b in plan.stale if b != plan.new]
    else:
        plan.stale = [b for b in plan.stale if b not in (plan.new, plan.old)]
    return plan


def _zero_chunks(extents: Iterator[Any], size: int) -> set[int]:
    """Chunks that read entirely as zeros (by base:allocation), runs of zero extents
    merged."""
    zero: set[int] = set()
    runs: list[tuple[int, int]] = []
    for e in extents:
        if not e.flags & STATE_ZERO:
            continue
        if runs and runs[-1][1] == e.offset:
            runs[-1] = (runs[-1][0], e.offset + e.length)
        else:
            runs.append((e.offset, e.offset + e.length))
    for start, end in runs:
        for i in range(-(-start // CHUNK), -(-end // CHUNK)):
            if end >= min((i + 1) * CHUNK, size):
                zero.add(i)
    return zero


def read_disk(sock: Path, export: str, plan: Plan, store: ChunkStore) -> None:
    """Read one disk's export into the store (blocking): its index and figures in `plan`."""
    contexts = (ALLOCATION, dirty_bitmap(plan.old)) if plan.old else (ALLOCATION,)
    try:
        with contextlib.ExitStack() as stack:
            nbd = stack.enter_context(NbdClient.unix(sock, export, contexts))
            size = nbd.size
            index = Index(size)
            if plan.base is not None:
                todo: set[int] = set()
                for e in nbd.extents(dirty_bitmap(str(plan.old))):
                    if e.flags & STATE_DIRTY:
                        todo.update(range(e.offset // CHUNK, -(-(e.offset + e.length) // CHUNK)))
                zero: set[int] = set()
            else:
                todo = set(range(index.chunks))
                zero = _zero_chunks(nbd.extents(ALLOCATION), size)
            reads = [i for i in range(index.chunks)
                     if i not in zero and (plan.base is None or i in todo)]
            ahead = stack.enter_context(contextlib.closing(
                _read_ahead(nbd, [(i * CHUNK, index.chunk_len(i)) for i in reads])))
            for i in range(index.chunks):
                length = index.chunk_len(i)
                if i not in todo and plan.base is not None:
                    index.digests.append(plan.base.digests[i])
                    continue
                data = ZERO[:length] if i in zero else next(ahead)
                if i not in zero:
                    plan.read += length
                d = digest(data)
                written = store.put(d, data)
                if written:
                    plan.stored += written
                    plan.new_chunks += 1
                    plan.written.append(store.chunk_path(d))
                index.digests.append(d)
            plan.index = index
    except OSError as exc:
        if isinstance(exc, (ConnectionError, socket.timeout)):
            raise GridvmError(f"reading {plan.vdev} for the backup failed: {exc}") from None
        raise store_error(exc, store.root) from None


def _read_ahead(nbd: NbdClient, extents: list[tuple[int, int]]) -> Generator[bytes]:
    """The data of `extents` in order, read by a thread while the caller hashes and stores
    the chunk before (the socket, SHA-256, zlib and file writes all release the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="backup-read") as pool:
        queue = deque(pool.submit(nbd.read, off, n) for off, n in extents[:READ_AHEAD])
        for off, n in extents[READ_AHEAD:]:
            data = queue.popleft().result()
            queue.append(pool.submit(nbd.read, off, n))
            yield data
        while queue:
            yield queue.popleft().result()


class Backups:
    """Backups of one host's domains."""

    def __init__(self, manager: HostManager) -> None:
        self.m = manager

    async def backup(self, ref: str, store_path: str, *, full: bool = False) -> dict[str, Any]:
        rec = self.m.lookup(ref)
        disks = backup_disks(rec.config)
        if not disks:
            raise Conflict(f"domain {rec.name} has no disks to back up")
        store = await asyncio.to_thread(ChunkStore.open, store_path, create=True)
        fd = await asyncio.to_thread(store.acquire, exclusive=True)
        bid = store.new_id(rec.name)
        try:
            await asyncio.to_thread(store.check_writable)
            last = next((m for m in reversed(await asyncio.to_thread(store.manifests, rec.name))
                         if m["uuid"] == rec.uuid), None)
            started = time.monotonic()

            async def commit(plans: list[Plan], consistency: str) -> dict[str, Any]:
                return await self._commit(rec, store, bid, plans, consistency,
                                          time.monotonic() - started)

            if rec.uuid in self.m.vms:
                async with self.m.operation(ref, "backup") as vm:
                    return await self._online(vm, store, bid, last, full, commit)
            return await self._offline(rec, store, bid, last, full, commit)
        except BaseException:
            store.abandon(rec.name, bid)
            raise
        finally:
            store.release(fd)

    async def _commit(self, rec: DomainRecord, store: ChunkStore, bid: str, plans: list[Plan],
                      consistency: str, took: float) -> dict[str, Any]:
        disks = []
        for p in plans:
            assert p.index is not None
            try:
                where = store.staging(rec.name, bid)
                sha = await asyncio.to_thread(store.write_index, where, p.vdev, p.index)
            except OSError as exc:
                raise store_error(exc, store.root) from None
            disks.append({"vdev": p.vdev, "format": p.spec.format, "size": p.index.size,
                          "mode": "incremental" if p.incremental else "full",
                          "reason": p.reason, "read": p.read, "stored": p.stored,
                          "new_chunks": p.new_chunks, "chunks": p.index.chunks,
                          "index_sha256": sha})
        manifest = {
            "format": 1, "id": bid, "domain": rec.name, "uuid": rec.uuid,
            "created": time.time(), "host": socket.gethostname(),
            "mode": "incremental" if all(p.incremental for p in plans) else "full",
            "consistency": consistency, "duration_s": round(took, 3),
            "read": sum(p.read for p in plans), "stored": sum(p.stored for p in plans),
            "size": sum(p.size for p in plans), "disks": disks,
            "config": rec.config.model_dump(mode="json"),
        }
        try:
            await asyncio.to_thread(store.commit, rec.name, bid, manifest)
        except OSError as exc:
            raise store_error(exc, store.root) from None
        log.info("%s: backup %s to %s: %s, read %d, stored %d bytes in %.1f s", rec.name, bid,
                 store.root, manifest["mode"], manifest["read"], manifest["stored"], took)
        return {k: v for k, v in manifest.items() if k != "config"} | {"store": str(store.root)}

    # ----- a running domain ---------------------------------------------------------------

    async def _online(self, vm: Vm, store: ChunkStore, bid: str, last: dict[str, Any] | None,
                      full: bool, commit: Commit) -> dict[str, Any]:
        mon = vm.monitor
        nodes = await hotplug.block_nodes(mon)
        plans = []
        for spec in backup_disks(vm.rec.config):
            node = nodes.get(spec.vdev)
            if node is None:
                raise QemuError(f"QEMU has no disk {spec.vdev}")
            bitmaps = [{"name": b["name"], "inconsistent": bool(b.get("inconsistent"))}
                       for b in node.bitmaps]
            plans.append(plan_disk(spec, node.size, bitmaps, store, last, bid, full))
        sock = vm.rundir / "backup-nbd.sock"
        fleeces: list[str] = []
        jobs: list[str] = []
        started = False
        try:
            for p in plans:
                overlay = vm.rundir / f"fleece-{p.vdev}.qcow2"
                await qemuimg.create(str(overlay), "qcow2", p.size)
                confine.give(overlay, vm.uid)
                await mon.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": f"fleece-{p.vdev}",
                    "file": {"driver": "file", "filename": vm.qemu_path(overlay)},
                    "backing": nodes[p.vdev].node})
                fleeces.append(p.vdev)
            actions: list[dict[str, Any]] = []
            for p in plans:
                name = nodes[p.vdev].node
                if p.new:
                    actions.append({"type": "block-dirty-bitmap-add", "data": {
                        "node": name, "name": p.new, "persistent": True}})
                if p.old:
                    actions.append({"type": "block-dirty-bitmap-disable",
                                    "data": {"node": name, "name": p.old}})
                actions.append({"type": "blockdev-backup", "data": {
                    "job-id": f"fleece-{p.vdev}", "device": name,
                    "target": f"fleece-{p.vdev}", "sync": "none"}})
            consistency = await self._point_in_time(vm, actions)
            started = True
            jobs = [f"fleece-{p.vdev}" for p in plans]
            await mon.execute("nbd-server-start", {"addr": {"type": "unix", "data": {
                "path": vm.qemu_path(sock)}}})
            for p in plans:
                await mon.execute("block-export-add", {
                    "type": "nbd", "id": f"backup-{p.vdev}", "node-name": f"fleece-{p.vdev}",
                    "name": p.vdev, "writable": False,
                    **({"bitmaps": [p.old]} if p.old else {})})
            for p in plans:
                await asyncio.to_thread(read_disk, sock, p.vdev, p, store)
            await self._unfleece(vm, plans, fleeces, jobs, sock)
            fleeces, jobs = [], []
            summary = await commit(plans, consistency)
        except BaseException:
            await self._unfleece(vm, plans, fleeces, jobs, sock)
            await self._undo(vm, plans, nodes, started)
            raise
        for p in plans:            # the backup exists: the old bitmaps are done with
            for name in [*([p.old] if p.old else []), *p.stale]:
                with contextlib.suppress(QemuError):
                    await mon.execute("block-dirty-bitmap-remove",
                                      {"node": nodes[p.vdev].node, "name": name})
        return summary

    async def _point_in_time(self, vm: Vm, actions: list[dict[str, Any]]) -> str:
        """Run the transaction, inside a filesystem freeze if the guest has an agent."""
        if vm.rec.state == "running" and await self.m.guests.connected(vm):
            async with self.m.guests.agent(vm.rec.uuid, timeout=30) as ga:
                await ga.fsfreeze()
                try:
                    await vm.monitor.execute("transaction", {"actions": actions})
                finally:
                    await ga.fsthaw()
            return "frozen"
        await vm.monitor.execute("transaction", {"actions": actions})
        return "crash"

    async def _undo(self, vm: Vm, plans: list[Plan], nodes: dict[str, hotplug.BlockNode],
                    started: bool) -> None:
        """A failed backup: no change may be lost to the next one (the new bitmap goes back
        into the old), and the chunks it wrote go."""
        for p in plans:
            for path in p.written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if not started or not p.new:
                continue
            node = nodes[p.vdev].node
            with contextlib.suppress(QemuError):
                if p.old:
                    await vm.monitor.execute("block-dirty-bitmap-merge", {
                        "node": node, "target": p.old, "bitmaps": [p.new]})
                    await vm.monitor.execute("block-dirty-bitmap-enable",
                                             {"node": node, "name": p.old})
                await vm.monitor.execute("block-dirty-bitmap-remove",
                                         {"node": node, "name": p.new})

    async def _unfleece(self, vm: Vm, plans: list[Plan], fleeces: list[str], jobs: list[str],
                        sock: Path) -> None:
        mon = vm.monitor
        for p in plans:
            with contextlib.suppress(QemuError):
                await mon.execute("block-export-del", {"id": f"backup-{p.vdev}",
                                                       "mode": "hard"})
        with contextlib.suppress(QemuError):
            await mon.execute("nbd-server-stop")
        for job in jobs:
            with contextlib.suppress(QemuError):
                await mon.execute("block-job-cancel", {"device": job, "force": True})
        deadline = time.monotonic() + 30
        while jobs and time.monotonic() < deadline:
            running = {j["device"] for j in await mon.execute("query-block-jobs")}
            if not running & set(jobs):
                break
            await asyncio.sleep(0.02)
        for vdev in fleeces:
            for _ in range(50):       # the export may still hold the node for a moment
                try:
                    await mon.execute("blockdev-del", {"node-name": f"fleece-{vdev}"})
                    break
                except QemuError:
                    await asyncio.sleep(0.05)
            with contextlib.suppress(OSError):
                (vm.rundir / f"fleece-{vdev}.qcow2").unlink()
        with contextlib.suppress(OSError):
            sock.unlink()

    # ----- a stopped domain ---------------------------------------------------------------

    async def _offline(self, rec: DomainRecord, store: ChunkStore, bid: str,
                       last: dict[str, Any] | None, full: bool,
                       commit: Commit) -> dict[str, Any]:
        plans = []
        for spec in backup_disks(rec.config):
            info = await qemuimg.info(spec.target, spec.format)
            plans.append(plan_disk(spec, int(info["virtual-size"]), qemuimg.bitmaps(info),
                                   store, last, bid, full))
        added: list[Plan] = []
        try:
            for p in plans:
                if p.new:
                    await qemuimg.bitmap(p.spec.target, "--add", p.new)
                    added.append(p)
                await self._read_offline(p, store)
            summary = await commit(plans, "offline")
        except BaseException:
            for p in plans:
                for path in p.written:
                    with contextlib.suppress(OSError):
                        path.unlink()
            for p in added:
                with contextlib.suppress(GridvmError):
                    await qemuimg.bitmap(p.spec.target, "--remove", str(p.new))
            raise
        for p in plans:
            for name in [*([p.old] if p.old else []), *p.stale]:
                with contextlib.suppress(GridvmError):
                    await qemuimg.bitmap(p.spec.target, "--remove", name)
        return summary

    async def _read_offline(self, p: Plan, store: ChunkStore) -> None:
        """A stopped domain's disk through qemu-nbd (read-only, with the old bitmap)."""
        sock = Path(self.m.home.run) / f"backup-{os.getpid()}-{p.vdev}.sock"
        with serve_nbd(sock, p.spec.target, p.spec.format, p.vdev, bitmap=p.old):
            await asyncio.to_thread(wait_socket, sock)
            await asyncio.to_thread(read_disk, sock, p.vdev, p, store)


@contextlib.contextmanager
def serve_nbd(sock: Path, target: str, fmt: str, export: str, *, bitmap: str | None = None,
              writable: bool = False) -> Iterator[None]:
    """`qemu-nbd` serving one image on a Unix socket for the duration."""
    import subprocess

    sock.unlink(missing_ok=True)
    argv = ["qemu-nbd", "-f", fmt, "-x", export, "-k", str(sock), "--shared=1",
            "--cache=writeback" if writable else "--read-only",
            *(["-B", bitmap] if bitmap else []), target]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        sock.unlink(missing_ok=True)
    if proc.returncode not in (0, -15) and err:
        raise GridvmError(f"qemu-nbd {target}: {err.decode(errors='replace').strip()[-200:]}")


def wait_socket(sock: Path, timeout: float = NBD_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if time.monotonic() > deadline:
            raise GridvmError(f"qemu-nbd did not open {sock} within {timeout:.0f}s")
        time.sleep(0.02)
