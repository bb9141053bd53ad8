"""A domain's VNC server as a byte stream, wherever the domain runs (for the web console's
noVNC): on its own host a TCP connection to QEMU's VNC port; on another host of the cluster,
that host's VNC websocket (`/v1/domains/{ref}/vnc/stream`) over mutual TLS, as for serial
consoles (`gridvm.api.console`). VNC's own authentication passes through untouched.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from gridvm.api.console import ConsoleStream, SerialSocket, remote_stream, stream_routes
from gridvm.cluster.node import ClusterNode
from gridvm.errors import Conflict, NotFound
from gridvm.host.manager import HostManager
from gridvm.host.vnc import connect_address, display_of

OPEN_TIMEOUT_S = 5.0
VNC_STREAM = "/v1/domains/{ref}/vnc/stream"


async def open_vnc(manager: HostManager, node: ClusterNode, ref: str) -> ConsoleStream:
    """The VNC server of domain `ref`, here or on the host of the cluster that runs it."""
    try:
        vm = manager.running(ref)
    except NotFound:
        if not node.joined:
            raise
        return await remote_stream(manager, node, ref, VNC_STREAM)
    info = await display_of(vm)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(connect_address(info["host"]), info["port"]),
            OPEN_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise Conflict(f"cannot reach the VNC server of {vm.name}: {exc}") from None
    return SerialSocket(reader, writer)


def vnc_routes(manager: HostManager, node: ClusterNode) -> APIRouter:
    return stream_routes(manager, node, VNC_STREAM, open_vnc)
