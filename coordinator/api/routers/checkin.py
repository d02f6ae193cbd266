"""Check-in: an eligible device asks for work and gets a task or a time to come back."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from coordinator.api.deps import DeviceDep, ServicesDep
from coordinator.api.schemas import CheckinRequest, CheckinResponse

router = APIRouter(prefix="/v1", tags=["rounds"])


@router.post("/checkin", response_model=CheckinResponse)
def checkin(body: CheckinRequest, device: DeviceDep, services: ServicesDep) -> JSONResponse:
    """Returns the current round's task (the same one again if already assigned), or retry_after seconds
    (also as a Retry-After header) when the round has all the devices it needs: pace steering."""
    answer = services.checkin.checkin(device, body.eligible, frozenset(body.task_kinds) - {"train"})
    answer = CheckinResponse.model_validate(answer, from_attributes=True)
    headers = {"Retry-After": str(answer.retry_after)} if answer.status == "retry" else None
    return JSONResponse(answer.model_dump(exclude_none=answer.status == "retry"), headers=headers)
