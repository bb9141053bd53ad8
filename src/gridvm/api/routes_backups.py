"""API routes for backups: back a domain up, and list, verify, prune or restore a store's
backups (stores are directories on the daemon's host)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gridvm.config.model import Path_
from gridvm.host.backup import Backups
from gridvm.host.restore import BackupStores


class BackupRequest(BaseModel):
    store: Path_
    full: bool = False


class StoreRequest(BaseModel):
    store: Path_


class VerifyRequest(StoreRequest):
    which: str | None = Field(default=None, max_length=200,
                              description="a backup id or a domain; default every backup")


class PruneRequest(StoreRequest):
    keep_last: int = Field(ge=1, le=100_000)
    domain: str | None = Field(default=None, max_length=63)


class RestoreRequest(StoreRequest):
    id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=63)
    domain: str | None = Field(default=None, max_length=63)
    dir: Path_ | None = None
    start: bool = False


def backup_routes(backups: Backups, stores: BackupStores) -> APIRouter:
    r = APIRouter(prefix="/v1")

    @r.post("/domains/{ref}/backup")
    async def backup(ref: str, req: BackupRequest) -> dict[str, Any]:
        return await backups.backup(ref, req.store, full=req.full)

    @r.get("/backups")
    async def listing(store: str, domain: str | None = None) -> dict[str, Any]:
        return await stores.listing(StoreRequest(store=store).store, domain)

    @r.post("/backups/verify")
    async def verify(req: VerifyRequest) -> list[dict[str, Any]]:
        return await stores.verify(req.store, req.which)

    @r.post("/backups/prune")
    async def prune(req: PruneRequest) -> dict[str, Any]:
        return await stores.prune(req.store, req.keep_last, req.domain)

    @r.post("/backups/restore")
    async def restore(req: RestoreRequest) -> dict[str, Any]:
        return await stores.restore(req.store, req.id, req.name, domain=req.domain,
                                    target_dir=req.dir, start=req.start)

    return r
