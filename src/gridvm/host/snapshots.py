"""Snapshots of a domain: its disks (consistent: filesystems frozen through the guest agent
for the instant of the snapshot) or, with `memory`, its whole running state; revert, delete,
and a tree of parents and children.

Snapshots are qcow2 *internal* snapshots, one tag per disk, made atomically across disks in
one QMP transaction (memory ones with QEMU's snapshot-save/-load jobs). Why internal rather
than chains of external overlays (libvirt's default for disk-only snapshots):

- the active image stays the same file, so the persistent dirty bitmaps that incremental
  backups rely on keep tracking writes; an overlay chain would need bitmaps carried from
  layer to layer at every snapshot (libvirt's bitmap-chain merging);
- a domain on shared storage migrates or is restarted by HA elsewhere with its snapshots
  inside its disks, with no chain of files to keep in step;
- revert, delete and branching (a new snapshot after a revert) are single operations on
  the live image; a memory snapshot reverts the running QEMU in place.

Proxmox makes the same choice for qcow2 on directory storage. The costs: a memory snapshot
stops the guest while its RAM is written (not live); `migrate --copy-storage` copies only the
active layer, so it is refused while a domain has snapshots; reverting needs the disks'
dirty bitmaps removed (QEMU refuses otherwise), so the next backup is a full one.

The tree, each snapshot's domain config (the device set to come back to) and the current
snapshot are kept beside the first disk (`<disk>.gridvm-snapshots.json`), so they travel with
the disks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from gridvm.config.model import DiskSpec, DomainConfig
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host import confine, qemuimg
from gridvm.host.devices import validated
from gridvm.host.vm import Vm
from gridvm.lifecycle import S
from gridvm.qemu import blockops, hotplug
from gridvm.qemu.guestagent import GuestAgent
from gridvm.store.records import DomainRecord

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.snapshots")

SIDECAR = ".gridvm-snapshots.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
THAW_TRIES = 3


class Snapshot(BaseModel):
    name: str
    parent: str | None = None
    created: float
    memory: bool = False
    state: Literal["running", "paused", "shutoff"]
    consistency: Literal["frozen", "crash", "memory", "offline"]
    stall_ms: float | None = None
    disks: list[str]                  # vdevs with the snapshot
    vmstate: str | None = None        # the vdev that holds the memory
    config: DomainConfig              # the domain at the snapshot


class Tree(BaseModel):
    current: str | None = None
    snapshots: dict[str, Snapshot] = Field(default_factory=dict)


def snapshot_disks(cfg: DomainConfig) -> list[DiskSpec]:
    """The disks a snapshot covers: writable ones (read-only disks and CD-ROMs do not change)."""
    return [d for d in cfg.disks if d.mode == "w" and d.devtype == "disk"]


def hardware(cfg: DomainConfig) -> tuple[Any, ...]:
    """What must match for a memory snapshot to load into a running QEMU."""
    return (cfg.type, cfg.max_memory, cfg.vcpus, cfg.max_vcpus, cfg.display.card,
            tuple((d.vdev, d.target, d.format, d.devtype, d.slot) for d in cfg.disks),
            tuple((v.mac, v.model, v.slot) for v in cfg.vifs))


def sidecar(cfg: DomainConfig, home_dir: Path) -> Path:
    """Where the domain's snapshot tree is kept: beside its first disk that has one (or
    else its first disk); under the home for disks that are block devices."""
    paths = []
    for d in snapshot_disks(cfg):
        if Path(d.target).is_block_device():
            paths.append(home_dir / f"{cfg.uuid}{SIDECAR}")
        else:
            paths.append(Path(d.target + SIDECAR))
    found = next((p for p in paths if p.exists()), None)
    return found or (paths[0] if paths else home_dir / f"{cfg.uuid}{SIDECAR}")


def load_tree(path: Path) -> Tree:
    if not path.exists():
        return Tree()
    try:
        return Tree.model_validate_json(path.read_bytes())
    except (ValidationError, OSError) as exc:
        raise GridvmError(f"{path}: unreadable snapshot tree ({type(exc).__name__})") from None


def save_tree(path: Path, tree: Tree) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(tree.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Snapshots:
    """Snapshots of one host's domains."""

    def __init__(self, manager: HostManager) -> None:
        self.m = manager

    def _tree(self, cfg: DomainConfig) -> tuple[Path, Tree]:
        path = sidecar(cfg, self.m.home.root / "snapshots")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, load_tree(path)

    def _save(self, rec: DomainRecord, cfg: DomainConfig) -> None:
        rec.config = cfg
        self.m.store.put(rec)

    # ----- create -------------------------------------------------------------------------

    async def create(self, ref: str, name: str, *, memory: bool = False,
                     convert: bool = False) -> dict[str, Any]:
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid snapshot name {name[:80]!r} (letters, digits, '.', "
                              "'_', '-'; up to 63)")
        rec = self.m.lookup(ref)
        if not snapshot_disks(rec.config):
            raise Conflict(f"domain {rec.name} has no writable disk to snapshot")
        vm = self.m.vms.get(rec.uuid)
        if vm is None:
            if memory:
                raise Conflict(f"domain {rec.name} is not running: a --memory snapshot needs "
                               "a running domain")
            return await self._create_offline(rec, name, convert)
        async with self.m.operation(ref, "snapshot") as vm:
            return await self._create_live(vm, name, memory, convert)

    def _raw(self, cfg: DomainConfig, convert: bool) -> list[DiskSpec]:
        raw = [d for d in snapshot_disks(cfg) if d.format != "qcow2"]
        if raw and not convert:
            d = raw[0]
            raise Conflict(f"disk {d.vdev} ({d.target}) is raw; snapshots need qcow2: run "
                           "again with --convert to convert it (the raw file is kept)")
        for d in raw:
            new = _qcow2_path(d.target)
            if os.path.lexists(new):
                raise Conflict(f"disk {d.vdev}: cannot convert to {new}: it exists")
        return raw

    def _check_new(self, tree: Tree, name: str, tags: dict[str, list[str]]) -> None:
        if name in tree.snapshots or any(name in t for t in tags.values()):
            raise Conflict(f"snapshot {name!r} already exists")

    async def _create_offline(self, rec: DomainRecord, name: str,
                              convert: bool) -> dict[str, Any]:
        path, tree = self._tree(rec.config)
        raw = self._raw(rec.config, convert)
        tags = {d.vdev: qemuimg.snapshot_tags(await qemuimg.info(d.target, d.format))
                for d in snapshot_disks(rec.config) if d.format == "qcow2"}
        self._check_new(tree, name, tags)
        cfg = rec.config
        for d in raw:
            new = _qcow2_path(d.target)
            await qemuimg.convert(d.target, d.format, new, "qcow2")
            cfg = _retarget(cfg, d.vdev, new)
            log.info("%s: converted %s to %s", rec.name, d.target, new)
        if raw:
            self._save(rec, cfg)
            path, tree = self._tree(cfg)
        done: list[str] = []
        try:
            for d in snapshot_disks(cfg):
                await qemuimg.snapshot(d.target, "c", name)
                done.append(d.target)
        except BaseException:
            for target in done:
                with contextlib.suppress(GridvmError):
                    await qemuimg.snapshot(target, "d", name)
            raise
        return self._record(path, tree, cfg, name, memory=False, state="shutoff",
                            consistency="offline", stall=None)

    async def _convert_live(self, vm: Vm, vdev: str, node: str, size: int, new: str) -> None:
        """A raw disk copied into qcow2 image `new` while the guest runs; a confined QEMU
        gets the image gridvmd made, as descriptors, opened as node vbd-VDEV-qcow2."""
        if vm.uid is None:
            await blockops.convert_live(vm.monitor, node, new)
            return
        if Path(new).exists():
            raise Conflict(f"{new} already exists")
        await qemuimg.create(new, "qcow2", size)
        try:
            fds = await confine.hand_disk(vm.monitor, new, "qcow2", writable=True)
            target = hotplug.converted_node(vdev)
            await vm.monitor.execute("blockdev-add", {
                "driver": "qcow2", "node-name": target, "cache": {"direct": True},
                **fds.blockdev_file()})
            try:
                await blockops.convert_live(vm.monitor, node, target, target_node=True)
            except BaseException:
                with contextlib.suppress(GridvmError):
                    await vm.monitor.execute("blockdev-del", {"node-name": target})
                raise
        except BaseException:
            with contextlib.suppress(GridvmError):
                await confine.forget_file(vm.monitor, new)
            Path(new).unlink(missing_ok=True)
            raise

    async def _create_live(self, vm: Vm, name: str, memory: bool,
                           convert: bool) -> dict[str, Any]:
        path, tree = self._tree(vm.rec.config)
        raw = self._raw(vm.rec.config, convert)
        nodes = await hotplug.block_nodes(vm.monitor)
        self._check_new(tree, name, {v: [s["name"] for s in n.snapshots]
                                     for v, n in nodes.items()})
        for d in raw:
            new = _qcow2_path(d.target)
            await self._convert_live(vm, d.vdev, nodes[d.vdev].node, nodes[d.vdev].size, new)
            self._save(vm.rec, _retarget(vm.rec.config, d.vdev, new))
            log.info("%s: converted %s to %s while it ran", vm.name, d.target, new)
        if raw:
            nodes = await hotplug.block_nodes(vm.monitor)
            path, tree = self._tree(vm.rec.config)
        cfg = vm.rec.config
        disks = snapshot_disks(cfg)
        names = [nodes[d.vdev].node for d in disks]
        state: Literal["running", "paused"] = "running" if await vm.status() == "running" \
            else "paused"
        if memory:
            started = time.monotonic()
            await blockops.save_vm(vm.monitor, name, names[0], names)
            stall, consistency = time.monotonic() - started, "memory"
        elif await self.m.guests.connected(vm) and state == "running":
            async with self.m.guests.agent(vm.rec.uuid, timeout=30) as ga:
                stall = await _frozen(ga, lambda: blockops.snapshot_disks(vm.monitor, names,
                                                                          name))
            consistency = "frozen"
        else:
            started = time.monotonic()
            await blockops.snapshot_disks(vm.monitor, names, name)
            stall, consistency = time.monotonic() - started, "crash"
        log.info("%s: snapshot %s (%s, %s, %.1f ms)", vm.name, name,
                 "memory" if memory else "disks", consistency, stall * 1000)
        return self._record(path, tree, cfg, name, memory=memory, state=state,
                            consistency=consistency, stall=stall)

    def _record(self, path: Path, tree: Tree, cfg: DomainConfig, name: str, *, memory: bool,
                state: str, consistency: str, stall: float | None) -> dict[str, Any]:
        disks = [d.vdev for d in snapshot_disks(cfg)]
        snap = Snapshot.model_validate({
            "name": name, "parent": tree.current, "created": time.time(), "memory": memory,
            "state": state, "consistency": consistency,
            "stall_ms": None if stall is None else round(stall * 1000, 2), "disks": disks,
            "vmstate": disks[0] if memory else None, "config": cfg.model_dump()})
        tree.snapshots[name] = snap
        tree.current = name
        save_tree(path, tree)
        return snap.model_dump(exclude={"config"})

    # ----- list ---------------------------------------------------------------------------

    def tree(self, ref: str) -> dict[str, Any]:
        rec = self.m.lookup(ref)
        _, tree = self._tree(rec.config)
        rows = []
        for snap in sorted(tree.snapshots.values(), key=lambda s: s.created):
            rows.append({**snap.model_dump(exclude={"config"}),
                         "children": [c.name for c in tree.snapshots.values()
                                      if c.parent == snap.name],
                         "current": snap.name == tree.current})
        return {"domain": rec.name, "current": tree.current, "snapshots": rows}

    # ----- revert -------------------------------------------------------------------------

    def _find(self, rec: DomainRecord, name: str) -> tuple[Path, Tree, Snapshot]:
        path, tree = self._tree(rec.config)
        snap = tree.snapshots.get(name)
        if snap is None:
            known = ", ".join(tree.snapshots) or "none"
            raise NotFound(f"domain {rec.name} has no snapshot {name!r} (snapshots: {known})")
        return path, tree, snap

    def _target_config(self, rec: DomainRecord, snap: Snapshot) -> DomainConfig:
        """The snapshot's config under the domain's current name and UUID."""
        return validated(snap.config, name=rec.config.name, uuid=rec.config.uuid)

    async def _check_tags(self, cfg: DomainConfig, snap: Snapshot) -> None:
        """Every disk of the snapshot still has it (checked before anything changes)."""
        for d in cfg.disks:
            if d.vdev in snap.disks:
                info = await qemuimg.info(d.target, shared=True)
                if snap.name not in qemuimg.snapshot_tags(info):
                    raise NotFound(f"disk {d.vdev} ({d.target}) no longer has snapshot "
                                   f"{snap.name!r}; nothing was changed")

    async def revert(self, ref: str, name: str) -> dict[str, Any]:
        """Back to snapshot `name`: a memory snapshot resumes the guest where it was; a
        disk snapshot restarts a running domain on the snapshot's disks."""
        rec = self.m.lookup(ref)
        path, tree, snap = self._find(rec, name)
        target = self._target_config(rec, snap)
        vm = self.m.vms.get(rec.uuid)
        if vm is not None and snap.memory and hardware(vm.rec.config) == hardware(target):
            async with self.m.operation(ref, "revert") as vm:
                nodes = await hotplug.block_nodes(vm.monitor)
                names = []
                for vdev in snap.disks:
                    node = nodes.get(vdev)
                    if node is None or name not in [s["name"] for s in node.snapshots]:
                        raise NotFound(f"disk {vdev} no longer has snapshot {name!r}; "
                                       "nothing was changed")
                    names.append(node.node)
                for vdev in snap.disks:
                    gone = [str(b["name"]) for b in nodes[vdev].bitmaps]
                    await blockops.remove_bitmaps(vm.monitor, nodes[vdev].node, gone)
                vmstate = nodes[snap.vmstate or snap.disks[0]].node
                await blockops.load_vm(vm.monitor, name, vmstate, names)
                await self._settle(vm, snap)
                self._save(vm.rec, target)
            how = "resumed where it was"
        else:
            await self._check_tags(target, snap)
            running = vm is not None
            if vm is not None:
                await self._stop(vm)
            rec = self.m.lookup(rec.uuid)
            for d in target.disks:
                if d.vdev in snap.disks:
                    for b in qemuimg.bitmaps(await qemuimg.info(d.target)):
                        await qemuimg.bitmap(d.target, "--remove", b["name"])
                    if not snap.memory:
                        await qemuimg.snapshot(d.target, "a", name)
            self._save(rec, target)
            if snap.memory:
                await self._launch_into(rec, snap)
                how = "restarted where it was"
            elif running:
                await self.m._launch(rec)
                how = "restarted on the snapshot's disks"
            else:
                how = "disks reverted; the domain stays shut off"
        tree.current = name
        save_tree(path, tree)
        log.info("%s: reverted to %s (%s)", rec.name, name, how)
        return {"domain": rec.name, "snapshot": name, "memory": snap.memory, "how": how}

    async def _settle(self, vm: Vm, snap: Snapshot) -> None:
        """The guest's run state as it was at the snapshot."""
        status = await vm.status()
        if snap.state == "running" and status != "running":
            await vm.monitor.execute("cont")
        elif snap.state == "paused" and status == "running":
            await vm.monitor.execute("stop")
        self.m.set_state(vm.rec, S.RUNNING if snap.state == "running" else S.PAUSED,
                         f"reverted to snapshot {snap.name}", persist=False)

    async def _stop(self, vm: Vm) -> None:
        """Stop the domain's QEMU, keeping its record (transient ones too)."""
        async with self.m.operation(vm.rec.uuid, "revert") as vm:
            managed = vm.rec.managed
            vm.rec.managed = True           # _retire keeps a managed record
            await self.m._teardown(vm, reason="revert")
            rec = self.m.lookup(vm.rec.uuid)
            rec.managed = managed
            self.m.store.put(rec)

    async def _launch_into(self, rec: DomainRecord, snap: Snapshot) -> None:
        """A fresh QEMU with the snapshot's devices, paused, loaded with its state."""
        vm = await self.m._launch(rec, paused=True)
        try:
            nodes = await hotplug.block_nodes(vm.monitor)
            names = [nodes[v].node for v in snap.disks]
            await blockops.load_vm(vm.monitor, snap.name, nodes[snap.vmstate or
                                                                snap.disks[0]].node, names)
            await self._settle(vm, snap)
            self.m.store.put(vm.rec)
        except BaseException:
            await self._stop(vm)
            raise

    # ----- delete -------------------------------------------------------------------------

    async def delete(self, ref: str, name: str) -> None:
        rec = self.m.lookup(ref)
        path, tree, snap = self._find(rec, name)
        vm = self.m.vms.get(rec.uuid)
        if vm is not None:
            async with self.m.operation(ref, "snapshot-delete") as vm:
                nodes = await hotplug.block_nodes(vm.monitor)
                for vdev in snap.disks:
                    node = nodes.get(vdev)
                    if node is not None and name in [s["name"] for s in node.snapshots]:
                        await blockops.delete_snapshot(vm.monitor, node.node, name)
        else:
            for d in rec.config.disks:
                if d.vdev in snap.disks and d.format == "qcow2" and \
                        name in qemuimg.snapshot_tags(await qemuimg.info(d.target)):
                    await qemuimg.snapshot(d.target, "d", name)
        for child in tree.snapshots.values():
            if child.parent == name:
                child.parent = snap.parent
        if tree.current == name:
            tree.current = snap.parent
        del tree.snapshots[name]
        save_tree(path, tree)
        log.info("%s: deleted snapshot %s", rec.name, name)


def count(cfg: DomainConfig, home_root: Path) -> int:
    """How many snapshots the domain has (by its tree)."""
    return len(load_tree(sidecar(cfg, home_root / "snapshots")).snapshots)


async def _frozen(ga: GuestAgent, action: Any) -> float:
    """Run `action` with the guest's filesystems frozen; seconds from freeze to thaw."""
    started = time.monotonic()
    await ga.fsfreeze()
    try:
        await action()
    finally:
        for attempt in range(THAW_TRIES):
            try:
                await ga.fsthaw()
                break
            except GridvmError as exc:
                if attempt == THAW_TRIES - 1:
                    raise GridvmError(f"the guest's filesystems may still be frozen ({exc}); "
                                      "thaw them with gridvm guest-fsfreeze DOM thaw") from exc
    return time.monotonic() - started


def _qcow2_path(target: str) -> str:
    base, ext = os.path.splitext(target)
    return (base if ext in (".img", ".raw") else target) + ".qcow2"


def _retarget(cfg: DomainConfig, vdev: str, path: str) -> DomainConfig:
    disks = [d.model_dump() | ({"target": path, "format": "qcow2"} if d.vdev == vdev else {})
             for d in cfg.disks]
    return validated(cfg, disks=disks)
