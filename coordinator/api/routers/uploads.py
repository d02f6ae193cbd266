"""The upload of one device's update to a round."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from coordinator.api.body import read_limited
from coordinator.api.deps import DeviceDep, ServicesDep
from coordinator.api.routers.rounds import RoundId
from coordinator.api.schemas import UploadAccepted
from coordinator.errors import Refused

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
    metrics, started = services.metrics, time.perf_counter()
    try:
        async with request.app.state.upload_slots:  # bounded memory: waiting bodies stay in the socket buffers
            body = await read_limited(request, services.settings.max_body_bytes)
            metrics.upload_bytes.observe(len(body))
            prepared = await run_in_threadpool(services.ingest.prepare, device.id, round_id, idempotency_key, body)
            del body
            if isinstance(prepared, dict):  # a replayed key: the first answer again
                return JSONResponse(prepared, status_code=202)
            # answered once the update is durably committed, in a group with others (service/writer.py)
            answer = await asyncio.wrap_future(services.ingest.submit(prepared))
        return JSONResponse(answer, status_code=202)
    finally:
        metrics.upload_seconds.observe(time.perf_counter() - started)
