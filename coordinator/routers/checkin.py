"""Check-in: an eligible device asks for work and gets a task or a time to come back."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from coordinator.deps import DeviceDep, ManagerDep
from coordinator.schemas import CheckinRequest, CheckinResponse

router = APIRouter(prefix="/v1", tags=["rounds"])


@router.post("/checkin", response_model=CheckinResponse)
def checkin(body: CheckinRequest, device: DeviceDep, manager: ManagerDep) -> JSONResponse:
    """Returns the current round's task (the same one again if already assigned), or retry_after seconds
    (also as a Retry-After header) when the round has all the devices it needs: pace steering."""
    answer = CheckinResponse.model_validate(manager.checkin(device.id, body.eligible), from_attributes=True)
    headers = {"Retry-After": str(answer.retry_after)} if answer.status == "retry" else None
    return JSONResponse(answer.model_dump(exclude_none=answer.status == "retry"), headers=headers)
