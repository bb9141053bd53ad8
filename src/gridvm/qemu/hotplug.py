"""QMP for devices that come and go while QEMU runs: disks (blockdev-add + device_add),
NICs (netdev_add + device_add), vCPUs, and what QEMU says is plugged where (PCI slots,
block nodes, NICs and their taps). Every argument is JSON, so nothing needs escaping here;
the values come from the validated domain model.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridvm.config.model import PCI_SLOTS, DiskSpec, VifSpec
from gridvm.errors import Conflict, QemuError
from gridvm.qemu.argv import drive_id
from gridvm.qemu.confine import DiskFds
from gridvm.qemu.qmp import Monitor

UNPLUG_S = 30.0       # a guest releases an unplugged device (ACPI eject) within this


@dataclass(frozen=True)
class BlockNode:
    """A guest disk as QEMU has it: the format node, its image and dirty bitmaps."""

    vdev: str
    node: str
    file: str
    format: str
    size: int
    bitmaps: tuple[dict[str, Any], ...]
    snapshots: tuple[dict[str, Any], ...]


def _vdev_of(qdev: str) -> str:
    """`/machine/peripheral/xvda/virtio-backend` or `xvda` -> `xvda`."""
    parts = [p for p in qdev.split("/") if p]
    if "peripheral" in parts and parts.index("peripheral") + 1 < len(parts):
        return parts[parts.index("peripheral") + 1]
    return parts[0] if parts else ""


async def block_nodes(mon: Monitor) -> dict[str, BlockNode]:
    """The guest's disks by vdev (the device id), with media inserted."""
    out: dict[str, BlockNode] = {}
    for b in await mon.execute("query-block"):
        ins = b.get("inserted")
        if not ins or not b.get("qdev"):
            continue
        vdev = _vdev_of(str(b["qdev"]))
        image = ins.get("image", {})
        out[vdev] = BlockNode(vdev, str(ins["node-name"]), str(ins.get("file", "")),
                              str(ins.get("drv", "")), int(image.get("virtual-size", 0)),
                              tuple(ins.get("dirty-bitmaps", ()) or b.get("dirty-bitmaps", ())),
                              tuple(image.get("snapshots", ())))
    return out


async def pci_slots(mon: Monitor) -> tuple[dict[str, int], set[int]]:
    """(device id -> slot, every slot in use) on the root PCI bus."""
    buses = await mon.execute("query-pci")
    ids: dict[str, int] = {}
    used: set[int] = set()
    for dev in buses[0]["devices"]:
        used.add(int(dev["slot"]))
        if dev.get("qdev_id"):
            ids[str(dev["qdev_id"])] = int(dev["slot"])
    return ids, used


def free_slot(used: set[int]) -> int:
    slot = next((n for n in range(PCI_SLOTS[0], PCI_SLOTS[1] + 1) if n not in used), None)
    if slot is None:
        raise Conflict("no free PCI slot left for another device")
    return slot


async def nic_ids(mon: Monitor) -> dict[str, str]:
    """MAC -> device id of the NICs QEMU has (`nicN`)."""
    names = [p["name"] for p in await mon.execute("qom-list", {"path": "/machine/peripheral"})
             if re.fullmatch(r"nic\d+", str(p["name"]))]
    macs: dict[str, str] = {}
    for name in names:
        mac = await mon.execute("qom-get", {"path": f"/machine/peripheral/{name}",
                                            "property": "mac"})
        macs[str(mac).lower()] = str(name)
    return macs


async def live_taps(mon: Monitor) -> dict[str, str]:
    """MAC -> tap name of every NIC QEMU has now (hot-plugged ones included), from
    `info network` (QMP has no query for netdevs before QEMU 8)."""
    text = str(await mon.execute("human-monitor-command",
                                 {"command-line": "info network"}))
    taps: dict[str, str] = {}
    mac: str | None = None
    for line in text.splitlines():
        found = re.search(r"macaddr=([0-9a-fA-F:]{17})", line)
        if found:
            mac = found.group(1).lower()
            continue
        tap = re.search(r"type=tap,ifname=([^,\s]+)", line)
        if tap and mac is not None:
            taps[mac] = tap.group(1)
            mac = None
    return taps


async def wait_deleted(mon: Monitor, dev_id: str, what: str) -> None:
    """device_del `dev_id` and wait until the guest has let it go (DEVICE_DELETED)."""
    async with mon.listen("DEVICE_DELETED") as events:
        await mon.execute("device_del", {"id": dev_id})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNPLUG_S
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise Conflict(f"the guest did not release {what} within {UNPLUG_S:.0f} s "
                               "(it needs ACPI hotplug support); it stays attached, and may "
                               "still go once the guest answers")
            try:
                event = await asyncio.wait_for(events.get(), left)
            except TimeoutError:
                continue
            data: dict[str, Any] = dict(event).get("data") or {}  # type: ignore[assignment]
            if data.get("device") == dev_id or data.get("path") == dev_id:
                return


# ----- disks ------------------------------------------------------------------------------


async def add_disk(mon: Monitor, spec: DiskSpec, slot: int, queues: int,
                   fds: DiskFds | None = None) -> None:
    """A virtio disk on `slot` with `queues` queues (as `argv.Disk` would give it): its
    image opened as node vbd-<vdev> (by path, or from the fd sets `fds`), then the device."""
    node = drive_id(spec.vdev)
    block = Path(spec.target).is_block_device()
    files: dict[str, Any] = fds.blockdev_file() if fds else {"file": {
        "driver": "host_device" if block else "file", "filename": spec.target,
        "aio": "threads"}}
    options: dict[str, Any] = {
        "driver": spec.format, "node-name": node, "read-only": spec.mode == "r",
        "cache": {"direct": True, "no-flush": False}, **files,
    }
    await mon.execute("blockdev-add", options)
    try:
        await mon.execute("device_add", {"driver": "virtio-blk-pci", "drive": node,
                                         "id": spec.vdev, "serial": spec.vdev,
                                         "num-queues": queues, "addr": f"0x{slot:x}"})
    except QemuError:
        await mon.execute("blockdev-del", {"node-name": node})
        raise
    limits = {k: getattr(spec, k) or 0 for k in ("bps", "bps_rd", "bps_wr", "iops",
                                                 "iops_rd", "iops_wr")}
    if any(limits.values()):
        await mon.execute("block_set_io_throttle", {"id": spec.vdev, **limits})


def converted_node(vdev: str) -> str:
    """The node a raw disk converted to qcow2 while running lives on (a confined QEMU's)."""
    return f"{drive_id(vdev)}-qcow2"


async def remove_disk(mon: Monitor, vdev: str) -> None:
    """Unplug a disk and drop its node (a -drive disk's backend goes with its device)."""
    await wait_deleted(mon, vdev, f"disk {vdev}")
    nodes = {n["node-name"] for n in await mon.execute("query-named-block-nodes")}
    for node in (drive_id(vdev), converted_node(vdev)):
        if node in nodes:
            await mon.execute("blockdev-del", {"node-name": node})


# ----- NICs -------------------------------------------------------------------------------


async def add_nic(mon: Monitor, vif: VifSpec, model: str, tap: str, index: int,
                  slot: int) -> None:
    await mon.execute("netdev_add", {"type": "tap", "id": f"vif{index}", "ifname": tap,
                                     "script": "no", "downscript": "no"})
    try:
        await mon.execute("device_add", {"driver": model, "netdev": f"vif{index}",
                                         "mac": vif.mac, "id": f"nic{index}",
                                         "addr": f"0x{slot:x}"})
    except QemuError:
        await mon.execute("netdev_del", {"id": f"vif{index}"})
        raise


async def remove_nic(mon: Monitor, nic: str) -> None:
    netdev = await mon.execute("qom-get", {"path": f"/machine/peripheral/{nic}",
                                           "property": "netdev"})
    await wait_deleted(mon, nic, f"NIC {nic}")
    if netdev:
        await mon.execute("netdev_del", {"id": str(netdev)})


# ----- vCPUs ------------------------------------------------------------------------------


async def hotpluggable_cpus(mon: Monitor) -> list[dict[str, Any]]:
    """QEMU's vCPU sockets, in index order (present ones carry a `qom-path`)."""
    cpus = list(await mon.execute("query-hotpluggable-cpus"))

    def key(c: dict[str, Any]) -> tuple[int, ...]:
        p = c["props"]
        return (p.get("node-id", 0), p.get("socket-id", 0), p.get("die-id", 0),
                p.get("core-id", 0), p.get("thread-id", 0))

    return sorted(cpus, key=key)


async def set_cpus(mon: Monitor, count: int, *, can_add: bool = True) -> tuple[int, int]:
    """Plug or unplug vCPUs until `count` are present; (added, removed)."""
    cpus = await hotpluggable_cpus(mon)
    present = [c for c in cpus if c.get("qom-path")]
    added = removed = 0
    if count > len(present) and not can_add:
        raise Conflict("a vCPU was unplugged from this QEMU, and QEMU 7 under TCG crashes when "
                       "vCPUs are plugged in after that; restart the domain (it boots with "
                       "the vCPUs it has now) to add vCPUs again")
    for index, cpu in enumerate(cpus):
        if len(present) + added >= count:
            break
        if cpu.get("qom-path"):
            continue
        await mon.execute("device_add", {"driver": cpu["type"], "id": f"cpu{index}",
                                         **cpu["props"]})
        added += 1
    for cpu in reversed(present[1:]):      # the boot processor stays
        if len(present) - removed <= count:
            break
        await _unplug_cpu(mon, str(cpu["qom-path"]))
        removed += 1
    return added, removed


async def _unplug_cpu(mon: Monitor, path: str) -> None:
    """Ask the guest to eject a vCPU; wait until QEMU has removed it (QEMU 7 sends no
    DEVICE_DELETED for the CPU itself, only for its local APIC)."""
    await mon.execute("device_del", {"id": path})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UNPLUG_S
    while loop.time() < deadline:
        if not any(c.get("qom-path") == path for c in await hotpluggable_cpus(mon)):
            return
        await asyncio.sleep(0.2)
    raise Conflict(f"the guest did not release a vCPU within {UNPLUG_S:.0f} s (it needs "
                   "ACPI CPU hotplug); it stays, and may still go once the guest answers")
