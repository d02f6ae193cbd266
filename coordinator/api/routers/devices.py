"""Enrollment: a device trades the operator's enrollment key, or a one-time enrollment code the
operator minted (routers/admin.py), for its own bearer token. Attempts are rate-limited per client
address and failures also globally, with counters in the database so they hold across replicas."""

from __future__ import annotations

import logging
import secrets
import uuid

from fastapi import APIRouter, Depends, Request

from coordinator.api.deps import DeviceDep, ServicesDep, SettingsDep, StoreDep, require_admin, token_hash
from coordinator.api.schemas import DeviceInfo, EnrollRequest, EnrollResponse
from coordinator.errors import Refused
from coordinator.store import Store, Writes

router = APIRouter(prefix="/v1/devices", tags=["devices"])
log = logging.getLogger("pocketfed.coordinator")
WINDOW = 60.0  # seconds: the rate limits count per minute


def _limit(counter: Store | Writes, key: str, limit: int, now: float, what: str) -> None:
    """Count a hit on `key`; 429 with Retry-After once the minute's count passes `limit`."""
    if counter.hit(key, WINDOW, now) > limit:
        retry = max(1, int(WINDOW - now % WINDOW) + 1)
        raise Refused(
            429, f"{what}: more than {limit} per minute; retry later", "rate_limited", {"Retry-After": str(retry)}
        )


def _is_enrollment_key(presented: str, key_hash: str | None, key: str | None) -> bool:
    """The population's key: a named one's is kept as its sha256 (service/populations.py)."""
    if key_hash is not None:
        return secrets.compare_digest(token_hash(presented).encode(), key_hash.encode())
    return secrets.compare_digest(presented.encode(), (key or "").encode())


@router.post(
    "",
    status_code=201,
    response_model=EnrollResponse,
    responses={401: {"description": "wrong enrollment key or code"}, 429: {"description": "too many attempts"}},
)
def enroll(
    body: EnrollRequest, request: Request, services: ServicesDep, store: StoreDep, settings: SettingsDep
) -> EnrollResponse:
    """Enroll a device with the enrollment key or a one-time code (in the same field) of the population
    the path names (codes minted at /v1/populations/{name}/admin/enrollment-codes are that one's);
    the token is returned once and stored only as its sha256."""
    now, address = services.ingest.clock(), request.client.host if request.client else "unknown"
    start = int(now // WINDOW * WINDOW)
    for key, limit in (
        (f"enroll-fail:{address}", settings.enroll_failures_per_address),
        ("enroll-fail:*", settings.enroll_failures_total),
    ):
        if store.rate_hits(key, start) >= limit:
            raise Refused(429, "failed enrollments: too many; retry later", "rate_limited", {"Retry-After": "60"})
    device_id, token = uuid.uuid4().hex, secrets.token_urlsafe(32)
    by_key = _is_enrollment_key(body.enrollment_key, services.enrollment_key_hash, settings.enrollment_key)
    with store.transaction(durable=False) as tx:  # lost only on power loss; the device enrolls again
        _limit(tx, f"enroll:{address}", settings.enroll_per_address, now, "enrollments from this address")
        if by_key or tx.spend_enrollment_code(token_hash(body.enrollment_key), device_id, now):
            tx.add_device(device_id, token_hash(token), body.name, now)
            return EnrollResponse(device_id=device_id, token=token)
    log.warning("enrollment refused from %s: wrong enrollment key or code", address)
    for key in (f"enroll-fail:{address}", "enroll-fail:*"):  # the next attempts may get the 429
        store.hit(key, WINDOW, now)
    raise Refused(401, "enrollment_key: wrong enrollment key or unknown, spent or expired code", "bad_enrollment_key")


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


@router.post("/{device_id}/token", response_model=EnrollResponse, responses={403: {"description": "another device"}})
def rotate_token(device_id: str, device: DeviceDep, store: StoreDep) -> EnrollResponse:
    """A new token for this device; the one presented stops working at once."""
    if device_id != device.id:
        raise Refused(403, f"device_id: this token belongs to another device, not {device_id}", "other_device")
    token = secrets.token_urlsafe(32)
    with store.transaction() as tx:
        tx.set_token_hash(device.id, token_hash(token))
    return EnrollResponse(device_id=device.id, token=token)


@router.delete(
    "/{device_id}",
    status_code=204,
    dependencies=[Depends(require_admin)],
    responses={403: {"description": "admin token required"}, 404: {"description": "no such device"}},
)
def revoke(device_id: str, store: StoreDep) -> None:
    """Revoke a device (admin): its token gets 401 from now on; its accepted updates stay."""
    with store.transaction() as tx:
        if not tx.revoke_device(device_id):
            raise Refused(404, f"device {device_id[:80]!r} does not exist", "unknown_device")
    log.warning("device %s revoked", device_id)
