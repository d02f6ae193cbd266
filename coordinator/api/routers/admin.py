"""Operator calls (admin token): round settings, pause/resume, publishing a model, releases."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from coordinator.api.body import read_limited
from coordinator.api.deps import ServicesDep, SettingsDep, StoreDep, require_admin, token_hash
from coordinator.api.schemas import (
    EnrollmentCodes,
    EnrollmentCodesRequest,
    PauseState,
    PublishResponse,
    ReleaseChange,
    ReleaseStateInfo,
    SettingsPatch,
    Unpin,
)
from coordinator.errors import Refused
from coordinator.settings import RoundSettings, new_secret
from engine.serialize.container import ContainerError

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={403: {"description": "admin token missing or wrong"}},
)


@router.get("/settings", response_model=RoundSettings)
def get_round_settings(services: ServicesDep) -> RoundSettings:
    return services.rounds.round_settings


@router.patch("/settings", response_model=RoundSettings)
def patch_round_settings(body: SettingsPatch, services: ServicesDep) -> RoundSettings:
    """Change round settings; they apply from the next round on."""
    try:
        return services.admin.update_settings(body.model_dump(exclude_unset=True))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Refused(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", "bad_settings") from None


@router.post("/pause", response_model=PauseState)
def pause(services: ServicesDep) -> PauseState:
    """Stop opening new rounds (the open one still settles)."""
    services.admin.set_paused(True)
    return PauseState(paused=True)


@router.post("/resume", response_model=PauseState)
def resume(services: ServicesDep) -> PauseState:
    services.admin.set_paused(False)
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
async def publish_model(request: Request, services: ServicesDep, settings: SettingsDep) -> PublishResponse:
    """Publish a model file as the next version; the open round is abandoned and one opens on it."""
    body = await read_limited(request, settings.max_body_bytes)
    try:
        version = await run_in_threadpool(services.admin.publish, body)
    except (ContainerError, ValueError, RecursionError) as exc:  # ValueError: json's integer-size limit
        raise Refused(422, f"model file: {exc}", "bad_model") from None
    return PublishResponse(version=version, sha256=services.versions.get(version).info.sha256)


@router.post("/rollback", response_model=ReleaseStateInfo)
def rollback(body: ReleaseChange, services: ServicesDep) -> ReleaseStateInfo:
    """Release an earlier (or any registered) version at once, with who and why in the release audit;
    the canary is cancelled and an open round on another base is abandoned. New candidates still go
    through the gate; pin to stop that."""
    state = services.admin.set_released(body.version, action="rollback", actor=body.by, reason=body.reason, pin=False)
    return ReleaseStateInfo.model_validate(state, from_attributes=True)


@router.post("/pin", response_model=ReleaseStateInfo)
def pin(body: ReleaseChange, services: ServicesDep) -> ReleaseStateInfo:
    """Release this version and keep it: candidates wait (undecided) until POST /v1/admin/unpin."""
    state = services.admin.set_released(body.version, action="pinned", actor=body.by, reason=body.reason, pin=True)
    return ReleaseStateInfo.model_validate(state, from_attributes=True)


@router.post("/unpin", response_model=ReleaseStateInfo)
def unpin(body: Unpin, services: ServicesDep) -> ReleaseStateInfo:
    """Let the release gate decide on candidates again (the newest waiting one first)."""
    state = services.admin.unpin(body.by, body.reason)
    return ReleaseStateInfo.model_validate(state, from_attributes=True)


@router.post("/enrollment-codes", response_model=EnrollmentCodes, status_code=201)
def mint_enrollment_codes(body: EnrollmentCodesRequest, store: StoreDep) -> EnrollmentCodes:
    """Mint one-time enrollment codes (the recommended way to enroll a fleet: a leaked code enrolls
    one device, once, before it expires). Returned once; only their sha256 is stored."""
    now = time.time()
    codes = [new_secret() for _ in range(body.count)]
    with store.transaction() as tx:
        for code in codes:
            tx.add_enrollment_code(token_hash(code), now, now + body.ttl_seconds)
    return EnrollmentCodes(codes=codes, expires_at=now + body.ttl_seconds)
