"""Device hotplug with Xen's verbs: block-attach/-detach/-list, network-attach/-detach/-list
and vcpu-set.

A running domain gets the device at once (ACPI PCI hotplug, CPU hotplug); its record keeps
the change, so a managed domain starts with it next time and migration and save/restore
carry the current device set. Before the first change the PCI slots QEMU gave the domain's
disks and NICs are recorded in their specs (`slot`), so a destination or a restart
builds the same layout. A stopped managed domain only has its definition changed. Every new
config passes `DomainConfig.model_validate` (the model is the one validation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gridvm.config.macs import assign_macs
from gridvm.config.model import DiskSpec, DomainConfig, VifSpec
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host import confine, links, shaping
from gridvm.host.resources import vif_index
from gridvm.host.vm import Vm
from gridvm.images.store import template_of
from gridvm.qemu import hotplug
from gridvm.qemu.argv import is_virtio_disk, nic_model
from gridvm.qemu.qmp import Monitor
from gridvm.store.records import DomainRecord

if TYPE_CHECKING:
    from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.devices")
UNPLUGGED_MARK = "vcpu-unplugged"     # in the run directory: this QEMU has lost a vCPU


def validated(cfg: DomainConfig, **update: Any) -> DomainConfig:
    """`cfg` with `update`, through the model's validation (model_copy skips it)."""
    try:
        return DomainConfig.model_validate({**cfg.model_dump(), **update})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{cfg.name}: {where + ': ' if where else ''}{msg}") from None


def root_disk(cfg: DomainConfig) -> str | None:
    """The disk the domain boots from: the one `root=/dev/X…` names, else the first disk of
    a domain that boots from disks (HVM, pygrub, root=UUID=/LABEL=); None for an
    initramfs-only guest."""
    if not cfg.disks:
        return None
    cmdline = cfg.kernel_cmdline() if cfg.type != "hvm" else ""
    found = re.search(r"(?:^|\s)root=(\S+)", cmdline)
    if found and found.group(1).startswith("/dev/"):
        name = found.group(1).removeprefix("/dev/")
        for d in cfg.disks:
            if name == d.vdev or (name.startswith(d.vdev) and name[len(d.vdev):].isdigit()):
                return d.vdev
            # a PV guest sees xvdX / sdX / hdX as vdX (virtio)
            alias = re.sub(r"^(xvd|sd|hd)", "vd", d.vdev)
            if name == alias or (name.startswith(alias) and name[len(alias):].isdigit()):
                return d.vdev
        return None
    if cfg.type == "hvm" or cfg.bootloader or found:
        return cfg.disks[0].vdev
    return None


async def live_taps(mon: Monitor, cfg: DomainConfig, fallback: list[str]) -> list[str]:
    """The taps of a running domain in vif order, as QEMU has them (hot-plugged ones too);
    `fallback` (its command line's) if QEMU cannot say."""
    try:
        by_mac = await hotplug.live_taps(mon)
    except GridvmError:
        return fallback
    taps = [by_mac.get(v.mac or "") for v in cfg.vifs]
    return [t for t in taps if t] if all(taps) else fallback


class Devices:
    """Hotplug for one host's domains."""

    def __init__(self, manager: HostManager) -> None:
        self.m = manager

    def _stopped(self, ref: str, what: str) -> DomainRecord | None:
        """The record of a stopped managed domain, None if the domain runs."""
        rec = self.m.lookup(ref)
        if rec.uuid in self.m.vms:
            return None
        if not rec.managed:
            raise Conflict(f"domain {rec.name} is not running")
        return rec

    def _save(self, rec: DomainRecord, cfg: DomainConfig) -> None:
        rec.config = cfg
        self.m.store.put(rec)

    async def _recorded(self, vm: Vm) -> DomainConfig:
        """The config with every virtio disk's and NIC's PCI slot as QEMU has it now."""
        cfg = vm.rec.config
        ids, _ = await hotplug.pci_slots(vm.monitor)
        nics = await hotplug.nic_ids(vm.monitor)
        hvm = cfg.type == "hvm"
        disks = [d.model_dump() | ({"slot": ids[d.vdev]} if d.vdev in ids and
                                   is_virtio_disk(d, hvm) else {}) for d in cfg.disks]
        vifs = [v.model_dump() | ({"slot": ids[nics[v.mac]]} if v.mac in nics and
                                  nics[v.mac] in ids else {}) for v in cfg.vifs]
        return validated(cfg, disks=disks, vifs=vifs)

    # ----- disks --------------------------------------------------------------------------

    def block_list(self, ref: str) -> list[dict[str, Any]]:
        rec = self.m.lookup(ref)
        root = root_disk(rec.config)
        return [{"vdev": d.vdev, "target": d.target, "format": d.format, "mode": d.mode,
                 "devtype": d.devtype, "slot": d.slot, "root": d.vdev == root}
                for d in rec.config.disks]

    def _check_target(self, spec: DiskSpec) -> None:
        if not Path(spec.target).exists():
            raise NotFound(f"disk {spec.vdev}: {spec.target} does not exist")
        template = template_of(self.m.home.images, spec.target) if spec.mode == "w" else None
        if template is not None:
            raise Conflict(f"disk {spec.vdev}: {spec.target} is the read-only template "
                           f"{template}; attach a clone's disk instead")

    async def block_attach(self, ref: str, spec: DiskSpec) -> DiskSpec:
        """Plug a disk into a running domain (virtio), or add it to a stopped one."""
        self._check_target(spec)
        rec = self._stopped(ref, "block-attach")
        if rec is not None:
            self._save(rec, validated(rec.config, disks=[*rec.config.model_dump()["disks"],
                                                         spec.model_dump()]))
            return spec
        async with self.m.operation(ref, "block-attach") as vm:
            cfg = vm.rec.config
            if spec.devtype == "cdrom":
                raise Conflict(f"{spec.vdev}: CD-ROM drives cannot be hot-plugged; add it to "
                               "the config and restart the domain")
            if not is_virtio_disk(spec, cfg.type == "hvm"):
                raise Conflict(f"{spec.vdev}: an HVM guest's {spec.vdev[:-1]}X disks are IDE, "
                               f"which cannot be hot-plugged; attach it as vd{spec.vdev[-1]} "
                               "(virtio)")
            base = await self._recorded(vm)
            _, used = await hotplug.pci_slots(vm.monitor)
            spec = spec.model_copy(update={"slot": hotplug.free_slot(used)})
            new = validated(base, disks=[*base.model_dump()["disks"], spec.model_dump()])
            assert spec.slot is not None
            fds = None
            if vm.uid is not None:     # confined: QEMU gets the image as descriptors
                fds = await confine.hand_disk(vm.monitor, spec.target, spec.format,
                                              writable=spec.mode == "w")
            try:
                await hotplug.add_disk(vm.monitor, spec, spec.slot, base.max_vcpus, fds)
            except BaseException:
                if fds is not None:
                    await confine.drop_disk(vm.monitor, fds)
                raise
            self._save(vm.rec, new)
            log.info("%s: attached %s as %s (slot %d)", vm.name, spec.target, spec.vdev,
                     spec.slot)
            return spec

    async def block_detach(self, ref: str, vdev: str) -> None:
        rec = self.m.lookup(ref)
        cfg = rec.config
        if not any(d.vdev == vdev for d in cfg.disks):
            raise NotFound(f"domain {cfg.name} has no disk {vdev!r}")
        if vdev == root_disk(cfg):
            raise Conflict(f"{vdev} is the root disk of {cfg.name}; it cannot be detached")
        stopped = self._stopped(ref, "block-detach")
        if stopped is not None:
            self._save(stopped, validated(cfg, disks=[d.model_dump() for d in cfg.disks
                                                      if d.vdev != vdev]))
            return
        async with self.m.operation(ref, "block-detach") as vm:
            spec = next(d for d in vm.rec.config.disks if d.vdev == vdev)
            if not is_virtio_disk(spec, vm.rec.config.type == "hvm"):
                raise Conflict(f"{vdev} is an IDE disk, which cannot be unplugged while the "
                               "domain runs")
            base = await self._recorded(vm)
            await hotplug.remove_disk(vm.monitor, vdev)
            if vm.uid is not None:     # its descriptors (and so its write locks) go too
                await confine.forget_file(vm.monitor, spec.target)
            self._save(vm.rec, validated(base, disks=[d.model_dump() for d in base.disks
                                                      if d.vdev != vdev]))
            log.info("%s: detached %s", vm.name, vdev)

    # ----- NICs ---------------------------------------------------------------------------

    def network_list(self, ref: str) -> list[dict[str, Any]]:
        rec = self.m.lookup(ref)
        running = rec.uuid in self.m.vms
        return [{"index": i, "mac": v.mac, "bridge": v.bridge, "model": v.model, "ip": v.ip,
                 "rate": v.rate, "slot": v.slot,
                 "tap": rec.taps[i] if running and i < len(rec.taps) else None}
                for i, v in enumerate(rec.config.vifs)]

    def _used_macs(self) -> set[str]:
        return {v.mac for r in self.m.store.all() for v in r.config.vifs if v.mac}

    async def network_attach(self, ref: str, vif: VifSpec) -> VifSpec:
        """Plug a NIC (with a tap on its bridge) into a running domain, or add it to a
        stopped one; a MAC is generated when none is given."""
        if vif.mac and vif.mac in self._used_macs():
            raise Conflict(f"MAC {vif.mac} is already in use")
        rec = self._stopped(ref, "network-attach")
        if rec is not None:
            cfg = assign_macs(validated(rec.config, vifs=[
                *rec.config.model_dump()["vifs"], vif.model_dump()]), self._used_macs())
            self._save(rec, cfg)
            return cfg.vifs[-1]
        async with self.m.operation(ref, "network-attach") as vm:
            base = await self._recorded(vm)
            _, used = await hotplug.pci_slots(vm.monitor)
            slot = hotplug.free_slot(used)
            new = assign_macs(validated(base, vifs=[*base.model_dump()["vifs"],
                                                    {**vif.model_dump(), "slot": slot}]),
                              self._used_macs())
            vif = new.vifs[-1]
            index = await self._free_nic_index(vm)
            tap = vif.vifname or f"vif{vm.rec.domid}.{index}"
            if await asyncio.to_thread(links.link_exists, tap):
                raise Conflict(f"interface {tap} already exists on this host")
            bridge = await self.m.net.bridge_for(vif)
            await asyncio.to_thread(links.create_tap, tap, bridge, None, self.m.home.tag,
                                    vm.uid)
            try:
                await hotplug.add_nic(vm.monitor, vif, nic_model(vif, new.type == "hvm"), tap,
                                      index, slot)
            except BaseException:
                with contextlib.suppress(links.LinkError):
                    await asyncio.to_thread(links.delete_link, tap, self.m.home.tag)
                raise
            vm.rec.taps = [*vm.rec.taps, tap]
            self._save(vm.rec, new)
            if vif.rate:
                await self.m.res.vif_rate(vm, len(new.vifs) - 1, vif.rate)
            await self.m.net.domain_started(vm.rec)
            log.info("%s: attached NIC %s (tap %s, slot %d)", vm.name, vif.mac, tap, slot)
            return vif

    async def _free_nic_index(self, vm: Vm) -> int:
        names = {p["name"] for p in await vm.monitor.execute(
            "qom-list", {"path": "/machine/peripheral"})}
        return next(i for i in range(64) if f"nic{i}" not in names)

    async def network_detach(self, ref: str, which: str) -> None:
        rec = self.m.lookup(ref)
        index = vif_index(rec.config, which)
        if index >= len(rec.config.vifs):
            raise NotFound(f"domain {rec.name} has no vif {which}")
        stopped = self._stopped(ref, "network-detach")
        if stopped is not None:
            vifs = [v.model_dump() for i, v in enumerate(rec.config.vifs) if i != index]
            self._save(stopped, validated(rec.config, vifs=vifs))
            return
        async with self.m.operation(ref, "network-detach") as vm:
            mac = vm.rec.config.vifs[index].mac or ""
            nic = (await hotplug.nic_ids(vm.monitor)).get(mac)
            if nic is None:
                raise NotFound(f"domain {vm.name}: QEMU has no NIC with MAC {mac}")
            base = await self._recorded(vm)
            await hotplug.remove_nic(vm.monitor, nic)
            tap = vm.rec.taps[index] if index < len(vm.rec.taps) else None
            vm.rec.taps = [t for i, t in enumerate(vm.rec.taps) if i != index]
            self._save(vm.rec, validated(base, vifs=[v.model_dump() for i, v in
                                                     enumerate(base.vifs) if i != index]))
            if tap:
                with contextlib.suppress(GridvmError):
                    await asyncio.to_thread(shaping.set_rate, tap, None)
                try:
                    await asyncio.to_thread(links.delete_link, tap, self.m.home.tag)
                except links.LinkError as exc:
                    log.warning("%s: %s", vm.name, exc)
            log.info("%s: detached NIC %s", vm.name, mac)

    # ----- vCPUs --------------------------------------------------------------------------

    async def vcpu_set(self, ref: str, count: int) -> dict[str, Any]:
        """Bring the domain to `count` vCPUs (1..maxvcpus); kept for its next start."""
        rec = self.m.lookup(ref)
        cfg = rec.config
        if not 1 <= count <= cfg.max_vcpus:
            hint = "" if cfg.maxvcpus else " (set maxvcpus in its config to allow more)"
            raise ConfigError(f"vcpu-set: {count} is not within 1..{cfg.max_vcpus}, the "
                              f"maxvcpus of {cfg.name}{hint}")
        # Fewer vCPUs than the domain has leave its ceiling (and so its devices' queues,
        # see argv.Disk) where it was.
        top = cfg.max_vcpus
        stopped = self._stopped(ref, "vcpu-set")
        if stopped is not None:
            self._save(stopped, validated(cfg, vcpus=count, maxvcpus=top))
            return {"vcpus": count, "added": 0, "removed": 0}
        async with self.m.operation(ref, "vcpu-set") as vm:
            # QEMU 7 under TCG crashes when a vCPU is plugged in after one was unplugged
            # (heap corruption in the vCPU teardown): remember an unplug for this QEMU.
            marker = vm.rundir / UNPLUGGED_MARK
            can_add = vm.rec.accel == "kvm" or not marker.exists()
            present = [c for c in await hotplug.hotpluggable_cpus(vm.monitor)
                       if c.get("qom-path")]
            if count < len(present):
                marker.touch()
            added, removed = await hotplug.set_cpus(vm.monitor, count, can_add=can_add)
            if cfg.cpus:
                await self.m.res.pin(vm, None, cfg.cpus)
            vm.rec.vcpu_pins = {k: v for k, v in vm.rec.vcpu_pins.items() if int(k) < count}
            self._save(vm.rec, validated(vm.rec.config, vcpus=count, maxvcpus=top))
        online = await self._online_through_agent(vm) if added else None
        log.info("%s: %d vCPUs (+%d -%d)", vm.name, count, added, removed)
        return {"vcpus": count, "added": added, "removed": removed, "agent_online": online}

    async def _online_through_agent(self, vm: Vm) -> int | None:
        """Ask the guest agent to bring every vCPU online (guests without a udev rule for
        it leave hot-added vCPUs offline); None without an agent."""
        if not await self.m.guests.connected(vm):
            return None
        try:
            async with self.m.guests.agent(vm.rec.uuid) as ga:
                return await ga.online_vcpus()
        except GridvmError as exc:
            log.warning("%s: agent could not bring vCPUs online: %s", vm.name, exc)
            return None
