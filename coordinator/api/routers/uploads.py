"""The upload of one device's update to a round."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from coordinator.api.body import read_body
from coordinator.api.deps import DeviceDep, ServicesDep
from coordinator.api.routers.rounds import RoundId
from coordinator.api.schemas import UploadAccepted
from coordinator.errors import Refused
from coordinator.service import Services
from coordinator.service.writer import check_may_upload
from coordinator.store import RoundRow

router = APIRouter(prefix="/v1/rounds", tags=["rounds"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "an update container (protocol/update.py)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/{round_id}/updates",
    status_code=202,
    response_model=UploadAccepted,
    openapi_extra=UPLOAD_BODY,
    responses={
        403: {"description": "not assigned"},
        404: {"description": "no such round"},
        409: {"description": "duplicate or late"},
        413: {"description": "body too large"},
        422: {"description": "the update does not fit the model or breaks a bound"},
    },
)
async def upload(
    round_id: RoundId,
    request: Request,
    device: DeviceDep,
    services: ServicesDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=200, description="retry with the same key after a failure")
    ] = None,
) -> JSONResponse:
    """Upload a weight delta. Replaying the same Idempotency-Key returns the same answer and counts once."""
    if not idempotency_key:
        raise Refused(400, "Idempotency-Key: header is required", "missing_idempotency_key")
    declared = request.headers.get("content-length")
    answer = await receive_upload(
        services,
        request.app.state,
        device.id,
        round_id,
        idempotency_key,
        lambda limit: read_body(request.receive, declared, limit),
    )
    return JSONResponse(answer, status_code=202)


async def receive_upload(
    services: Services,
    state: Any,
    device_id: str,
    round_id: int,
    key: str,
    read: Callable[[int], Awaitable[bytes | bytearray]],
) -> dict:
    """The 202 body for one upload (raises Refused): admission, one upload in flight per device, an
    upload slot, the body (`read(limit)`), then decoding and validation on a worker thread and the
    group-commit writer. Shared by the FastAPI route and the raw ASGI path (api/fast_upload.py)."""
    admitted = admit(services, device_id, round_id, key)
    in_flight: set[str] = state.uploads_in_flight
    if device_id in in_flight:
        raise Refused(
            429, "upload: this device already has an upload in flight", "upload_in_flight", headers={"Retry-After": "5"}
        )
    in_flight.add(device_id)
    metrics, started = services.metrics, time.perf_counter()
    try:
        async with state.upload_slots:  # bounded memory: waiting bodies stay in the socket buffers
            expected = services.writer.expect()  # the group commit may wait a little for this one
            try:
                body = await read(services.settings.max_body_bytes)
                metrics.upload_bytes.observe(len(body))
                # decoded and validated on a worker thread, then queued for the group-commit writer
                prepared = await run_in_threadpool(
                    services.ingest.prepare_and_submit, device_id, round_id, key, body, admitted, expected
                )
                del body
            finally:
                expected.done()
            if isinstance(prepared, dict):  # a replayed key: the first answer again
                return prepared
            return await asyncio.wrap_future(prepared)  # once durably committed (service/writer.py)
    finally:
        in_flight.discard(device_id)
        metrics.upload_seconds.observe(time.perf_counter() - started)


def admit(services: Services, device_id: str, round_id: int, key: str) -> RoundRow | None:
    """Who may take an upload slot and send a body: the round exists and is open, and this device is
    assigned to it and has not uploaded to it (unless this is a replay of its own key: then None).
    Checked before reading a byte, so strangers and unassigned devices cannot hold the slots."""
    store, now = services.store, services.ingest.clock()
    r = store.round(round_id)
    if r is not None and r.is_open and now >= r.deadline:
        services.ingest.on_late()  # the background tick settles it now
    try:
        return check_may_upload(store, r, round_id, device_id, now)
    except Refused as exc:
        if exc.reason != "duplicate" or store.answer_for_key(device_id, key) is None:
            raise
        return None
