"""Rounds: their status and participants, and the upload of one device's update."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from coordinator.deps import DbDep, DeviceDep, ManagerDep, SettingsDep
from coordinator.errors import Refused
from coordinator.schemas import Participant, RoundDetail, RoundSummary, UploadAccepted
from coordinator.storage import Database

router = APIRouter(prefix="/v1/rounds", tags=["rounds"])

RoundId = Annotated[int, Path(ge=0, le=2**62, description="round number")]

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "an update container (engine/serialize/update.py)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def summarize(db: Database, row: dict) -> RoundSummary:
    assigned = db.query_one("SELECT COUNT(*) AS n FROM assignments WHERE round_id=?", (row["id"],))["n"]
    config = json.loads(row["config"])
    dp = row.get("dp_q") is not None
    return RoundSummary(
        **{k: row[k] for k in RoundSummary.model_fields if k in row},
        assigned=assigned,
        total_samples=row["total_weight"],
        strategy=config["strategy"],
        dp_delta=config.get("dp_delta") if dp else None,
        dp_clip_norm=row.get("dp_clip"),
        dp_sampling_rate=row.get("dp_q"),
    )


@router.get("", response_model=list[RoundSummary])
def list_rounds(manager: ManagerDep, db: DbDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[RoundSummary]:
    """Most recent rounds first."""
    manager.tick()
    rows = db.query("SELECT * FROM rounds ORDER BY id DESC LIMIT ?", (limit,))
    return [summarize(db, dict(r)) for r in rows]


@router.get("/{round_id}", response_model=RoundDetail)
def round_detail(round_id: RoundId, manager: ManagerDep, db: DbDep) -> RoundDetail:
    manager.tick()
    row = manager.get_round(round_id)
    if row is None:
        raise Refused(404, f"round {round_id} does not exist", "unknown_round")
    participants = [
        Participant(
            device_id=r["device_id"],
            sample_count=r["sample_count"],
            norm=r["norm"],
            encoding=r["encoding"],
            received_at=r["received_at"],
            metrics=json.loads(r["metrics"]),
        )
        for r in db.query("SELECT * FROM updates WHERE round_id=? ORDER BY received_at", (round_id,))
    ]
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for p in participants:
        for name, value in p.metrics.items():
            sums[name] = sums.get(name, 0.0) + value * p.sample_count
            weights[name] = weights.get(name, 0.0) + p.sample_count
    return RoundDetail(
        **summarize(db, row).model_dump(),
        config=json.loads(row["config"]),
        metrics={k: sums[k] / weights[k] for k in sums if weights[k] > 0},
        participants=participants,
    )


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing (413) by Content-Length first and again by counting while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length: {declared!r} is not a number", "bad_request")
        if int(declared) > limit:
            raise Refused(413, f"body: Content-Length {declared} exceeds the limit of {limit} bytes", "too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"body: more than the limit of {limit} bytes", "too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the device went away mid-body: nothing was stored, nobody to answer
        raise Refused(400, f"body: the client disconnected after {size} bytes", "disconnected") from None
    if declared is not None and size != int(declared):
        raise Refused(400, f"body: {size} bytes arrived, Content-Length said {declared}", "bad_request")
    return b"".join(chunks)


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
    manager: ManagerDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=200, description="retry with the same key after a failure")
    ] = None,
) -> JSONResponse:
    """Upload a weight delta. Replaying the same Idempotency-Key returns the same answer and counts once."""
    if not idempotency_key:
        raise Refused(400, "Idempotency-Key: header is required", "missing_idempotency_key")
    async with request.app.state.upload_slots:  # bounded memory: waiting bodies stay in the socket buffers
        body = await read_limited(request, settings.max_body_bytes)
        prepared = await run_in_threadpool(manager.prepare_upload, device.id, round_id, idempotency_key, body)
        del body
        if isinstance(prepared, dict):  # a replayed key: the first answer again
            return JSONResponse(prepared, status_code=202)
        # the writer answers once the update is durably committed, in a group with others (coordinator/ingest.py)
        answer = await asyncio.wrap_future(manager.writer.submit(prepared))
    return JSONResponse(answer, status_code=202)
