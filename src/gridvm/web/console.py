"""Consoles in the browser: a domain's serial console over a websocket (xterm.js).

The websocket is bridged to the domain's serial socket, which the API names
(`GET /v1/domains/{ref}/console`, routed to the domain's host in a cluster). On connect the
page first gets the end of the console log, so it opens on what the guest printed last.
Guest output goes to the browser as binary frames; what the browser sends (typed or pasted
text) goes to the guest. Like `gridvm console`, one client at a time holds the serial port.

The graphical console of HVM guests (noVNC over a websocket) will sit beside it at
/ui/ws/vnc/{ref} once gridvmd gives guests a VNC server; until then that route says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, HTTPException, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from gridvm.api.client import AppClient, q
from gridvm.errors import GridvmError
from gridvm.web.auth import PATH, Gate

log = logging.getLogger("gridvm.web.console")

BACKLOG_LINES = 40
CHUNK = 65536


def console_routes(api: AppClient, gate: Gate) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.websocket(PATH + "/ws/console/{ref}")
    async def serial(ws: WebSocket, ref: str) -> None:
        try:
            gate.console(ws)
            info = await api.get(f"/domains/{q(ref)}/console")
            backlog = await api.get(f"/domains/{q(ref)}/dmesg",
                                    params={"lines": BACKLOG_LINES})
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(info["socket"]), 5)
        except HTTPException as exc:
            await deny(ws, exc.status_code, str(exc.detail))
            return
        except (GridvmError, OSError, TimeoutError) as exc:
            await deny(ws, 409, " ".join(str(exc).split()) or type(exc).__name__)
            return
        await ws.accept()
        await ws.send_bytes(backlog["text"].replace("\n", "\r\n").encode())
        await _bridge(ws, reader, writer)

    @r.websocket(PATH + "/ws/vnc/{ref}")
    async def vnc(ws: WebSocket, ref: str) -> None:
        await deny(ws, 501, "no graphical console yet: gridvmd gives HVM guests no VNC server")

    return r


async def deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse a websocket before accepting it: an HTTP answer with the status and message."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    else:
        await ws.close(code=4000 + status, reason=message[:120])


async def _bridge(ws: WebSocket, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    async def to_browser() -> None:
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)

    async def to_guest() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(to_browser()), asyncio.create_task(to_guest())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, OSError,
                                     RuntimeError):
                await t
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        with contextlib.suppress(RuntimeError, OSError):
            await ws.close(code=1000, reason="console closed")
