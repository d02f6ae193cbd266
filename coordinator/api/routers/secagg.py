"""Secure aggregation of a round (service/secagg.py, protocol/secagg): join the cohort, poll for what is
due, then send each phase's message. JSON bodies, except the masked input: a binary frame."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool

from coordinator.api.body import read_limited
from coordinator.api.deps import DeviceDep, ServicesDep
from coordinator.api.routers.rounds import RoundId
from coordinator.api.schemas import SecAggAccepted, SecAggStatus
from coordinator.errors import Refused

router = APIRouter(prefix="/v1/rounds", tags=["secure aggregation"])

JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}
FRAME_BODY = {
    "requestBody": {
        "required": True,
        "description": "a masked_input frame (protocol/secagg/wire.py)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
REFUSALS = {
    403: {"description": "not assigned, not in the cohort, or another device's index"},
    404: {"description": "no such round"},
    409: {"description": "not a secure-aggregation round, closed, or the phase is over"},
    422: {"description": "the message breaks the protocol"},
}
MAX_WAIT = 30.0
PHASE_OF = {"advertise": "advertise", "shares": "share_keys", "masked_input": "masked_input", "unmask": "unmask"}


Wait = Annotated[float, Query(ge=0, le=MAX_WAIT, description="long poll: seconds to wait for news")]


@router.get("/{round_id}/secagg", response_model=SecAggStatus, responses=REFUSALS)
async def secagg_status(
    round_id: RoundId,
    device: DeviceDep,
    services: ServicesDep,
    since: Annotated[str | None, Query(max_length=20, description="the phase the device last saw")] = None,
    wait: Wait = 0,
) -> dict:
    """Where the round stands for this device: its phase, index, config and the message due to it. With
    `wait`, the answer comes as soon as there is news -- the phase is no longer `since`, or the server
    waits for this device's message -- or after `wait` seconds (no polling interval adds to a round)."""
    return await long_poll(services, round_id, device.id, since, wait)


async def long_poll(services, round_id: int, device_id: str, since: str | None, wait: float) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        seen = services.secagg.generation
        status = await run_in_threadpool(services.secagg.status, round_id, device_id)
        news = status["phase"] != since or status["waiting"] or status["phase"] in ("done", "abandoned")
        if news or loop.time() >= deadline:
            return status
        await services.secagg.wait_for_news(seen, deadline - loop.time())


async def accepted(services, round_id: int, device_id: str, kind: str, message, wait: float) -> dict:
    """Take the message; with `wait`, also answer the long poll that would follow it (one request
    instead of two per phase and device)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    seen = services.secagg.generation  # before the message: a phase change from here on wakes the wait below
    answer = await run_in_threadpool(services.secagg.receive, round_id, device_id, kind, message)
    if wait > 0:
        if answer["phase"] == PHASE_OF[kind]:  # still open: no news for this device until it closes
            await services.secagg.wait_for_news(seen, deadline - loop.time())
        answer["status"] = await long_poll(services, round_id, device_id, PHASE_OF[kind], deadline - loop.time())
    return answer


JOIN_BODY = {
    "requestBody": {
        "required": False,
        "description": "optional: the device's public keys {mask_key, share_key} (base64, 32 bytes each), "
        "advertised with the join instead of in a separate advertise message",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


@router.post("/{round_id}/secagg/join", response_model=SecAggStatus, responses=REFUSALS, openapi_extra=JOIN_BODY)
async def secagg_join(
    round_id: RoundId, request: Request, device: DeviceDep, services: ServicesDep, wait: Wait = 0
) -> dict:
    """Join the round's cohort after training (again: no change). The goal-th device fixes the cohort.
    With `wait`, the answer comes once the cohort is fixed (or after `wait` seconds), as a long poll.
    A body with the device's public keys advertises them too: one request fewer (service/secagg_keys.py)."""
    body = await read_limited(request, services.settings.max_json_body_bytes)
    try:
        keys = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError) as exc:
        raise Refused(422, f"join: body is not JSON ({str(exc)[:100]})", "bad_secagg_message") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    seen = services.secagg.generation  # before the join: the cohort being fixed from here on wakes the wait
    status = await run_in_threadpool(services.secagg.join, round_id, device.id, keys)
    if wait > 0 and status["phase"] == "joining":
        await services.secagg.wait_for_news(seen, deadline - loop.time())
        status = await long_poll(services, round_id, device.id, "joining", deadline - loop.time())
    return status


@router.post(
    "/{round_id}/secagg/masked_input", response_model=SecAggAccepted, responses=REFUSALS, openapi_extra=FRAME_BODY
)
async def secagg_masked_input(
    round_id: RoundId, request: Request, device: DeviceDep, services: ServicesDep, wait: Wait = 0
) -> dict:
    """The device's masked vector (phase 3). The same frame again is a replay: accepted once. With
    `wait`, the answer carries the device's status after the phase, as a long poll would."""
    body = await read_limited(request, services.settings.max_body_bytes)
    return await accepted(services, round_id, device.id, "masked_input", body, wait)


@router.post("/{round_id}/secagg/{kind}", response_model=SecAggAccepted, responses=REFUSALS, openapi_extra=JSON_BODY)
async def secagg_message(
    round_id: RoundId,
    request: Request,
    device: DeviceDep,
    services: ServicesDep,
    kind: str = Path(..., pattern="^(advertise|shares|unmask)$", description="advertise, shares or unmask"),
    wait: Wait = 0,
) -> dict:
    """The device's message for phase 1 (advertise), 2 (shares) or 4 (unmask); `wait` as for masked_input."""
    body = await read_limited(request, services.settings.max_json_body_bytes)
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise Refused(422, f"{kind}: body is not JSON ({str(exc)[:100]})", "bad_secagg_message") from None
    return await accepted(services, round_id, device.id, kind, message, wait)
