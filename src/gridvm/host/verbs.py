"""The verbs a user runs on a domain (xm start, shutdown, pause, …, sched-credit, mem-set).

Each verb names itself in gridvm.lifecycle.VERBS, the table of the states it accepts; one
asked in another state is refused with a Conflict that names the state.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gridvm.config.model import MAX_MIB, Sched, check_name
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound
from gridvm.host.resources import validate_sched, vif_index
from gridvm.host.runtime import DomainRuntime
from gridvm.lifecycle import DomainState, require
from gridvm.store.records import DomainRecord

S = DomainState


class Verbs(DomainRuntime):
    """User verbs on this host's domains."""

    async def start_domain(self, ref: str, *, paused: bool = False) -> DomainRecord:
        rec = self.lookup(ref)
        require("start", rec.name, rec.state)
        await self._launch(rec, paused=paused)
        return rec

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
        async with self.operation(ref, "destroy") as vm:
            await self._teardown(vm, reason="destroy")

    async def pause(self, ref: str) -> None:
        async with self.operation(ref, "pause") as vm:
            await vm.monitor.execute("stop")
            self.set_state(vm.rec, S.PAUSED, "pause")

    async def unpause(self, ref: str) -> None:
        async with self.operation(ref, "unpause") as vm:
            await vm.monitor.execute("cont")
            self.set_state(vm.rec, S.RUNNING, "unpause")

    async def delete(self, ref: str) -> None:
        """Remove a defined domain that is not running."""
        rec = self.lookup(ref)
        require("delete", rec.name, rec.state)
        if rec.uuid in self.vms:
            raise Conflict(f"domain {rec.name} is running; shut it down or destroy it first")
        self._remove(rec, "delete")

    async def rename(self, ref: str, new: str) -> DomainRecord:
        rec = self.lookup(ref)
        require("rename", rec.name, rec.state)
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
        require("sched-credit", rec.name, rec.state)
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

    async def mem_limit(self, ref: str, mb: int) -> None:
        """Set the host-side memory ceiling of a running domain's QEMU (0 = none)."""
        async with self.operation(ref, "mem-limit") as vm:
            cfg = vm.rec.config
            if mb and not cfg.max_memory < mb <= MAX_MIB:
                raise ConfigError(f"invalid mem_limit {mb} MiB for {cfg.name}: must be more "
                                  f"than its maxmem ({cfg.max_memory} MiB), or 0 for none")
            await self.res.set_mem_limit(vm, mb or None)
            vm.rec.config = cfg.model_copy(update={"mem_limit": mb or None})
            self.store.put(vm.rec)

    async def mem_max(self, ref: str, mb: int) -> None:
        """Set the memory ceiling used from the next start."""
        rec = self.lookup(ref)
        require("mem-max", rec.name, rec.state)
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

    async def network_pps(self, ref: str, vif: str, pps: int | None) -> None:
        """Police the packets a vif's guest sends to `pps` per second (None: no limit)."""
        async with self.operation(ref, "network-rate") as vm:
            cfg = vm.rec.config
            index = vif_index(cfg, vif)
            if pps is not None and not 1 <= pps <= 10_000_000:
                raise ConfigError(f"invalid pps {pps}: packets per second, 1..10000000 "
                                  "(0 removes the limit)")
            await self.res.vif_pps(vm, index, pps)
            vifs = list(cfg.vifs)
            vifs[index] = vifs[index].model_copy(update={"pps": pps})
            vm.rec.config = cfg.model_copy(update={"vifs": vifs})
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
