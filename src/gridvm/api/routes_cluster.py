"""The cluster API (/v1/cluster/…) and the router that makes domain verbs cluster-wide.

`ClusterRouter` wraps the gridvmd app. On a clustered host, and for requests not already
routed (header x-gridvm-local), it:

* `GET /v1/domains`: lists every live host's domains (each view gets "host"), plus the
  registry's records of domains on hosts that are down and of domains no host holds
  (`lost`, `ha-failed`);
* `POST /v1/domains`: checks the name cluster-wide, places the domain (`?host=H` forces
  a host) and sends the request to that host's gridvmd;
* `/v1/domains/{ref}[/…]` and `/v1/stats/{ref}/history`: when `ref` is not a local domain,
  forwards the request to the gridvmd of the host that has it; a domain no host holds is
  shown, deleted or (ha-failed) started again here;
* any request with the header x-gridvm-host: H (H not this host): forwards it to H's gridvmd
  (following a migration job on its source host, another host's networks or stats).
Everything else reaches the local API unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gridvm.api.client import HOST_HEADER
from gridvm.cluster import enroll
from gridvm.cluster.custody import WAITING, Custody
from gridvm.cluster.evacuation import Evacuations
from gridvm.cluster.membership import InitRequest, JoinRequest
from gridvm.cluster.node import LAUNCH_TIMEOUT_S, LOCAL_HEADER, ClusterNode
from gridvm.cluster.service import (
    choose_host,
    evacuation_plan,
    forget_waiting,
    host_list,
    remove_host,
    restart_failed,
    restart_failed_back,
    revoke_member,
    set_maintenance,
)
from gridvm.config.model import DomainConfig, HostRef
from gridvm.errors import Conflict, GridvmError, NotFound

LIST_S = 10.0      # a host that does not list its domains in time is left out of a listing


class MaintenanceRequest(BaseModel):
    on: bool


class RevokeRequest(BaseModel):
    name: HostRef


class EvacuateRequest(BaseModel):
    timeout: float = Field(default=600, gt=0, le=86400)


class TokenRequest(BaseModel):
    role: enroll.Role = "host"
    ttl: float = Field(default=enroll.TOKEN_TTL_S, gt=0, le=30 * 86400)


def cluster_routes(node: ClusterNode, evacuations: Evacuations) -> APIRouter:
    router = APIRouter(prefix="/v1/cluster")

    @router.get("")
    async def status() -> dict[str, Any]:
        return await asyncio.to_thread(node.status)

    @router.post("/init")
    async def init(req: InitRequest) -> dict[str, Any]:
        return await node.init(req)

    @router.post("/join")
    async def join(req: JoinRequest) -> dict[str, Any]:
        return await node.join(req)

    @router.post("/revoke")
    async def revoke(req: RevokeRequest) -> dict[str, Any]:
        return await asyncio.to_thread(revoke_member, node, req.name)

    @router.post("/token")
    async def token(req: TokenRequest) -> dict[str, Any]:
        return await node.token(role=req.role, ttl_s=req.ttl)

    @router.get("/hosts")
    async def hosts() -> list[dict[str, Any]]:
        return await asyncio.to_thread(host_list, node)

    @router.post("/hosts/{name}/maintenance")
    async def maintenance(name: str, req: MaintenanceRequest) -> dict[str, Any]:
        return await asyncio.to_thread(set_maintenance, node, name, req.on)

    @router.delete("/hosts/{name}")
    async def remove(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(remove_host, node, name)

    @router.get("/hosts/{name}/evacuation")
    async def evacuation(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(evacuation_plan, node, name)

    @router.post("/hosts/{name}/evacuate")
    async def evacuate(name: str, req: EvacuateRequest) -> dict[str, Any]:
        return (await evacuations.start(name, req.timeout)).view()

    @router.get("/evacuations")
    async def evacuation_jobs() -> list[dict[str, Any]]:
        return [j.view() for j in evacuations.jobs.values()]

    @router.get("/evacuations/{jid}")
    async def evacuation_job(jid: str) -> dict[str, Any]:
        return evacuations.job(jid).view()

    @router.post("/evacuations/{jid}/cancel")
    async def evacuation_cancel(jid: str) -> dict[str, Any]:
        return evacuations.cancel(jid).view()

    return router


class ClusterRouter:
    """ASGI middleware: routes domain requests to the host that has (or will have) them."""

    def __init__(self, app: ASGIApp, node: ClusterNode) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.node.joined or any(
                k.decode().lower() == LOCAL_HEADER for k, _ in scope.get("headers", [])):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        host = _header(scope, HOST_HEADER)
        try:
            if host is not None and host != self.node.need()[0].host:
                resp: Response | None = await self._proxy(
                    host, method, path, await _body(receive),
                    scope.get("query_string", b"").decode())
            elif path == "/v1/domains" and method == "GET":
                resp = JSONResponse(await self._list())
            elif path == "/v1/domains" and method == "POST":
                resp = await self._create(scope, await _body(receive))
            elif path.startswith("/v1/domains/") or (
                    path.startswith("/v1/stats/") and path.endswith("/history")):
                resp = await self._route(scope, receive, path.split("/")[3])
            elif path.startswith("/v1/migrations/"):
                resp = await self._at_host(scope)
            else:
                resp = None
        except GridvmError as exc:
            from gridvm.api.app import status_for

            resp = JSONResponse({"error": str(exc), "type": type(exc).__name__},
                                status_code=status_for(exc))
        if resp is None:
            await self.app(scope, receive, send)
        else:
            await resp(scope, receive, send)

    async def _proxy(self, host: str, method: str, path: str, body: bytes = b"",
                     query: str = "", timeout: float = 900) -> Response:
        if self.node.peers is None:
            raise Conflict("this gridvmd cannot reach other hosts")
        peer = await self.node.peers.peer(host)
        try:
            r = await peer.request(method, path, body=body, query=query, timeout=timeout)
        except GridvmError as exc:
            raise GridvmError(f"host {host}'s gridvmd does not answer: {exc}") from exc
        finally:
            await peer.close()
        return Response(r.body, status_code=r.status, media_type="application/json")

    async def _list(self) -> list[dict[str, Any]]:
        _, cluster = self.node.need()
        states = await asyncio.to_thread(cluster.host_states)
        live = [h for h, s in sorted(states.items()) if s in ("up", "maintenance")]

        async def one(host: str) -> list[dict[str, Any]]:
            try:
                r = await self._proxy(host, "GET", "/v1/domains", timeout=LIST_S)
            except GridvmError:
                return []
            views: list[dict[str, Any]] = json.loads(bytes(r.body)) if r.status_code == 200 \
                else []
            return [{**v, "host": host} for v in views]

        views = [v for part in await asyncio.gather(*(one(h) for h in live)) for v in part]
        seen = {v["uuid"] for v in views}
        registry = await asyncio.to_thread(cluster.domains)
        for uuid, g in sorted(registry.items(), key=lambda kv: str(kv[1]["name"])):
            if uuid not in seen and (g.get("host") not in live or g.get("state") in WAITING):
                views.append({"name": g["name"], "uuid": uuid, "domid": None,
                              "state": g.get("state"), "memory": g.get("memory"),
                              "vcpus": g.get("vcpus"), "cpu_time": 0.0, "uptime": None,
                              "host": g.get("host"),
                              "host_state": None if g.get("state") in WAITING else
                              states.get(str(g.get("host")), "unknown")})
        return views

    async def _create(self, scope: Scope, body: bytes) -> Response:
        try:
            req = json.loads(body or b"{}")
            cfg = DomainConfig.model_validate(req["config"])
        except (ValueError, KeyError, TypeError):
            return await self._proxy_local(scope, body)  # let the API report the error
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
        forced = (query.get("host") or [None])[0]
        host = await asyncio.to_thread(choose_host, self.node, cfg, forced)
        resp = await self._proxy(host, "POST", "/v1/domains", body)
        if resp.status_code == 200:
            view = json.loads(bytes(resp.body))
            return JSONResponse({**view, "host": host})
        return resp

    async def _proxy_local(self, scope: Scope, body: bytes) -> Response:
        cfg, _ = self.node.need()
        return await self._proxy(cfg.host, scope["method"], scope["path"], body,
                                 scope.get("query_string", b"").decode())

    async def _route(self, scope: Scope, receive: Receive, ref: str) -> Response | None:
        ref = urllib.parse.unquote(ref)
        try:
            self.node.m.lookup(ref)
            return None                          # ours: the local API handles it
        except NotFound:
            pass
        cfg, cluster = self.node.need()
        rec = await asyncio.to_thread(cluster.find_domain, ref)
        if rec is not None and rec.get("state") in WAITING:
            return await self._waiting(scope, rec)
        if rec is None or rec.get("host") == cfg.host:
            return None                          # unknown: the local API says so
        host = str(rec["host"])
        states = await asyncio.to_thread(cluster.host_states)
        if states.get(host) not in ("up", "maintenance"):
            raise Conflict(f"domain {rec['name']} is on host {host}, which is "
                           f"{states.get(host, 'unknown')}")
        resp = await self._proxy(host, scope["method"], scope["path"], await _body(receive),
                                 scope.get("query_string", b"").decode())
        if scope["path"].endswith(("/migrate", "/migrate/cancel")) and resp.status_code == 200:
            # A migration job lives on the source: say which host to follow it on.
            return JSONResponse({**json.loads(bytes(resp.body)), "host": host})
        return resp

    async def _waiting(self, scope: Scope, rec: dict[str, Any]) -> Response:
        """A domain no host holds: `lost` (the HA manager restarts it) or `ha-failed` (the
        HA manager gave up): shown, deleted, or — ha-failed — started by the operator."""
        uuid, name, state = str(rec["uuid"]), str(rec["name"]), str(rec.get("state"))
        action = "/".join(scope["path"].split("/")[4:])
        method = scope["method"]
        if method == "GET" and action == "":
            return JSONResponse(waiting_view(rec))
        if method == "DELETE" and action == "":
            return JSONResponse(await asyncio.to_thread(forget_waiting, self.node, uuid))
        if method == "POST" and action == "start":
            host, moved = await asyncio.to_thread(restart_failed, self.node, uuid)
            body = json.dumps({"config": moved["config"],
                               "managed": bool(moved.get("managed"))}).encode()
            try:
                resp = await self._proxy(host, "POST", "/v1/domains", body,
                                         timeout=LAUNCH_TIMEOUT_S)
            except GridvmError as exc:
                await asyncio.to_thread(restart_failed_back, self.node, uuid, str(exc))
                raise
            if resp.status_code != 200:
                why = f"HTTP {resp.status_code}"
                with contextlib.suppress(ValueError, AttributeError):
                    why = str(json.loads(bytes(resp.body)).get("error") or why)
                await asyncio.to_thread(restart_failed_back, self.node, uuid, why)
                return resp
            return JSONResponse({**json.loads(bytes(resp.body)), "host": host})
        then = ("the HA manager restarts it" if state == Custody.LOST else
                f"`gridvm start {name}` starts it again, `gridvm delete {name}` removes it")
        raise Conflict(f"domain {name} runs on no host ({state}: "
                       f"{rec.get('reason') or 'no reason recorded'}); {then}")

    async def _at_host(self, scope: Scope) -> Response | None:
        """`/v1/migrations/…?host=H`: a job that runs on host H."""
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
        host = (query.get("host") or [None])[0]
        cfg, _ = self.node.need()
        if host is None or host == cfg.host:
            return None
        return await self._proxy(host, scope["method"], scope["path"])


def waiting_view(rec: dict[str, Any]) -> dict[str, Any]:
    """A domain view (as a host gives it) of a registry record no host holds."""
    cfg = DomainConfig.model_validate(rec["config"])
    return {
        "name": cfg.name, "uuid": rec["uuid"], "domid": None, "state": rec.get("state"),
        "type": cfg.type, "memory": cfg.memory, "maxmem": cfg.max_memory, "vcpus": cfg.vcpus,
        "cpu_time": 0.0, "uptime": None, "managed": bool(rec.get("managed")), "accel": None,
        "pid": None, "vifs": [{"mac": v.mac, "bridge": v.bridge, "ip": v.ip or cfg.net.ip,
                               "tap": None} for v in cfg.vifs],
        "disks": [d.model_dump() for d in cfg.disks], "shutdown_reason": rec.get("reason"),
        "config": cfg.public(), "host": rec.get("host"), "host_state": None,
    }


def _header(scope: Scope, name: str) -> str | None:
    for k, v in scope.get("headers", []):
        if k.decode().lower() == name:
            return str(v.decode())
    return None


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)
