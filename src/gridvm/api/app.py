"""The gridvmd REST API (FastAPI), served on the home's Unix socket."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from gridvm.api.routes_cluster import ClusterRouter, cluster_routes
from gridvm.api.routes_guest import guest_routes
from gridvm.api.routes_migration import migration_routes, migration_service
from gridvm.api.routes_network import network_router
from gridvm.api.routes_resources import resource_routes
from gridvm.api.routes_stats import stats_routes
from gridvm.cluster.node import ClusterNode
from gridvm.config.model import DomainConfig
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound, QemuError, ResourceError
from gridvm.host.manager import HostManager

log = logging.getLogger("gridvm.api")

STATUS = {NotFound: 404, Conflict: 409, ConfigError: 422, ResourceError: 507, QemuError: 502}


def status_for(exc: GridvmError) -> int:
    for cls, code in STATUS.items():
        if isinstance(exc, cls):
            return code
    return 400


class CreateRequest(BaseModel):
    config: DomainConfig
    managed: bool = False
    start: bool = True
    paused: bool = False


class WaitRequest(BaseModel):
    wait: bool = False
    timeout: float = 120


class ShutdownRequest(WaitRequest):
    agent: Literal["fallback", "only", "never"] = "fallback"


class StartRequest(BaseModel):
    paused: bool = False


class RenameRequest(BaseModel):
    name: str


class FileRequest(BaseModel):
    file: str
    paused: bool = False


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes()[-256 * 1024:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def make_app(manager: HostManager) -> FastAPI:
    """The API over one HostManager; its lifespan starts and closes the manager."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await node.resume()  # a clustered home rejoins before its domains are re-adopted
        await manager.start()
        await migrations.reconcile()  # settle migrations a previous gridvmd left half-way
        try:
            yield
        finally:
            await migrations.close()
            await manager.close()
            await node.close()

    node = ClusterNode(manager)
    migrations = migration_service(manager)
    app = FastAPI(title="gridvmd", lifespan=lifespan)
    app.add_middleware(ClusterRouter, node=node)
    app.include_router(cluster_routes(node))
    m = manager
    app.include_router(resource_routes(m))
    app.include_router(stats_routes(m))
    app.include_router(guest_routes(m))
    app.include_router(migration_routes(migrations))

    @app.exception_handler(GridvmError)
    async def _gridvm_error(_: Request, exc: GridvmError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "type": type(exc).__name__},
                            status_code=status_for(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"error": f"internal error in gridvmd: {type(exc).__name__}: {exc}",
                             "type": "GridvmError"}, status_code=500)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return m.info()

    @app.get("/v1/domains")
    async def domains() -> list[dict[str, Any]]:
        # A running domain's record in memory is fresher than the stored one (paused, …).
        return [await m.live_view(m.lookup(r.uuid)) for r in m.store.all()]

    @app.post("/v1/domains")
    async def create(req: CreateRequest) -> dict[str, Any]:
        rec = await m.create(req.config, managed=req.managed, start=req.start,
                             paused=req.paused)
        return m.view(m.lookup(rec.uuid))

    @app.get("/v1/domains/{ref}")
    async def domain(ref: str) -> dict[str, Any]:
        return await m.live_view(m.lookup(ref))

    @app.delete("/v1/domains/{ref}")
    async def delete(ref: str) -> dict[str, Any]:
        await m.delete(ref)
        return {"deleted": ref}

    @app.post("/v1/domains/{ref}/start")
    async def start(ref: str, req: StartRequest) -> dict[str, Any]:
        rec = await m.start_domain(ref, paused=req.paused)
        return m.view(rec)

    @app.post("/v1/domains/{ref}/shutdown")
    async def shutdown(ref: str, req: ShutdownRequest) -> dict[str, Any]:
        await m.shutdown(ref, wait=req.wait, timeout=req.timeout, agent=req.agent)
        return {"ok": True}

    @app.post("/v1/domains/{ref}/reboot")
    async def reboot(ref: str, req: WaitRequest) -> dict[str, Any]:
        await m.reboot(ref, wait=req.wait, timeout=req.timeout)
        return {"ok": True}

    @app.post("/v1/domains/{ref}/destroy")
    async def destroy(ref: str) -> dict[str, Any]:
        await m.destroy(ref)
        return {"ok": True}

    @app.post("/v1/domains/{ref}/pause")
    async def pause(ref: str) -> dict[str, Any]:
        await m.pause(ref)
        return {"ok": True}

    @app.post("/v1/domains/{ref}/unpause")
    async def unpause(ref: str) -> dict[str, Any]:
        await m.unpause(ref)
        return {"ok": True}

    @app.post("/v1/domains/{ref}/rename")
    async def rename(ref: str, req: RenameRequest) -> dict[str, Any]:
        return m.view(await m.rename(ref, req.name))

    @app.post("/v1/domains/{ref}/save")
    async def save(ref: str, req: FileRequest) -> dict[str, Any]:
        await m.save(ref, Path(req.file))
        return {"ok": True, "file": req.file}

    @app.post("/v1/restore")
    async def restore(req: FileRequest) -> dict[str, Any]:
        return m.view(await m.restore(Path(req.file), paused=req.paused))

    @app.get("/v1/domains/{ref}/console")
    async def console(ref: str) -> dict[str, Any]:
        vm = m.running(ref)
        return {"socket": str(vm.serial_socket), "log": str(vm.console_log)}

    @app.get("/v1/domains/{ref}/dmesg")
    async def dmesg(ref: str, lines: int = 200) -> dict[str, Any]:
        vm = m.running(ref)
        return {"text": _tail(vm.console_log, lines)}

    @app.get("/v1/log")
    async def daemon_log(lines: int = 200) -> dict[str, Any]:
        return {"text": _tail(m.home.daemon_log, lines)}

    app.include_router(network_router(m))
    return app
