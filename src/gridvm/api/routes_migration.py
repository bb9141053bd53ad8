"""API routes for migration: `gridvm migrate` (the source's half), and the relocation API
(the destination's half), which peers reach over mutual TLS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from gridvm.api.hostpeer import HttpsPeer, api_url
from gridvm.api.listeners import parse_listen
from gridvm.cluster.settings import Files
from gridvm.config.model import HOSTREF_RE as HOST_RE
from gridvm.errors import ConfigError, GridvmError
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
    # The destination: a host of our cluster by name, or its gridvmd's ADDR[:PORT].
    target: str = Field(min_length=1, max_length=300)


def migration_service(m: HostManager) -> Migrations:
    """The host's migrations; destinations are reached over mutual TLS (HttpsPeer)."""

    def connect(url: str) -> Peer:
        return HttpsPeer.of(url, Files(m.home).identity)

    return Migrations(m, connect)


def target_url(target: str, lookup: Callable[[str], str] | None) -> str:
    """The destination's URL: `ADDR[:PORT]`, or a cluster host's name (`lookup` reads the
    registry; blocking)."""
    try:
        return api_url(*parse_listen(target))
    except ConfigError:
        if lookup is None or not HOST_RE.fullmatch(target):
            raise ConfigError(f"invalid destination {target!r}: a host of this cluster or "
                              "its ADDR[:PORT]") from None
        return lookup(target)


def migration_routes(svc: Migrations, lookup: Callable[[str], str] | None = None) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/domains/{ref}/migrate")
    async def migrate(ref: str, req: MigrateRequest) -> dict[str, Any]:
        opts = MigrateOptions.model_validate(req.model_dump(exclude={"target"}))
        url = await asyncio.to_thread(target_url, req.target, lookup)
        return (await svc.start(ref, url, opts)).view()

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
