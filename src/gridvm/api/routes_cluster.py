"""The cluster API (/v1/cluster/…) and the router that makes domain verbs cluster-wide.

`ClusterRouter` wraps the gridvmd app. On a clustered host, and for requests not already
routed (header x-gridvm-local), it:

* `GET /v1/domains`: lists every live host's domains (each view gets "host"), plus the
  registry's records of domains on hosts that are down;
* `POST /v1/domains`: checks the name cluster-wide, places the domain (`?host=H` forces
  a host) and sends the request to that host's gridvmd;
* `/v1/domains/{ref}[/…]` and `/v1/stats/{ref}/history`: when `ref` is not a local domain,
  forwards the request to the gridvmd of the host that has it;
* any request with the header x-gridvm-host: H (H not this host): forwards it to H's gridvmd
  (following a migration job on its source host, another host's networks or stats).
Everything else reaches the local API unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from typing import Any

import httpx
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gridvm.api.client import HOST_HEADER
from gridvm.api.relocation import parse_listen
from gridvm.cluster.node import LOCAL_HEADER, ClusterNode
from gridvm.cluster.placement import ACTIVE, Demand, NoHostFits, loads_from, place, why_not
from gridvm.cluster.settings import ClusterConfig
from gridvm.config.model import DomainConfig
from gridvm.errors import Conflict, GridvmError, NotFound, ResourceError

LISTEN_ENV = "GRIDVM_LISTEN"    # gridvmd --listen, for peers asking where to migrate to


class MaintenanceRequest(BaseModel):
    on: bool


def cluster_routes(node: ClusterNode) -> APIRouter:
    router = APIRouter(prefix="/v1/cluster")

    @router.get("")
    async def status() -> dict[str, Any]:
        return await asyncio.to_thread(node.status)

    @router.post("/join")
    async def join(cfg: ClusterConfig) -> dict[str, Any]:
        return await node.join(cfg)

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
        plan = await asyncio.to_thread(evacuation_plan, node, name)
        for step in plan["moves"]:
            step["target"] = await asyncio.to_thread(relocation_of, node, step["to"])
        return plan

    @router.get("/relocation")
    async def relocation() -> dict[str, Any]:
        return {"address": relocation_address()}

    @router.get("/hosts/{name}/relocation")
    async def host_relocation(name: str) -> dict[str, Any]:
        return {"host": name, "address": await asyncio.to_thread(relocation_of, node, name)}

    return router


MOVABLE = ("running", "blocked", "paused")


def relocation_address() -> str | None:
    """This gridvmd's relocation address (ADDR:PORT), if it listens on TCP."""
    listen = os.environ.get(LISTEN_ENV, "").strip()
    if not listen:
        return None
    host, port = parse_listen(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def relocation_of(node: ClusterNode, host: str) -> str:
    """Another host's relocation address, asked of its gridvmd."""
    c = node.peer(host, timeout=10)
    try:
        address = c.get("/cluster/relocation").get("address")
    finally:
        c.close()
    if not address:
        raise Conflict(f"host {host}'s gridvmd does not listen for migrations "
                       "(gridvmd --listen ADDR)")
    return str(address)


def evacuation_plan(node: ClusterNode, name: str) -> dict[str, Any]:
    """Where each running domain of `name` goes, by placement over the other hosts (largest
    first, each placement counting against its host). Raises before anything moves: the
    host is unknown or down, or some domain fits nowhere (with each host's reason)."""
    ccfg, cluster = node.need()
    states = cluster.host_states()
    if name not in states:
        raise NotFound(f"unknown host {name!r} (hosts: {', '.join(sorted(states))})")
    if states[name] not in ("up", "maintenance"):
        raise Conflict(f"host {name} is {states[name]}: there is nothing to migrate from it "
                       "(HA restarts its domains elsewhere)")
    registry = cluster.domains()
    loads = loads_from(states, cluster.capacity(), registry)
    others = [h for n, h in sorted(loads.items()) if n != name]
    mine = sorted(((uuid, DomainConfig.model_validate(rec["config"]), rec)
                   for uuid, rec in registry.items() if rec.get("host") == name),
                  key=lambda t: (-Demand.of(t[1]).memory_mb, -Demand.of(t[1]).cpu, t[1].name))
    moves: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for uuid, cfg, rec in mine:
        if rec.get("state") not in MOVABLE:
            left.append({"domain": cfg.name, "uuid": uuid, "state": rec.get("state")})
            continue
        demand = Demand.of(cfg)
        try:
            dest = place(demand, others, cpu_ratio=ccfg.cpu_ratio)
        except NoHostFits as exc:
            raise ResourceError(f"cannot evacuate {name}: {exc}; nothing was moved") from None
        dest.add(demand)
        moves.append({"domain": cfg.name, "uuid": uuid, "from": name, "to": dest.name,
                      "memory_mb": demand.memory_mb, "state": rec.get("state")})
    return {"host": name, "state": states[name], "api": cluster.hosts()[name].get("api"),
            "moves": moves, "left": left}


def host_list(node: ClusterNode) -> list[dict[str, Any]]:
    """Every joined host: state, capacity, load and domains."""
    _, cluster = node.need()
    states = cluster.host_states()
    caps = cluster.capacity()
    registry = cluster.domains()
    loads = loads_from(states, caps, registry)
    leader = node.election.leader() if node.election else None
    rows = []
    for name, state in sorted(states.items()):
        load, cap = loads[name], caps.get(name, {})
        rows.append({
            "name": name, "state": state, "leader": name == leader,
            "cpus": cap.get("cpus"), "memory_mb": cap.get("memory_mb"),
            "used_mb": load.used_mb, "used_cpu": round(load.used_cpu, 2),
            "load": cap.get("load"), "domains": sorted(
                str(r["name"]) for r in registry.values() if r.get("host") == name)})
    return rows


def set_maintenance(node: ClusterNode, name: str, on: bool) -> dict[str, Any]:
    _, cluster = node.need()
    key = cluster.key("hosts", name)
    rec = cluster.etcd.get_json(key)
    if rec is None:
        raise NotFound(f"unknown host {name!r} (hosts: {', '.join(cluster.hosts())})")
    cluster.etcd.put_json(key, {**rec, "maintenance": on})
    return {"host": name, "maintenance": on}


def remove_host(node: ClusterNode, name: str) -> dict[str, Any]:
    """Forget a host that is gone for good: its entry, and the registry records of its
    domains (their names become free to use again). Refused for this host, for a host that
    is up or in maintenance (evacuate it and stop it first), and while HA domains of it
    still wait for the HA manager to restart them elsewhere."""
    ccfg, cluster = node.need()
    states = cluster.host_states()
    if name not in states:
        raise NotFound(f"unknown host {name!r} (hosts: {', '.join(sorted(states))})")
    if name == ccfg.host:
        raise Conflict(f"host {name} cannot remove itself; run this on another host")
    if states[name] not in ("down", "fenced"):
        raise Conflict(f"host {name} is {states[name]}: only a host that is down can be "
                       "removed (evacuate it, then stop its gridvmd)")
    mine = {uuid: rec for uuid, rec in cluster.domains().items() if rec.get("host") == name}
    waiting = sorted(str(r["name"]) for r in mine.values() if r.get("ha", "off") != "off"
                     and r.get("state") in (*ACTIVE, "lost"))
    if waiting:
        raise Conflict(f"host {name} still has HA domains waiting to be restarted elsewhere: "
                       f"{', '.join(waiting)}; try again once they run")
    for uuid, rec in mine.items():
        cluster.forget_domain(uuid, str(rec.get("name", "")))
    cluster.forget_host(name)
    return {"host": name, "forgotten": sorted(str(r.get("name")) for r in mine.values())}


def choose_host(node: ClusterNode, cfg: DomainConfig, forced: str | None) -> str:
    """The host a new domain goes to (placement, or the forced one if it can run it)."""
    ccfg, cluster = node.need()
    existing = cluster.find_domain(cfg.name)
    if existing is not None:
        raise Conflict(f"domain name {cfg.name!r} is already in use in the cluster "
                       f"on host {existing.get('host')}")
    states = cluster.host_states()
    loads = loads_from(states, cluster.capacity(), cluster.domains())
    demand = Demand.of(cfg)
    if forced:
        if forced not in loads:
            raise NotFound(f"unknown host {forced!r} (hosts: {', '.join(sorted(loads))})")
        if loads[forced].state != "up":  # forcing skips placement, not host health
            why = why_not(demand, loads[forced], cpu_ratio=ccfg.cpu_ratio)
            raise ResourceError(f"host {forced} cannot take domain {cfg.name}: {why}")
        return forced
    return place(demand, list(loads.values()), cpu_ratio=ccfg.cpu_ratio).name


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
                     query: str = "") -> Response:
        sock = await asyncio.to_thread(self.node.peer_socket, host)
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://gridvmd",
                                     timeout=900) as c:
            try:
                r = await c.request(method, path + (f"?{query}" if query else ""), content=body,
                                    headers={LOCAL_HEADER: "1",
                                             "content-type": "application/json"})
            except httpx.HTTPError as exc:
                raise GridvmError(f"host {host}'s gridvmd does not answer: {exc}") from exc
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def _list(self) -> list[dict[str, Any]]:
        _, cluster = self.node.need()
        states = await asyncio.to_thread(cluster.host_states)
        live = [h for h, s in sorted(states.items()) if s in ("up", "maintenance")]

        async def one(host: str) -> list[dict[str, Any]]:
            try:
                r = await self._proxy(host, "GET", "/v1/domains")
            except GridvmError:
                return []
            views: list[dict[str, Any]] = json.loads(bytes(r.body)) if r.status_code == 200 \
                else []
            return [{**v, "host": host} for v in views]

        views = [v for part in await asyncio.gather(*(one(h) for h in live)) for v in part]
        seen = {v["uuid"] for v in views}
        registry = await asyncio.to_thread(cluster.domains)
        for uuid, g in sorted(registry.items(), key=lambda kv: str(kv[1]["name"])):
            if uuid not in seen and g.get("host") not in live:
                views.append({"name": g["name"], "uuid": uuid, "domid": None,
                              "state": g.get("state"), "memory": g.get("memory"),
                              "vcpus": g.get("vcpus"), "cpu_time": 0.0, "uptime": None,
                              "host": g.get("host"),
                              "host_state": states.get(str(g.get("host")), "unknown")})
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
        if rec is None or rec.get("host") == cfg.host:
            return None                          # unknown: the local API says so
        host = str(rec["host"])
        states = await asyncio.to_thread(cluster.host_states)
        if states.get(host) not in ("up", "maintenance"):
            raise Conflict(f"domain {rec['name']} is on host {host}, which is "
                           f"{states.get(host, 'unknown')}")
        return await self._proxy(host, scope["method"], scope["path"], await _body(receive),
                                 scope.get("query_string", b"").decode())


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
