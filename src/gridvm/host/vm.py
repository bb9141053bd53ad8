"""One running domain: its QEMU process, monitor, and the events that drive its state.

The watcher only reports; the manager's handler (gridvm.host.supervisor) changes state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gridvm.host import links, procs
from gridvm.qemu.confine import in_rundir
from gridvm.qemu.qmp import Monitor, StreamListener
from gridvm.store.records import DomainRecord

log = logging.getLogger("gridvm.vm")

WATCHED = ("SHUTDOWN", "STOP", "RESUME", "GUEST_PANICKED", "RESET")

# What the watcher reports to its manager: (vm, kind) with kind stopped | resumed (QEMU
# paused or resumed the guest) | poweroff | reboot (paused, needs a reset) | reset (already
# reset) | crash | died.
Handler = Callable[["Vm", str], Awaitable[None]]


def qemu_taps(argv: list[str]) -> list[str]:
    """The tap names a QEMU command line uses (`-netdev tap,…,ifname=X`), in order."""
    taps = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-netdev" and value.startswith("tap,"):
            opts = value.replace(",,", "\0").split(",")
            for opt in opts:
                key, _, val = opt.partition("=")
                if key == "ifname":
                    taps.append(val.replace("\0", ","))
    return taps


class Vm:
    """A QEMU process that gridvmd owns (launched or re-adopted)."""

    def __init__(self, rec: DomainRecord, pid: int, rundir: Path, monitor: Monitor,
                 tag: str | None = None) -> None:
        self.rec = rec
        self.tag = tag                       # the alias of the taps this host made for it
        self.pid = pid
        self.uid: int | None = None          # a confined QEMU's uid (gridvm.host.confine)
        self.dirfd: int | None = None        # ... and its run-dir descriptor
        self.rundir = rundir
        self.monitor = monitor
        self.lock = asyncio.Lock()          # one state-changing operation at a time
        self.expected_exit = False           # set before we stop QEMU ourselves
        self.pending_reboot = False          # `reboot` = ACPI power-off, then restart
        self.firmware_reset_until = 0.0      # see _classify
        self.gone = asyncio.Event()          # set when the QEMU has been torn down
        self.restarted = asyncio.Event()     # set on every automatic restart
        self.agent_lock = asyncio.Lock()     # the agent's socket takes one client at a time
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def serial_socket(self) -> Path:
        return self.rundir / "serial.sock"

    @property
    def agent_socket(self) -> Path:
        return self.rundir / "qga.sock"

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"

    def qemu_path(self, path: Path) -> str:
        """How this QEMU names a file of its run dir (a confined one, through its run-dir
        descriptor: it cannot search the directories above)."""
        if self.dirfd is None:
            return str(path)
        return in_rundir(self.dirfd, str(path.relative_to(self.rundir)))

    def start_watching(self, handler: Handler) -> None:
        self._task = asyncio.create_task(self._watch(handler), name=f"watch-{self.name}")

    async def _watch(self, handler: Handler) -> None:
        listener = StreamListener(WATCHED)
        with self.monitor.client.listen(listener):
            while True:
                try:
                    event = await asyncio.wait_for(listener.get(), timeout=1.0)
                except TimeoutError:
                    if not procs.pid_alive(self.pid):
                        if not self.expected_exit:
                            try:
                                await handler(self, "died")
                            except Exception:
                                log.exception("%s: handling QEMU's exit failed", self.name)
                        return
                    continue
                kind = self._classify(dict(event))
                if kind:
                    try:
                        await handler(self, kind)
                    except Exception:
                        log.exception("%s: handling %s failed", self.name, kind)

    def _classify(self, event: dict[str, Any]) -> str | None:
        name = event["event"]
        data = event.get("data", {})
        log.debug("%s: event %s %s", self.name, name, data)
        if name == "STOP":
            return "stopped"
        if name == "RESUME":
            return "resumed"
        if name == "GUEST_PANICKED":
            return "crash"
        if name == "RESET" and data.get("guest"):
            if time.monotonic() < self.firmware_reset_until:
                # SeaBIOS resets the machine again right after a host-initiated reset.
                return None
            return "reset"  # the guest rebooted itself; QEMU has already reset it
        if name == "SHUTDOWN" and data.get("guest"):
            if data.get("reason") == "guest-panic":
                return "crash"
            return "reboot" if self.pending_reboot else "poweroff"
        return None

    async def status(self) -> str:
        result = await self.monitor.execute("query-status", timeout=5)
        return str(result["status"])

    async def stop_process(self) -> None:
        """Quit QEMU (politely over QMP, then by signal) and wait until it is gone."""
        self.expected_exit = True
        if procs.pid_alive(self.pid):
            with contextlib.suppress(Exception):
                await self.monitor.execute("quit", timeout=2)
            await procs.kill_and_wait(self.pid, timeout=3)
        await self.detach()

    async def detach(self) -> None:
        """Stop watching and close the monitor, leaving QEMU as it is."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.monitor.close()

    async def release_resources(self) -> None:
        """Remove what the domain held on the host: taps and its run directory."""
        await release(self.name, self.rec.taps, self.rundir, self.tag)


async def release(name: str, taps: list[str], rundir: Path, tag: str | None = None) -> None:
    """Delete taps (pyroute2 blocks: run it in a thread) — with `tag`, only those carrying
    it — and the run directory."""
    for tap in taps:
        try:
            await asyncio.to_thread(links.delete_link, tap, tag)
        except links.LinkError as exc:
            log.warning("%s: %s", name, exc)
    shutil.rmtree(rundir, ignore_errors=True)
