"""API routes for migration: `gridvm migrate` on the Unix socket, the relocation API (the
destination's half) for peers over TCP."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gridvm.api.relocation import HttpPeer, load_token
from gridvm.errors import GridvmError
from gridvm.host.manager import HostManager
from gridvm.host.migration import (
    IncomingView,
    MigrateOptions,
    Migrations,
    Peer,
    PrepareAnswer,
    PrepareRequest,
)


class MigrateRequest(MigrateOptions):
    target: str   # the destination gridvmd's relocation address, ADDR:PORT


def migration_service(m: HostManager) -> Migrations:
    """The host's migrations; peers are reached over HTTP with the home's shared token."""

    def connect(target: str) -> Peer:
        return HttpPeer(target, load_token(m.home))

    return Migrations(m, connect)


def migration_routes(svc: Migrations) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/domains/{ref}/migrate")
    async def migrate(ref: str, req: MigrateRequest) -> dict[str, Any]:
        opts = MigrateOptions.model_validate(req.model_dump(exclude={"target"}))
        return (await svc.start(ref, req.target, opts)).view()

    @r.post("/v1/domains/{ref}/migrate/cancel")
    async def cancel(ref: str) -> dict[str, Any]:
        return svc.cancel(ref).view()

    @r.get("/v1/migrations")
    async def jobs() -> list[dict[str, Any]]:
        return [j.view() for j in svc.jobs.values()]

    @r.get("/v1/migrations/{mid}")
    async def job(mid: str) -> dict[str, Any]:
        return svc.job(mid).view()

    # ----- the destination's half, for peers over TCP -----------------------------------

    @r.post("/v1/relocation/prepare")
    async def prepare(req: PrepareRequest, request: Request) -> PrepareAnswer:
        server = request.scope.get("server")
        if not server or server[1] is None:
            raise GridvmError("relocation is served over TCP only (gridvmd --listen)")
        return await svc.prepare(req, str(server[0]))

    @r.get("/v1/relocation/{mid}")
    async def incoming(mid: str) -> IncomingView:
        return svc.incoming_view(mid)

    @r.post("/v1/relocation/{mid}/abort")
    async def abort(mid: str) -> IncomingView:
        return await svc.abort(mid)

    return r
