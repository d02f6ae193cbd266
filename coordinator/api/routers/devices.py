"""Enrollment: a device trades the operator's enrollment key for its own bearer token."""

from __future__ import annotations

import secrets
import time
import uuid

from fastapi import APIRouter

from coordinator.api.deps import DeviceDep, ServicesDep, SettingsDep, StoreDep, token_hash
from coordinator.api.schemas import DeviceInfo, EnrollRequest, EnrollResponse
from coordinator.errors import Refused

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post(
    "", status_code=201, response_model=EnrollResponse, responses={401: {"description": "wrong enrollment key"}}
)
def enroll(body: EnrollRequest, services: ServicesDep, store: StoreDep, settings: SettingsDep) -> EnrollResponse:
    """Enroll a device (into the population the path names); the token is returned once and stored
    only as its sha256."""
    if services.enrollment_key_hash is not None:  # a named population's key, kept as its sha256
        presented, expected = token_hash(body.enrollment_key).encode(), services.enrollment_key_hash.encode()
    else:
        presented, expected = body.enrollment_key.encode(), (settings.enrollment_key or "").encode()
    if not secrets.compare_digest(presented, expected):
        raise Refused(401, "enrollment_key: wrong enrollment key", "bad_enrollment_key")
    device_id, token = uuid.uuid4().hex, secrets.token_urlsafe(32)
    with store.transaction(durable=False) as tx:  # lost only on power loss; the device enrolls again
        tx.add_device(device_id, token_hash(token), body.name, time.time())
    return EnrollResponse(device_id=device_id, token=token)


@router.get("/{device_id}", response_model=DeviceInfo, responses={403: {"description": "another device"}})
def device_info(device_id: str, device: DeviceDep, store: StoreDep) -> DeviceInfo:
    """A device's own record; a token never reads another device's."""
    if device_id != device.id:
        raise Refused(403, f"device_id: this token belongs to another device, not {device_id}", "other_device")
    created_at, assigned, accepted = store.device_activity(device.id)
    return DeviceInfo(
        device_id=device.id,
        name=device.name,
        created_at=created_at,
        rounds_assigned=assigned,
        updates_accepted=accepted,
    )
