"""A typed client for the QEMU guest agent (qemu-ga) on a domain's virtio-serial channel.

gridvm gives every domain the channel `org.qemu.guest_agent.0`, backed by a Unix socket
in its run directory (`qga.sock`). The agent speaks line-delimited JSON; each connection
starts with `guest-sync-delimited` (after a 0xFF byte that resets the agent's parser) so
replies to an earlier, abandoned client are skipped. QEMU lets one client at a time use
the socket: callers serialize (`Vm.agent_lock`).

Every call has a timeout; an agent that is not running in the guest is an `AgentError`
at once when QEMU says the guest side is closed (`query-chardev`'s `frontend-open`), else
after the timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gridvm.errors import GridvmError

CHANNEL = "org.qemu.guest_agent.0"
CHARDEV_ID = "qga0"
SERIAL_ID = "vser0"
SOCKET_NAME = "qga.sock"
SENTINEL = b"\xff"
MAX_LINE = 64 << 20
EXEC_POLL_S = 0.1


class AgentError(GridvmError):
    """The guest agent is absent, did not answer in time, or refused a command."""


@dataclass(frozen=True)
class ExecResult:
    """A command run in the guest: exit code (or the signal that ended it) and its output."""

    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool = False

    @property
    def returncode(self) -> int:
        """The shell convention: the exit code, or 128 + signal."""
        if self.exitcode is not None:
            return self.exitcode
        return 128 + (self.signal or 0)


@dataclass(frozen=True)
class Address:
    family: Literal["ipv4", "ipv6"]
    address: str
    prefix: int


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str | None
    addresses: list[Address] = field(default_factory=list)

    def ipv4(self) -> list[str]:
        return [a.address for a in self.addresses if a.family == "ipv4"]


FreezeStatus = Literal["thawed", "frozen"]


class GuestAgent:
    """One connection to a guest's agent; use as `async with GuestAgent(path) as ga:`."""

    def __init__(self, socket: Path, *, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> GuestAgent:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if not self.socket.exists():
            raise AgentError(f"no guest agent channel ({self.socket} is missing)")
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket), limit=MAX_LINE),
                timeout=self.timeout)
        except (OSError, TimeoutError) as exc:
            raise AgentError(f"cannot connect to the guest agent channel: {exc}") from exc
        try:
            await self.sync()
        except BaseException:
            # QEMU serves one client at a time: a connection left open blocks every later one
            await self.close()
            raise

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # ----- protocol ----------------------------------------------------------------------

    async def _send(self, cmd: str, args: dict[str, Any] | None, prefix: bytes = b"") -> None:
        if self._writer is None:
            raise AgentError("not connected to the guest agent")
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self._writer.write(prefix + json.dumps(msg).encode() + b"\n")
        await self._writer.drain()

    async def _reply(self, cmd: str, timeout: float) -> Any:
        assert self._reader is not None
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout=timeout)
        except TimeoutError as exc:
            raise AgentError(f"the guest agent did not answer {cmd} within {timeout:.0f}s "
                             "(is qemu-guest-agent running in the guest?)") from exc
        except (OSError, ValueError) as exc:
            raise AgentError(f"guest agent connection failed during {cmd}: {exc}") from exc
        if not line:
            raise AgentError(f"the guest agent channel closed during {cmd}")
        return self._decode(cmd, line)

    @staticmethod
    def _decode(cmd: str, line: bytes) -> Any:
        try:
            msg = json.loads(line.lstrip(SENTINEL))
        except ValueError as exc:
            raise AgentError(f"garbled reply from the guest agent to {cmd}") from exc
        if "error" in msg:
            desc = msg["error"].get("desc", "error") if isinstance(msg["error"], dict) else ""
            raise AgentError(f"the guest agent refused {cmd}: {desc}")
        return msg.get("return")

    async def sync(self) -> None:
        """Skip whatever an earlier client left in the channel (guest-sync-delimited)."""
        assert self._reader is not None
        token = random.randint(1, 2**31 - 1)
        await self._send("guest-sync-delimited", {"id": token}, prefix=SENTINEL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AgentError(f"the guest agent did not answer within {self.timeout:.0f}s "
                                 "(is qemu-guest-agent running in the guest?)")
            try:
                await asyncio.wait_for(self._reader.readuntil(SENTINEL), timeout=left)
                line = await asyncio.wait_for(self._reader.readline(), timeout=left)
            except TimeoutError:
                continue
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
                raise AgentError(f"the guest agent channel failed: {exc}") from exc
            with contextlib.suppress(AgentError):
                if self._decode("guest-sync-delimited", line) == token:
                    return

    async def call(self, cmd: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """Send one command and return its reply's `return` value."""
        await self._send(cmd, args)
        return await self._reply(cmd, timeout or self.timeout)

    # ----- commands ----------------------------------------------------------------------

    async def ping(self) -> None:
        await self.call("guest-ping")

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("guest-info")
        return result

    async def hostname(self) -> str:
        return str((await self.call("guest-get-host-name"))["host-name"])

    async def interfaces(self) -> list[Interface]:
        out: list[Interface] = []
        for item in await self.call("guest-network-get-interfaces"):
            addrs = [Address(a["ip-address-type"], a["ip-address"], int(a.get("prefix", 0)))
                     for a in item.get("ip-addresses", [])
                     if a.get("ip-address-type") in ("ipv4", "ipv6")]
            out.append(Interface(str(item["name"]), item.get("hardware-address"), addrs))
        return out

    async def exec(self, argv: list[str], *, input: bytes | None = None,
                   timeout: float = 60.0) -> ExecResult:
        """Run argv[0] with its arguments in the guest and wait for it (no shell)."""
        if not argv:
            raise AgentError("guest-exec needs a command")
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        pid = int((await self.call("guest-exec", args))["pid"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(
                    exitcode=status.get("exitcode"), signal=status.get("signal"),
                    stdout=base64.b64decode(status.get("out-data", "")),
                    stderr=base64.b64decode(status.get("err-data", "")),
                    truncated=bool(status.get("out-truncated") or status.get("err-truncated")))
            if loop.time() > deadline:
                raise AgentError(f"{argv[0]} did not finish in the guest within "
                                 f"{timeout:.0f}s (pid {pid} still runs there)")
            await asyncio.sleep(EXEC_POLL_S)

    async def shutdown(self, mode: Literal["powerdown", "reboot", "halt"] = "powerdown") -> None:
        """Ask the guest OS to shut down (the agent sends no reply when it complies)."""
        await self._send("guest-shutdown", {"mode": mode})
        assert self._reader is not None
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout=1.0)
        except (TimeoutError, OSError, ValueError):
            return
        if line:
            self._decode("guest-shutdown", line)

    async def fsfreeze(self) -> int:
        """Freeze the guest's filesystems (for a consistent snapshot); how many froze."""
        return int(await self.call("guest-fsfreeze-freeze", timeout=max(self.timeout, 60)))

    async def fsthaw(self) -> int:
        return int(await self.call("guest-fsfreeze-thaw", timeout=max(self.timeout, 60)))

    async def online_vcpus(self) -> int:
        """Bring every offline vCPU the guest can see online; how many it brought up."""
        offline = [{"logical-id": c["logical-id"], "online": True}
                   for c in await self.call("guest-get-vcpus") if not c.get("online")]
        if not offline:
            return 0
        return int(await self.call("guest-set-vcpus", {"vcpus": offline}))

    async def fsfreeze_status(self) -> FreezeStatus:
        status = str(await self.call("guest-fsfreeze-status"))
        return "frozen" if status == "frozen" else "thawed"


def chardev_args(rundir: Path, addr: str | None = None, *, path: str | None = None
                 ) -> list[str]:
    """QEMU arguments for the agent channel (a virtio-serial port on its own controller,
    at PCI address `addr` if given); `path` overrides where QEMU opens its socket."""
    path = (path or str(rundir / SOCKET_NAME)).replace(",", ",,")
    return [
        "-chardev", f"socket,id={CHARDEV_ID},path={path},server=on,wait=off",
        "-device", f"virtio-serial-pci,id={SERIAL_ID}" + (f",addr={addr}" if addr else ""),
        "-device", f"virtserialport,bus=vser0.0,chardev={CHARDEV_ID},name={CHANNEL}",
    ]
