"""A domain's serial console as a byte stream, wherever the domain runs.

`open_console` gives a `ConsoleStream`: on the domain's own host, the serial socket in its
run directory; on another host of the cluster, that host's console websocket
(`/v1/domains/{ref}/console/stream`) reached over mutual TLS — hosts share nothing but the
network. The API serves the same stream as a websocket to the CLI (`gridvm console`) and to
other hosts; the web console bridges it to xterm.js. One client at a time holds a serial
port (QEMU's chardev takes one connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Protocol

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from gridvm.api.hostpeer import LOCAL_HEADER
from gridvm.cluster.node import ClusterNode
from gridvm.cluster.settings import Files
from gridvm.errors import Conflict, GridvmError, NotFound
from gridvm.host.manager import HostManager

CHUNK = 65536
OPEN_TIMEOUT_S = 5.0
STREAM = "/v1/domains/{ref}/console/stream"


class ConsoleStream(Protocol):
    async def read(self) -> bytes:
        """The next bytes the guest wrote; b"" once the console is closed."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class SerialSocket:
    """The serial socket of a domain on this host."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class PeerConsole:
    """The console websocket of a domain on another host."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def read(self) -> bytes:
        try:
            data = await self.ws.recv()
        except ConnectionClosed:
            return b""
        return data if isinstance(data, bytes) else data.encode()

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


async def open_console(manager: HostManager, node: ClusterNode, ref: str) -> ConsoleStream:
    """The console of domain `ref`, here or on the host of the cluster that runs it."""
    try:
        vm = manager.running(ref)
    except NotFound:
        if not node.joined:
            raise
        return await remote_stream(manager, node, ref)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(vm.serial_socket)), OPEN_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise Conflict(f"cannot open the console of {vm.name}: {exc}") from None
    return SerialSocket(reader, writer)


async def remote_stream(manager: HostManager, node: ClusterNode, ref: str,
                  stream: str = STREAM) -> ConsoleStream:
    """The websocket `stream` (a path with {ref}) of the host of the cluster that runs
    domain `ref`, over mutual TLS."""
    cfg, cluster = node.need()
    rec = await asyncio.to_thread(cluster.find_domain, ref)
    if rec is None or rec.get("host") in (None, cfg.host):
        raise NotFound(f"domain {ref!r} does not exist")
    url = await asyncio.to_thread(node.url_of, str(rec["host"]))
    uri = "wss://" + url.removeprefix("https://") + stream.format(
        ref=urllib.parse.quote(str(rec["uuid"]), safe=""))
    tls = Files(manager.home).identity.client_context()
    try:
        ws = await ws_connect(uri, ssl=tls, additional_headers={LOCAL_HEADER: "1"},
                              open_timeout=OPEN_TIMEOUT_S, max_size=2**20)
    except InvalidStatus as exc:
        raise Conflict(f"host {rec['host']} refused the console of {rec['name']} "
                       f"(HTTP {exc.response.status_code})") from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise GridvmError(f"cannot reach the console of {rec['name']} on {rec['host']}: "
                          f"{exc}") from None
    return PeerConsole(ws)


async def bridge(ws: WebSocket, console: ConsoleStream) -> None:
    """Guest output → websocket (binary frames); websocket frames → guest, until either
    side closes."""
    async def out() -> None:
        while data := await console.read():
            await ws.send_bytes(data)

    async def into() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            await console.write(data)

    tasks = [asyncio.create_task(out()), asyncio.create_task(into())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, OSError,
                                     RuntimeError, GridvmError):
                await t
        await console.close()
        with contextlib.suppress(RuntimeError, OSError):
            await ws.close(code=1000, reason="console closed")


Opener = Callable[[HostManager, ClusterNode, str], Awaitable[ConsoleStream]]


def stream_routes(manager: HostManager, node: ClusterNode, path: str,
                  opener: Opener) -> APIRouter:
    """A websocket at `path` bridged to the stream `opener` gives for its domain; a domain
    that does not exist or cannot be reached closes it with 4404 or 4409 and the reason."""
    r = APIRouter()

    @r.websocket(path)
    async def stream(ws: WebSocket, ref: str) -> None:
        try:
            peer = await opener(manager, node, ref)
        except GridvmError as exc:
            await ws.close(code=4404 if isinstance(exc, NotFound) else 4409,
                           reason=str(exc)[:120])
            return
        await ws.accept()
        await bridge(ws, peer)

    return r


def console_routes(manager: HostManager, node: ClusterNode) -> APIRouter:
    return stream_routes(manager, node, STREAM, open_console)
