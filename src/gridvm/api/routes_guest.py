"""API routes that go through a domain's guest agent: exec, filesystem freeze, ping."""

from __future__ import annotations

import base64
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Base64Bytes, BaseModel, Field

from gridvm.host.manager import HostManager


class ExecRequest(BaseModel):
    argv: list[str] = Field(min_length=1, max_length=1024)
    input: Base64Bytes | None = Field(default=None, description="stdin, base64")
    timeout: float = Field(default=60, gt=0, le=3600)


class FreezeRequest(BaseModel):
    action: Literal["freeze", "thaw", "status"]


def guest_routes(m: HostManager) -> APIRouter:
    r = APIRouter(prefix="/v1")

    @r.post("/domains/{ref}/guest-exec")
    async def guest_exec(ref: str, req: ExecRequest) -> dict[str, Any]:
        res = await m.guests.exec(ref, req.argv, input=req.input, timeout=req.timeout)
        return {"exitcode": res.exitcode, "signal": res.signal,
                "returncode": res.returncode, "truncated": res.truncated,
                "stdout": base64.b64encode(res.stdout).decode(),
                "stderr": base64.b64encode(res.stderr).decode()}

    @r.post("/domains/{ref}/guest-fsfreeze")
    async def fsfreeze(ref: str, req: FreezeRequest) -> dict[str, Any]:
        return await m.guests.fsfreeze(ref, req.action)

    @r.get("/domains/{ref}/guest-agent")
    async def agent(ref: str) -> dict[str, Any]:
        vm = m.running(ref)
        if not await m.guests.connected(vm):
            return {"connected": False}
        async with m.guests.agent(ref) as ga:
            info = await ga.info()
            return {"connected": True, "version": info.get("version"),
                    "hostname": await ga.hostname()}

    return r
