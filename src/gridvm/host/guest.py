"""What gridvmd does through a domain's guest agent: exec, addresses, fs freeze, shutdown.

The agent is used only when the guest has its end of the channel open (QEMU's
`query-chardev` reports `frontend-open`), so guests without one (the tiny guest, a guest
still booting) cost no timeout. Addresses come from the agent, cached for a few seconds;
without an agent, from the NAT network's DHCP leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gridvm.errors import Conflict, QemuError
from gridvm.host.vm import Vm
from gridvm.qemu.guestagent import CHARDEV_ID, AgentError, ExecResult, GuestAgent

if TYPE_CHECKING:
    from gridvm.host.runtime import DomainRuntime

log = logging.getLogger("gridvm.guest")

ADDRESS_TTL_S = 5.0
SHUTDOWN_GRACE_S = 30.0


@dataclass
class _Cached:
    at: float
    macs: dict[str, list[str]] = field(default_factory=dict)   # MAC -> IPv4 addresses


class Guests:
    """The guest-agent side of one host's domains."""

    def __init__(self, manager: DomainRuntime) -> None:
        self.m = manager
        self._addresses: dict[str, _Cached] = {}     # by domain uuid
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def connected(self, vm: Vm) -> bool:
        """Whether the guest has the agent's channel open (an agent runs in it)."""
        if not vm.agent_socket.exists():
            return False
        try:
            chardevs = await vm.monitor.execute("query-chardev", timeout=5)
        except QemuError:
            return False
        return any(c.get("label") == CHARDEV_ID and c.get("frontend-open")
                   for c in chardevs)

    @contextlib.asynccontextmanager
    async def agent(self, ref: str, timeout: float = 10.0) -> AsyncIterator[GuestAgent]:
        """A connection to a running domain's agent (one user at a time per domain)."""
        vm = self.m.running(ref)
        async with self._agent(vm, timeout) as ga:
            yield ga

    @contextlib.asynccontextmanager
    async def _agent(self, vm: Vm, timeout: float) -> AsyncIterator[GuestAgent]:
        if not await self.connected(vm):
            raise AgentError(f"domain {vm.name} has no guest agent running "
                             "(install and start qemu-guest-agent in the guest)")
        async with vm.agent_lock, GuestAgent(vm.agent_socket, timeout=timeout) as ga:
            yield ga

    async def exec(self, ref: str, argv: list[str], *, input: bytes | None = None,
                   timeout: float = 60.0) -> ExecResult:
        async with self.agent(ref) as ga:
            return await ga.exec(argv, input=input, timeout=timeout)

    async def fsfreeze(self, ref: str, action: str) -> dict[str, Any]:
        """freeze | thaw | status of the guest's filesystems (for consistent snapshots)."""
        async with self.agent(ref) as ga:
            if action == "freeze":
                return {"frozen": await ga.fsfreeze(), "status": "frozen"}
            if action == "thaw":
                return {"thawed": await ga.fsthaw(), "status": "thawed"}
            if action == "status":
                return {"status": await ga.fsfreeze_status()}
        raise Conflict(f"unknown fsfreeze action {action!r} (freeze, thaw or status)")

    async def addresses(self, vm: Vm) -> dict[str, list[str]] | None:
        """MAC -> IPv4 addresses the guest reports (cached); None without an agent."""
        cached = self._addresses.get(vm.rec.uuid)
        if cached is not None and time.monotonic() - cached.at < ADDRESS_TTL_S:
            return cached.macs
        if not await self.connected(vm):
            return None
        if vm.agent_lock.locked():   # a guest-exec is running: a listing must not wait for it
            return cached.macs if cached is not None else {}
        try:
            async with self._agent(vm, timeout=2.0) as ga:
                interfaces = await ga.interfaces()
        except AgentError as exc:
            log.debug("%s: no addresses from the agent: %s", vm.name, exc)
            return None
        macs = {i.mac.lower(): i.ipv4() for i in interfaces if i.mac and i.name != "lo"}
        self._addresses[vm.rec.uuid] = _Cached(time.monotonic(), macs)
        return macs

    async def annotate(self, view: dict[str, Any], vm: Vm,
                       leases: Callable[[], Awaitable[dict[str, str]]]) -> None:
        """Add the guest's addresses to a domain view: `agent`, `addresses`, and each vif's
        `ip` (with `ip_source` agent or lease) where the config gives none."""
        found = await self.addresses(vm)
        view["agent"] = found is not None
        source = "agent"
        if found is None:
            source = "lease"
            found = {mac: [ip] for mac, ip in (await leases()).items()}
        addresses: list[str] = []
        for nic in view["vifs"]:
            ips = found.get(nic["mac"] or "", [])
            addresses += ips
            if nic["ip"] is None and ips:
                nic["ip"], nic["ip_source"] = ips[0], source
        view["addresses"] = addresses

    def forget(self, uuid: str) -> None:
        self._addresses.pop(uuid, None)

    # ----- shutdown through the agent -----------------------------------------------------

    async def shutdown(self, ref: str) -> None:
        """Ask the guest OS to power off through its agent."""
        async with self.agent(ref) as ga:
            await ga.shutdown("powerdown")

    def fallback_after_acpi(self, vm: Vm, grace: float = SHUTDOWN_GRACE_S) -> None:
        """If the domain is still up `grace` s after an ACPI power-off, ask its agent."""
        task = asyncio.create_task(self._fallback(vm, grace), name=f"agent-shutdown-{vm.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fallback(self, vm: Vm, grace: float) -> None:
        try:
            await asyncio.wait_for(vm.gone.wait(), timeout=grace)
            return
        except TimeoutError:
            pass
        if vm.gone.is_set() or vm.rec.state not in ("running", "blocked"):
            return
        try:
            async with self._agent(vm, timeout=5.0) as ga:
                await ga.shutdown("powerdown")
            log.info("%s: ignored ACPI power-off for %.0f s; shut down through its agent",
                     vm.name, grace)
        except AgentError as exc:
            log.warning("%s: ignored ACPI power-off and has no agent to ask: %s", vm.name, exc)
