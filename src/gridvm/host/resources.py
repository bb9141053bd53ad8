"""Resource control for running domains: credit-scheduler cgroups, vCPU pinning, balloon,
block and vif throttles. Every call here is applied to a live QEMU and recorded by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from gridvm.config.model import DomainConfig
from gridvm.errors import ConfigError, GridvmError, NotFound
from gridvm.host import policing, shaping, vnc
from gridvm.host.cgroups import CgroupManager
from gridvm.host.cpulist import format_cpulist, parse_cpulist
from gridvm.host.rates import parse_rate
from gridvm.host.vm import Vm
from gridvm.paths import Home
from gridvm.qemu.argv import is_virtio_disk
from gridvm.store.records import DomainRecord

log = logging.getLogger("gridvm.resources")

THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


def group_name(domid: int) -> str:
    return f"dom{domid}"


def cgroup_parent(home: Home) -> str:
    """The cgroup that holds one home's domain groups (two homes never share one)."""
    return f"gridvm/{home.tag}"


def remove_home_groups(home: Home) -> None:
    """Delete a home's cgroups once its guests are gone for good (lab and demo teardown:
    a home that is deleted never starts a gridvmd again to reconcile them)."""
    with contextlib.suppress(GridvmError):
        CgroupManager(cgroup_parent(home)).remove_parent()


class Resources:
    """The host-side enforcement of a domain's sched, pins, memory and I/O limits."""

    def __init__(self, home: Home) -> None:
        self.cgroups: CgroupManager | None
        try:
            self.cgroups = CgroupManager(cgroup_parent(home))
            self.reason = f"cgroup v{self.cgroups.version}"
        except GridvmError as exc:
            self.cgroups = None
            self.reason = f"no usable cgroup hierarchy ({exc}); CPU weight/cap not enforced"
            log.warning(self.reason)

    # ----- whole-domain application ------------------------------------------------------

    async def apply(self, vm: Vm) -> None:
        """Everything the config asks for, on a freshly started QEMU."""
        cfg, domid = vm.rec.config, vm.rec.domid
        assert domid is not None
        if self.cgroups is not None:
            name = group_name(domid)
            cg = self.cgroups
            await asyncio.to_thread(cg.create, name)
            await asyncio.to_thread(cg.attach, name, vm.pid)
        await self.set_sched(vm, cfg.sched.weight, cfg.sched.cap)
        if cfg.mem_limit:
            await self.set_mem_limit(vm, cfg.mem_limit)
        if cfg.cpus:
            await self.pin(vm, None, cfg.cpus)
        for vcpu, cpus in vm.rec.vcpu_pins.items():
            await self.pin(vm, int(vcpu), cpus)
        for tap, vif in zip(vm.rec.taps, cfg.vifs, strict=False):
            if vif.rate:
                await asyncio.to_thread(shaping.set_rate, tap, parse_rate(vif.rate))
            if vif.pps:
                await asyncio.to_thread(policing.set_pps, tap, vif.pps)
        if cfg.memory < cfg.max_memory:
            await self.balloon(vm, cfg.memory)
        await vnc.apply(vm)

    async def adopt(self, vm: Vm) -> None:
        """A re-adopted QEMU: make sure it sits in its cgroup with its weight and cap (a
        gridvmd killed between QEMU's start and `apply` left it in the root group)."""
        if self.cgroups is None or vm.rec.domid is None:
            return
        name, cg = group_name(vm.rec.domid), self.cgroups
        await asyncio.to_thread(cg.create, name)
        await asyncio.to_thread(cg.attach, name, vm.pid)
        await self.set_sched(vm, vm.rec.config.sched.weight, vm.rec.config.sched.cap)

    async def release(self, rec: DomainRecord) -> None:
        """Remove the cgroup and shaping of a domain whose QEMU is gone."""
        for tap in rec.taps:
            with contextlib.suppress(GridvmError):
                await asyncio.to_thread(shaping.set_rate, tap, None)
            with contextlib.suppress(GridvmError):
                await asyncio.to_thread(policing.set_pps, tap, None)
        if self.cgroups is not None and rec.domid is not None:
            try:
                await asyncio.to_thread(self.cgroups.remove, group_name(rec.domid))
            except GridvmError as exc:
                log.warning("%s: cgroup removal: %s", rec.name, exc)

    async def reconcile(self, live_domids: set[int]) -> None:
        """After a restart: drop cgroups, ifbs and pps tables whose domain no longer runs."""
        if self.cgroups is not None:
            for name in await asyncio.to_thread(self.cgroups.list):
                if name.startswith("dom") and name[3:].isdigit() and int(name[3:]) in live_domids:
                    continue
                with contextlib.suppress(GridvmError):
                    await asyncio.to_thread(self.cgroups.remove, name)
        with contextlib.suppress(GridvmError):
            await asyncio.to_thread(shaping.remove_orphans)
        with contextlib.suppress(GridvmError):
            await asyncio.to_thread(policing.remove_orphans)

    # ----- CPU ---------------------------------------------------------------------------

    async def set_sched(self, vm: Vm, weight: int, cap: int) -> None:
        if self.cgroups is None or vm.rec.domid is None:
            return
        name, cg = group_name(vm.rec.domid), self.cgroups
        await asyncio.to_thread(cg.set_weight, name, weight)
        await asyncio.to_thread(cg.set_cap, name, cap)

    def cpu_ns(self, vm: Vm) -> int | None:
        """CPU time of the domain's QEMU (all threads) from cgroup accounting."""
        if self.cgroups is None or vm.rec.domid is None:
            return None
        try:
            return self.cgroups.cpu_usage_ns(group_name(vm.rec.domid))
        except GridvmError:
            return None

    async def vcpu_threads(self, vm: Vm) -> dict[int, int]:
        cpus = await vm.monitor.execute("query-cpus-fast")
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}

    async def pin(self, vm: Vm, vcpu: int | None, spec: str) -> None:
        """Pin one vCPU (or all with None) to the host CPUs of a Xen cpu list."""
        cpus = parse_cpulist(spec)
        threads = await self.vcpu_threads(vm)
        if vcpu is not None and vcpu not in threads:
            raise NotFound(f"domain {vm.name} has no vcpu {vcpu} (it has {len(threads)})")
        for index, tid in threads.items():
            if vcpu is None or index == vcpu:
                os.sched_setaffinity(tid, cpus)

    async def vcpu_list(self, vm: Vm) -> list[dict[str, Any]]:
        rows = []
        for index, tid in sorted((await self.vcpu_threads(vm)).items()):
            stat = _task_stat(vm.pid, tid)
            rows.append({
                "name": vm.name, "domid": vm.rec.domid, "vcpu": index, "thread": tid,
                "cpu": int(stat[36]) if stat else None,
                "state": "r" if stat and stat[0] == "R" else "b",
                "time": round((int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), 1)
                if stat else 0.0,
                "affinity": format_cpulist(os.sched_getaffinity(tid)),
            })
        return rows

    # ----- memory ------------------------------------------------------------------------

    async def balloon(self, vm: Vm, mb: int) -> None:
        await vm.monitor.execute("balloon", {"value": mb * 1024 * 1024})

    async def set_mem_limit(self, vm: Vm, mb: int | None) -> None:
        """Cap the QEMU process's host memory at `mb` MiB (None: no cap) with its cgroup."""
        if self.cgroups is None or vm.rec.domid is None:
            raise GridvmError(f"cannot limit the memory of {vm.name}: {self.reason}")
        limit = mb * 1024 * 1024 if mb else None
        await asyncio.to_thread(self.cgroups.set_memory_limit, group_name(vm.rec.domid), limit)

    def host_memory(self, vm: Vm) -> int | None:
        """Host memory charged to the domain's QEMU (bytes), from its memory cgroup."""
        if self.cgroups is None or vm.rec.domid is None:
            return None
        try:
            return self.cgroups.memory_bytes(group_name(vm.rec.domid))
        except GridvmError:
            return None

    async def current_memory(self, vm: Vm) -> int | None:
        try:
            info = await vm.monitor.execute("query-balloon", timeout=2)
        except GridvmError:
            return None
        return int(info["actual"]) // (1024 * 1024)

    # ----- I/O ---------------------------------------------------------------------------

    async def block_throttle(self, vm: Vm, index: int, limits: dict[str, int]) -> None:
        """Set a disk's limits (all six; 0 = unlimited) through QEMU's block throttling."""
        cfg = vm.rec.config
        spec = cfg.disks[index]   # by device id: hot-plugged disks too
        # A virtio-blk-pci proxy has no BlockBackend: name the virtio device inside it.
        qdev = (f"/machine/peripheral/{spec.vdev}/virtio-backend"
                if is_virtio_disk(spec, cfg.type == "hvm") else spec.vdev)
        args: dict[str, Any] = {"id": qdev, **dict.fromkeys(THROTTLE_KEYS, 0), **limits}
        await vm.monitor.execute("block_set_io_throttle", args)

    async def vif_rate(self, vm: Vm, index: int, rate: str | None) -> None:
        if index >= len(vm.rec.taps):
            raise NotFound(f"domain {vm.name} has no vif {index}")
        parsed = parse_rate(rate) if rate else None
        await asyncio.to_thread(shaping.set_rate, vm.rec.taps[index], parsed)


    async def vif_pps(self, vm: Vm, index: int, pps: int | None) -> None:
        if index >= len(vm.rec.taps):
            raise NotFound(f"domain {vm.name} has no vif {index}")
        await asyncio.to_thread(policing.set_pps, vm.rec.taps[index], pps)


def _task_stat(pid: int, tid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def validate_sched(weight: int | None, cap: int | None) -> None:
    if weight is not None and not 1 <= weight <= 65535:
        raise ConfigError(f"invalid weight {weight}: must be 1..65535 (default 256)")
    if cap is not None and not 0 <= cap <= 6400:
        raise ConfigError(f"invalid cap {cap}: must be 0 (no cap) or a percentage of one CPU "
                          "(at most 6400: 64 vCPUs)")


def vif_index(cfg: DomainConfig, vif: str) -> int:
    """A vif named by index ("0") or by MAC."""
    if vif.isascii() and vif.isdigit():
        return int(vif)
    for i, v in enumerate(cfg.vifs):
        if v.mac and v.mac == vif.lower():
            return i
    raise NotFound(f"domain {cfg.name} has no vif {vif!r} (use its index or MAC)")
