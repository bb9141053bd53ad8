"""API routes for snapshots: create, list (the tree), revert, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gridvm.host.snapshots import Snapshots


class CreateSnapshot(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    memory: bool = False
    convert: bool = False


def snapshot_routes(snaps: Snapshots) -> APIRouter:
    r = APIRouter(prefix="/v1/domains/{ref}/snapshots")

    @r.get("")
    async def listing(ref: str) -> dict[str, Any]:
        return snaps.tree(ref)

    @r.post("")
    async def create(ref: str, req: CreateSnapshot) -> dict[str, Any]:
        return await snaps.create(ref, req.name, memory=req.memory, convert=req.convert)

    @r.post("/{name}/revert")
    async def revert(ref: str, name: str) -> dict[str, Any]:
        return await snaps.revert(ref, name)

    @r.delete("/{name}")
    async def delete(ref: str, name: str) -> dict[str, Any]:
        await snaps.delete(ref, name)
        return {"deleted": name}

    return r
