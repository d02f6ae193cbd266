"""FastAPI dependencies: the services and the store, the settings, and who is calling."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.errors import Refused
from coordinator.metrics import Metrics
from coordinator.service import Services
from coordinator.settings import Settings
from coordinator.store import DeviceRow, Store

bearer = HTTPBearer(auto_error=False, description="device token from POST /v1/devices, or the admin token")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_services(request: Request) -> Services:
    """The services of the population the path names (api/middleware.py), else the default's."""
    name = request.scope.get("pf_population")
    if name is None:
        return request.app.state.services
    services = request.app.state.populations.get(name)
    if services is None:
        raise Refused(404, f"population {name[:60]!r} does not exist", "unknown_population")
    return services


def get_store(services: Annotated[Services, Depends(get_services)]) -> Store:
    return services.store


def get_settings(services: Annotated[Services, Depends(get_services)]) -> Settings:
    return services.settings


def get_metrics(services: Annotated[Services, Depends(get_services)]) -> Metrics:
    return services.metrics


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
ServicesDep = Annotated[Services, Depends(get_services)]
StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Refused(
            401, "Authorization: missing bearer token", "unauthorized", headers={"WWW-Authenticate": "Bearer"}
        )
    return credentials.credentials


def device_for(
    credentials: HTTPAuthorizationCredentials | None, store: Store, now: float, idle_days: float
) -> DeviceRow:
    """The enrolled device whose token is presented (401 otherwise, also when the device has not
    checked in for `idle_days`: a token left on a lost phone dies, an active device's never does)."""
    return device_for_token(_token(credentials), store, now, idle_days)


def device_for_token(token: str, store: Store, now: float, idle_days: float) -> DeviceRow:
    """`device_for` on the bearer token itself (the raw upload path parses the header alone)."""
    device = store.device_by_token(token_hash(token))
    if device is None:
        raise Refused(
            401,
            "Authorization: unknown or revoked device token",
            "unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    last = device.last_seen if device.last_seen is not None else device.created_at
    if now - last > idle_days * 86400:
        raise Refused(
            401,
            f"Authorization: device token expired (no check-in for more than {idle_days:g} days); enroll again",
            "token_expired",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return device


async def current_device(credentials: Credentials, services: ServicesDep) -> DeviceRow:
    """`device_for` on the event loop: one indexed read on this thread's own read connection, which
    never waits for the writer, is cheaper than a hop to the threadpool on every device call."""
    return device_for(credentials, services.store, services.ingest.clock(), services.settings.device_token_idle_days)


def require_admin(credentials: Credentials, settings: SettingsDep) -> None:
    """Operator calls need the admin token; without one configured the admin API is off."""
    if not settings.admin_token:
        raise Refused(
            403, "admin API is disabled: the coordinator was started without an admin token", "admin_forbidden"
        )
    presented = credentials.credentials if credentials else ""
    if not secrets.compare_digest(presented.encode(), settings.admin_token.encode()):
        raise Refused(403, "Authorization: admin token required for this call", "admin_forbidden")


def is_admin(credentials: Credentials, settings: SettingsDep) -> bool:
    """Whether the admin token is presented (for views that show more to the operator)."""
    presented = credentials.credentials if credentials else ""
    expected = settings.admin_token or ""
    return bool(expected) and secrets.compare_digest(presented.encode(), expected.encode())


AdminViewDep = Annotated[bool, Depends(is_admin)]


def device_or_admin(credentials: Credentials, services: ServicesDep) -> None:
    """Model downloads: any enrolled device, or the operator."""
    token, settings = _token(credentials), services.settings
    if settings.admin_token and secrets.compare_digest(token.encode(), settings.admin_token.encode()):
        return
    device_for(credentials, services.store, services.ingest.clock(), settings.device_token_idle_days)


DeviceDep = Annotated[DeviceRow, Depends(current_device)]
