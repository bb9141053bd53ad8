"""Consoles in the browser: a domain's serial console over a websocket (xterm.js).

The websocket is bridged to the domain's console stream (`gridvm.api.console`: the serial
socket here, or the console websocket of the host that runs the domain, over mutual TLS).
On connect the
page first gets the end of the console log, so it opens on what the guest printed last.
Guest output goes to the browser as binary frames; what the browser sends (typed or pasted
text) goes to the guest. Like `gridvm console`, one client at a time holds the serial port.

The graphical console (noVNC) of a domain with `vnc = 1` is the websocket /ui/ws/vnc/{ref},
bridged the same way to QEMU's VNC server (`gridvm.api.vnc`); VNC's own password
authentication happens between noVNC and QEMU.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, WebSocket
from fastapi.responses import JSONResponse

from gridvm.api.client import AppClient, q
from gridvm.api.console import bridge, open_console
from gridvm.api.vnc import open_vnc
from gridvm.cluster.node import ClusterNode
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager
from gridvm.web.auth import PATH, Gate

log = logging.getLogger("gridvm.web.console")

BACKLOG_LINES = 40
CHUNK = 65536


def console_routes(api: AppClient, gate: Gate, manager: HostManager,
                   node: ClusterNode) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.websocket(PATH + "/ws/console/{ref}")
    async def serial(ws: WebSocket, ref: str) -> None:
        try:
            gate.console(ws)
            await api.get(f"/domains/{q(ref)}/console")       # running (any host), or 4xx
            backlog = await api.get(f"/domains/{q(ref)}/dmesg",
                                    params={"lines": BACKLOG_LINES})
            console = await open_console(manager, node, ref)
        except HTTPException as exc:
            await deny(ws, exc.status_code, str(exc.detail))
            return
        except (GridvmError, OSError, TimeoutError) as exc:
            await deny(ws, 409, " ".join(str(exc).split()) or type(exc).__name__)
            return
        await ws.accept()
        await ws.send_bytes(backlog["text"].replace("\n", "\r\n").encode())
        await bridge(ws, console)

    @r.websocket(PATH + "/ws/vnc/{ref}")
    async def vnc(ws: WebSocket, ref: str) -> None:
        try:
            gate.console(ws)
            await api.get(f"/domains/{q(ref)}/vnc")       # running with VNC (any host), or 4xx
            stream = await open_vnc(manager, node, ref)
        except HTTPException as exc:
            await deny(ws, exc.status_code, str(exc.detail))
            return
        except (GridvmError, OSError, TimeoutError) as exc:
            await deny(ws, 409, " ".join(str(exc).split()) or type(exc).__name__)
            return
        # noVNC asks for the "binary" subprotocol (older ones) or none
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol="binary" if "binary" in offered else None)
        await bridge(ws, stream)

    return r


async def deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse a websocket before accepting it: an HTTP answer with the status and message."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    else:
        await ws.close(code=4000 + status, reason=message[:120])
