"""/v1/networks: gridvm networks and their port forwards."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from gridvm.errors import ResourceError
from gridvm.host.manager import HostManager
from gridvm.host.networks import Forward, Mode, NetworkManager, Proto


class NetworkCreate(BaseModel):
    name: str
    mode: Mode
    uplink: str | None = None
    subnet: str | None = None


def network_router(manager: HostManager) -> APIRouter:
    """Routes over the manager's network layer (its `net`, a NetworkManager)."""
    router = APIRouter(prefix="/v1/networks")

    def nets() -> NetworkManager:
        if not isinstance(manager.net, NetworkManager):
            raise ResourceError("this gridvmd runs without gridvm networks")
        return manager.net

    @router.get("")
    async def list_networks() -> list[dict[str, Any]]:
        return nets().views()

    @router.post("")
    async def create_network(req: NetworkCreate) -> dict[str, Any]:
        n = nets()
        return n.view(await n.create(req.name, req.mode, uplink=req.uplink, subnet=req.subnet))

    @router.get("/{name}")
    async def show_network(name: str) -> dict[str, Any]:
        n = nets()
        return n.view(n.get(name))

    @router.delete("/{name}")
    async def delete_network(name: str) -> dict[str, Any]:
        await nets().delete(name)
        return {"deleted": name}

    @router.post("/{name}/forwards")
    async def add_forward(name: str, req: Forward) -> dict[str, Any]:
        n = nets()
        return n.view(await n.add_forward(name, req))

    @router.delete("/{name}/forwards/{proto}/{host_port}")
    async def remove_forward(name: str, proto: Proto, host_port: int) -> dict[str, Any]:
        n = nets()
        return n.view(await n.remove_forward(name, host_port, proto))

    return router
