"""/v1/services: LVS-style virtual services (gridvm.lb)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError

from gridvm.errors import ConfigError
from gridvm.lb.model import ServiceSpec, validation_message
from gridvm.lb.services import ServiceManager


class WeightRequest(BaseModel):
    domain: str
    weight: int


class DrainRequest(BaseModel):
    domain: str
    undo: bool = False


def parse_spec(body: dict[str, Any]) -> ServiceSpec:
    """A request body → ServiceSpec, or a one-line ConfigError."""
    try:
        return ServiceSpec.model_validate(body)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None


def service_router(services: ServiceManager) -> APIRouter:
    router = APIRouter(prefix="/v1/services")

    @router.get("")
    async def list_services() -> list[dict[str, Any]]:
        return await services.views()

    @router.post("")
    async def create_service(body: dict[str, Any]) -> dict[str, Any]:
        return await services.create(parse_spec(body))

    @router.get("/{name}")
    async def show_service(name: str) -> dict[str, Any]:
        return await services.view(name)

    @router.delete("/{name}")
    async def delete_service(name: str) -> dict[str, Any]:
        await services.delete(name)
        return {"deleted": name}

    @router.post("/{name}/weight")
    async def set_weight(name: str, req: WeightRequest) -> dict[str, Any]:
        return await services.set_weight(name, req.domain, req.weight)

    @router.post("/{name}/drain")
    async def drain(name: str, req: DrainRequest) -> dict[str, Any]:
        return await services.drain(name, req.domain, undo=req.undo)

    return router
