"""API routes for device hotplug (block-*, network-*, vcpu-set) and the VNC display."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gridvm.config.model import MAX_VCPUS, DiskSpec, VifSpec
from gridvm.host.devices import Devices
from gridvm.host.manager import HostManager
from gridvm.host.vnc import display_of


class AttachDisk(BaseModel):
    disk: DiskSpec


class AttachVif(BaseModel):
    vif: VifSpec = Field(default_factory=VifSpec)


class VcpuSet(BaseModel):
    vcpus: int = Field(ge=1, le=MAX_VCPUS)


def device_routes(m: HostManager, dev: Devices) -> APIRouter:
    r = APIRouter(prefix="/v1/domains/{ref}")

    @r.get("/block")
    async def block_list(ref: str) -> list[dict[str, Any]]:
        return dev.block_list(ref)

    @r.post("/block")
    async def block_attach(ref: str, req: AttachDisk) -> dict[str, Any]:
        return (await dev.block_attach(ref, req.disk)).model_dump()

    @r.delete("/block/{vdev}")
    async def block_detach(ref: str, vdev: str) -> dict[str, Any]:
        await dev.block_detach(ref, vdev)
        return {"detached": vdev}

    @r.get("/network")
    async def network_list(ref: str) -> list[dict[str, Any]]:
        return dev.network_list(ref)

    @r.post("/network")
    async def network_attach(ref: str, req: AttachVif) -> dict[str, Any]:
        return (await dev.network_attach(ref, req.vif)).model_dump()

    @r.delete("/network/{which}")
    async def network_detach(ref: str, which: str) -> dict[str, Any]:
        await dev.network_detach(ref, which)
        return {"detached": which}

    @r.post("/vcpu-set")
    async def vcpu_set(ref: str, req: VcpuSet) -> dict[str, Any]:
        return await dev.vcpu_set(ref, req.vcpus)

    @r.get("/vnc")
    async def vnc(ref: str) -> dict[str, Any]:
        return await display_of(m.running(ref))

    return r
