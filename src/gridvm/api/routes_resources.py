"""API routes for resource control: sched-credit, vcpu pinning, memory, I/O throttles."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from gridvm.host.manager import HostManager


class SchedRequest(BaseModel):
    weight: int | None = None
    cap: int | None = None


class PinRequest(BaseModel):
    vcpu: str
    cpus: str


class MemRequest(BaseModel):
    mb: int


class ThrottleRequest(BaseModel):
    bps: int | None = None
    bps_rd: int | None = None
    bps_wr: int | None = None
    iops: int | None = None
    iops_rd: int | None = None
    iops_wr: int | None = None


class PpsRequest(BaseModel):
    pps: int | None = None


class RateRequest(BaseModel):
    rate: str | None = None


def resource_routes(m: HostManager) -> APIRouter:
    r = APIRouter(prefix="/v1")

    @r.get("/sched-credit")
    async def sched_all() -> list[dict[str, Any]]:
        return [{"name": rec.name, "domid": rec.domid, **rec.config.sched.model_dump()}
                for rec in m.store.all()]

    @r.post("/domains/{ref}/sched-credit")
    async def sched(ref: str, req: SchedRequest) -> dict[str, Any]:
        s = await m.sched_credit(ref, req.weight, req.cap)
        rec = m.lookup(ref)
        return {"name": rec.name, "domid": rec.domid, **s.model_dump()}

    @r.post("/domains/{ref}/vcpu-pin")
    async def pin(ref: str, req: PinRequest) -> dict[str, Any]:
        await m.vcpu_pin(ref, req.vcpu, req.cpus)
        return {"ok": True}

    @r.get("/vcpu-list")
    async def vcpus(dom: str | None = None) -> list[dict[str, Any]]:
        return await m.vcpu_list(dom)

    @r.post("/domains/{ref}/mem-set")
    async def mem_set(ref: str, req: MemRequest) -> dict[str, Any]:
        await m.mem_set(ref, req.mb)
        return {"ok": True}

    @r.post("/domains/{ref}/mem-limit")
    async def mem_limit(ref: str, req: MemRequest) -> dict[str, Any]:
        await m.mem_limit(ref, req.mb)
        return {"ok": True}

    @r.post("/domains/{ref}/mem-max")
    async def mem_max(ref: str, req: MemRequest) -> dict[str, Any]:
        await m.mem_max(ref, req.mb)
        return {"ok": True}

    @r.post("/domains/{ref}/block-throttle/{vdev}")
    async def throttle(ref: str, vdev: str, req: ThrottleRequest) -> dict[str, Any]:
        limits = {k: v for k, v in req.model_dump().items() if v is not None}
        await m.block_throttle(ref, vdev, limits)
        return {"ok": True}

    @r.post("/domains/{ref}/network-pps/{vif}")
    async def pps(ref: str, vif: str, req: PpsRequest) -> dict[str, Any]:
        await m.network_pps(ref, vif, req.pps or None)
        return {"ok": True}

    @r.post("/domains/{ref}/network-rate/{vif}")
    async def rate(ref: str, vif: str, req: RateRequest) -> dict[str, Any]:
        await m.network_rate(ref, vif, req.rate)
        return {"ok": True}

    return r
