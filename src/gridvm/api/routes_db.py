"""/v1/databases: the replicated database service (gridvm.db). Thin: each route is one call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError

from gridvm.db import members
from gridvm.db.manager import DbManager
from gridvm.db.model import CreateRequest, UserRequest
from gridvm.errors import ConfigError, NotFound
from gridvm.lb.model import validation_message


class SwitchoverRequest(BaseModel):
    to: str | None = None


class LeaveRequest(BaseModel):
    host: str


def db_router(db: DbManager) -> APIRouter:
    r = APIRouter(prefix="/v1/databases")

    @r.get("")
    async def list_databases() -> list[dict[str, Any]]:
        return await db.views()

    @r.post("")
    async def create_database(body: dict[str, Any]) -> dict[str, Any]:
        try:
            req = CreateRequest.model_validate(body)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc)) from None
        return await db.jobs.create(req)

    @r.get("/{name}")
    async def show_database(name: str) -> dict[str, Any]:
        return await db.view(name)

    @r.delete("/{name}")
    async def delete_database(name: str) -> dict[str, Any]:
        return await db.jobs.delete(name)

    @r.post("/{name}/switchover")
    async def switchover(name: str, req: SwitchoverRequest) -> dict[str, Any]:
        return await db.switchover(name, req.to)

    @r.post("/{name}/users")
    async def add_user(name: str, req: UserRequest) -> dict[str, Any]:
        return await db.add_user(name, req.user, req.password, req.database)

    @r.post("/{name}/leave")
    async def leave(name: str, req: LeaveRequest) -> dict[str, Any]:
        return {"done": await db.leave(name, req.host)}

    # between hosts: the members placed on this host

    async def member_here(name: str, member: str) -> dict[str, Any]:
        """The database's record, from the cluster store (written before its members are
        made and deleted after them), never from the request: a caller can neither hand
        this host settings or secrets nor name a domain that is not this host's member."""
        record = await db.record(name)
        here = db.node.need()[0].host
        if (record["members"].get(member) or {}).get("host") != here:
            raise NotFound(f"database {name} has no member {member!r} on host {here}")
        return record

    @r.post("/{name}/members/{member}")
    async def provision_member(name: str, member: str) -> dict[str, Any]:
        await members.define_and_start(db.m, await member_here(name, member), member)
        return {"member": member, "started": True}

    @r.delete("/{name}/members/{member}")
    async def remove_member(name: str, member: str) -> dict[str, Any]:
        await member_here(name, member)
        await members.remove(db.m, member)
        return {"member": member, "removed": True}

    return r
