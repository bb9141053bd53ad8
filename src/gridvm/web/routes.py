"""The web console's routes under /ui: the page and its files, login, the live data stream
(server-sent events), a domain's stats stream, tasks, and actions (which start tasks).

Everything under /ui/api and /ui/ws needs a token (`gridvm.web.auth`); reads are open to any
valid token, actions (and the audit log) to admin tokens only. Data comes from the gridvmd
API called in-process, so the console shows exactly what `gridvm` would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, Field

from gridvm.api.client import AppClient
from gridvm.api.client import q as _q
from gridvm.api.tokens import Token, TokenStore, Unauthorized
from gridvm.errors import GridvmError
from gridvm.web.assets import static_file, vendor_file
from gridvm.web.auth import COOKIE, PATH, Gate, cookie_args, token_text, user_of
from gridvm.web.hub import Hub

HEARTBEAT_S = 15.0
RECHECK_S = 5.0          # an open stream re-checks its token this often
STATS_S = 1.0
HISTORY = 300


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=200)


class Action(BaseModel):
    action: str = Field(max_length=64)
    target: str = Field(min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)


def _event(name: str, text: str) -> str:
    return f"event: {name}\ndata: {text}\n\n"


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


def web_routes(api: AppClient, hub: Hub, tokens: TokenStore) -> APIRouter:
    gate = Gate(tokens)
    r = APIRouter(include_in_schema=False)    # the page's own API, not gridvmd's
    reader, writer, admin = Depends(gate.reader), Depends(gate.writer), Depends(gate.admin)

    # ----- the page ---------------------------------------------------------------------

    @r.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/")

    @r.get(f"{PATH}/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_file("index.html"), headers={"cache-control": "no-store"})

    @r.get(PATH + "/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        return FileResponse(static_file(name))

    @r.get(PATH + "/vendor/{path:path}", include_in_schema=False)
    async def vendor(path: str) -> FileResponse:
        return FileResponse(vendor_file(path), headers={"cache-control": "max-age=86400"})

    # ----- login ------------------------------------------------------------------------

    @r.post(PATH + "/api/login")
    async def login(req: Login, request: Request) -> Response:
        try:
            token = tokens.verify(req.token)
        except Unauthorized as exc:
            raise HTTPException(401, str(exc)) from None
        resp = JSONResponse(_me(token))
        resp.set_cookie(value=req.token.strip(), **cookie_args(request, token))
        return resp

    @r.post(PATH + "/api/logout")
    async def logout() -> Response:
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path=PATH)
        return resp

    @r.get(PATH + "/api/whoami")
    async def whoami(token: Token = reader) -> dict[str, Any]:
        return _me(token)

    # ----- data -------------------------------------------------------------------------

    @r.get(PATH + "/api/events")
    async def events(request: Request, token: Token = reader) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            yield _event("me", json.dumps(_me(token)))
            checked = time.monotonic()
            async with hub.subscribe() as q:
                while True:
                    try:
                        name, text = await asyncio.wait_for(q.get(), HEARTBEAT_S)
                        yield _event(name, text)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                    if time.monotonic() - checked > RECHECK_S:
                        checked = time.monotonic()
                        try:
                            tokens.verify(token_of(request))
                        except Unauthorized as exc:
                            yield _event("auth", json.dumps({"error": str(exc)}))
                            return
        return _sse(stream())

    @r.get(PATH + "/api/domains/{ref}")
    async def domain(ref: str, _: Token = reader) -> dict[str, Any]:
        view: dict[str, Any] = await api.get(f"/domains/{_q(ref)}")
        return view

    @r.get(PATH + "/api/domains/{ref}/stats")
    async def stats(ref: str, _: Token = reader) -> StreamingResponse:
        first = await api.get(f"/stats/{_q(ref)}/history", params={"limit": HISTORY})

        async def stream() -> AsyncIterator[str]:
            yield _event("history", json.dumps(first))
            last = first["samples"][-1]["time"] if first["samples"] else 0
            while True:
                await asyncio.sleep(STATS_S)
                try:
                    got = await api.get(f"/stats/{_q(ref)}/history", params={"limit": 5})
                except GridvmError as exc:        # stopped, or gone: say so and keep trying
                    yield _event("gone", json.dumps({"error": str(exc)}))
                    continue
                new = [s for s in got["samples"] if s["time"] > last]
                if new:
                    last = new[-1]["time"]
                    yield _event("samples", json.dumps(new))
        return _sse(stream())

    @r.get(PATH + "/api/tasks/{tid}")
    async def task(tid: str, after: int = 0, _: Token = reader) -> dict[str, Any]:
        view: dict[str, Any] = await api.get(f"/tasks/{_q(tid)}", params={"after": after})
        return view

    @r.get(PATH + "/api/audit")
    async def audit(limit: int = 100, _: Token = admin) -> Any:
        return await api.get("/audit", params={"limit": limit})

    @r.get(PATH + "/api/hosts")
    async def hosts(_: Token = reader) -> Any:
        return json.loads(hub.sections.get("hosts", "null")) or {}

    # ----- actions ----------------------------------------------------------------------

    @r.post(PATH + "/api/tasks")
    async def act(req: Action, token: Token = writer) -> dict[str, Any]:
        view: dict[str, Any] = await api.post("/tasks", {
            "action": req.action, "target": req.target, "params": req.params,
            "user": user_of(token)})
        hub.poke()
        return view

    return r


def token_of(request: Request) -> str:
    return token_text(request) or ""


def _me(token: Token) -> dict[str, Any]:
    return {"id": token.id, "role": token.role, "expires": token.expires,
            "comment": token.comment}
