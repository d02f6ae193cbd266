"""Operator calls (admin token): round settings, pause/resume, publishing a model."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from coordinator.deps import ManagerDep, SettingsDep, require_admin
from coordinator.errors import Refused
from coordinator.routers.rounds import read_limited
from coordinator.schemas import PauseState, PublishResponse, SettingsPatch
from coordinator.settings import RoundSettings
from engine.serialize.container import ContainerError

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={403: {"description": "admin token missing or wrong"}},
)


@router.get("/settings", response_model=RoundSettings)
def get_round_settings(manager: ManagerDep) -> RoundSettings:
    return manager.round_settings


@router.patch("/settings", response_model=RoundSettings)
def patch_round_settings(body: SettingsPatch, manager: ManagerDep) -> RoundSettings:
    """Change round settings; they apply from the next round on."""
    try:
        return manager.update_settings(body.model_dump(exclude_unset=True))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Refused(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", "bad_settings") from None


@router.post("/pause", response_model=PauseState)
def pause(manager: ManagerDep) -> PauseState:
    """Stop opening new rounds (the open one still settles)."""
    manager.set_paused(True)
    return PauseState(paused=True)


@router.post("/resume", response_model=PauseState)
def resume(manager: ManagerDep) -> PauseState:
    manager.set_paused(False)
    return PauseState(paused=False)


@router.post(
    "/models",
    response_model=PublishResponse,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def publish_model(request: Request, manager: ManagerDep, settings: SettingsDep) -> PublishResponse:
    """Publish a model file as the next version; the open round is abandoned and one opens on it."""
    body = await read_limited(request, settings.max_body_bytes)
    try:
        version = await run_in_threadpool(manager.publish_admin, body)
    except (ContainerError, ValueError, RecursionError) as exc:  # ValueError: json's integer-size limit
        raise Refused(422, f"model file: {exc}", "bad_model") from None
    return PublishResponse(version=version, sha256=manager.model(version).info.sha256)
