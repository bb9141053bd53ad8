"""The gridvmd REST API (FastAPI), served on the home's Unix socket."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from gridvm.api import actions
from gridvm.api.audit import AuditLog, audit_routes
from gridvm.api.client import AppClient
from gridvm.api.console import console_routes
from gridvm.api.limits import BodyLimit
from gridvm.api.routes_backups import backup_routes
from gridvm.api.routes_cluster import ClusterRouter, cluster_routes
from gridvm.api.routes_devices import device_routes
from gridvm.api.routes_guest import guest_routes
from gridvm.api.routes_migration import migration_routes, migration_service
from gridvm.api.routes_network import network_router
from gridvm.api.routes_resources import resource_routes
from gridvm.api.routes_snapshots import snapshot_routes
from gridvm.api.routes_stats import stats_routes
from gridvm.api.tasks import TaskRequest, Tasks, task_routes
from gridvm.api.tokens import TokenStore, token_routes
from gridvm.api.vnc import vnc_routes
from gridvm.cluster.evacuation import Evacuations
from gridvm.cluster.node import ClusterNode
from gridvm.config.model import DomainConfig, Path_
from gridvm.errors import ConfigError, Conflict, GridvmError, NotFound, QemuError, ResourceError
from gridvm.host.backup import Backups
from gridvm.host.devices import Devices
from gridvm.host.manager import HostManager
from gridvm.host.restore import BackupStores
from gridvm.host.snapshots import Snapshots

log = logging.getLogger("gridvm.api")

STATUS = {NotFound: 404, Conflict: 409, ConfigError: 422, ResourceError: 507, QemuError: 502}
RESTORE_READ_S = 30.0   # reading a save file's header (a hung NFS mount must not hang us)


class ErrorBody(BaseModel):
    """Every error gridvmd answers: one line for the user, and the error's kind."""

    error: str
    type: str


# Status codes any route may answer, documented once for the whole API (OpenAPI).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the request cannot be carried out"},
    403: {"model": ErrorBody, "description": "refused (not allowed over this listener)"},
    404: {"model": ErrorBody, "description": "no such domain, network, host or job"},
    409: {"model": ErrorBody, "description": "conflicts with the current state"},
    413: {"model": ErrorBody, "description": "request body too large"},
    422: {"model": ErrorBody, "description": "invalid input (config, name, path, value)"},
    502: {"model": ErrorBody, "description": "QEMU failed or answered with an error"},
    507: {"model": ErrorBody, "description": "the host lacks the resources asked for"},
}


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
    name: str = Field(max_length=63)


class FileRequest(BaseModel):
    file: Path_ = Field(description="absolute path on the daemon's host")
    paused: bool = False


def request_problem(errors: Any) -> str:
    """Pydantic's list of errors → one line naming the first one's place."""
    err = errors[0] if errors else {}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    return f"invalid {'.'.join(loc) or 'request'}: {msg}"


def _validation_message(exc: ValidationError) -> str:
    return request_problem(exc.errors())


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes()[-256 * 1024:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def make_app(manager: HostManager, cluster_node: ClusterNode | None = None) -> FastAPI:
    """The API over one HostManager; its lifespan starts and closes the manager (and the
    node's cluster membership, and with a certificate the TCP listeners)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await node.resume()  # a clustered home rejoins before its domains are re-adopted
        await manager.start()
        await migrations.reconcile()  # settle migrations a previous gridvmd left half-way
        if node.files.identity.exists():
            await node.on_identity()
        tasks.reconcile()             # tasks a previous gridvmd left running have failed
        try:
            yield
        finally:
            await tasks.close()
            await inproc.aclose()
            tokens.close()
            audit.close()
            await evacuations.close()
            await migrations.close()
            await manager.close()
            await node.close()

    node = cluster_node or ClusterNode(manager)
    evacuations = Evacuations(node)
    migrations = migration_service(manager)
    app = FastAPI(title="gridvmd", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.add_middleware(ClusterRouter, node=node)
    app.add_middleware(BodyLimit)           # outermost: before any handler reads a body
    app.include_router(cluster_routes(node, evacuations))
    app.include_router(console_routes(manager, node))
    app.include_router(vnc_routes(manager, node))
    m = manager
    app.include_router(resource_routes(m))
    app.include_router(stats_routes(m))
    app.include_router(guest_routes(m))
    app.include_router(device_routes(m, Devices(m)))
    app.include_router(snapshot_routes(Snapshots(m)))
    app.include_router(backup_routes(Backups(m), BackupStores(m)))
    app.include_router(migration_routes(migrations, node.url_of))
    tasks, tokens, inproc = Tasks(m.home), TokenStore.of(m.home), AppClient(app)
    app.state.tasks, app.state.tokens = tasks, tokens
    app.state.evacuations = evacuations
    audit = app.state.audit = AuditLog(m.home.root, tokens=tokens.describe)

    async def start_task(req: TaskRequest) -> dict[str, Any]:
        target, run = await actions.prepare(inproc, req)
        return tasks.start(req.action, target, req.user, run)

    app.include_router(task_routes(tasks, start_task))
    app.include_router(token_routes(tokens))
    app.include_router(audit_routes(audit))

    @app.exception_handler(GridvmError)
    async def _gridvm_error(_: Request, exc: GridvmError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "type": type(exc).__name__},
                            status_code=status_for(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "type": "GridvmError"},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": request_problem(exc.errors()), "type": "ConfigError"},
                            status_code=422)

    @app.exception_handler(ValidationError)
    async def _invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc), "type": "ConfigError"},
                            status_code=422)

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
        return m.view(await m.restore(Path(req.file), paused=req.paused,
                                      read_timeout=RESTORE_READ_S))

    @app.get("/v1/domains/{ref}/console")
    async def console(ref: str) -> dict[str, Any]:
        vm = m.running(ref)
        return {"socket": str(vm.serial_socket), "log": str(vm.console_log),
                "stream": f"/v1/domains/{vm.rec.uuid}/console/stream"}

    @app.get("/v1/domains/{ref}/dmesg")
    async def dmesg(ref: str, lines: int = 200) -> dict[str, Any]:
        vm = m.running(ref)
        return {"text": _tail(vm.console_log, lines)}

    @app.get("/v1/images")
    async def images() -> list[dict[str, Any]]:
        from gridvm.images.store import list_images

        return [{**i.to_json(), "kernel_version": i.kernel_version, "recipe": i.recipe,
                 "hvm": i.disk is not None} for i in list_images(m.home.images)]

    @app.get("/v1/log")
    async def daemon_log(lines: int = 200) -> dict[str, Any]:
        return {"text": _tail(m.home.daemon_log, lines)}

    app.include_router(network_router(m))
    return app
