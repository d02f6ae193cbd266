"""FastAPI dependencies: the service's components and who is calling."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.errors import Refused
from coordinator.metrics import Metrics
from coordinator.rounds import RoundManager
from coordinator.settings import Settings
from coordinator.storage import Database

bearer = HTTPBearer(auto_error=False, description="device token from POST /v1/devices, or the admin token")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_manager(request: Request) -> RoundManager:
    return request.app.state.manager


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


@dataclass(frozen=True)
class Device:
    id: str
    name: str | None


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Refused(
            401, "Authorization: missing bearer token", "unauthorized", headers={"WWW-Authenticate": "Bearer"}
        )
    return credentials.credentials


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
ManagerDep = Annotated[RoundManager, Depends(get_manager)]
DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def device_for(credentials: HTTPAuthorizationCredentials | None, db: Database) -> Device:
    """The enrolled device whose token is presented (401 otherwise)."""
    hashed = token_hash(_token(credentials))
    row = db.query_one("SELECT id, name FROM devices WHERE token_hash = ?", (hashed,))
    if row is None:
        raise Refused(
            401,
            "Authorization: unknown or revoked device token",
            "unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Device(row["id"], row["name"])


async def current_device(credentials: Credentials, db: DbDep) -> Device:
    """`device_for` on the event loop: one indexed read on this thread's WAL read connection, which
    never waits for the writer, is cheaper than a hop to the threadpool on every device call."""
    return device_for(credentials, db)


def require_admin(credentials: Credentials, settings: SettingsDep) -> None:
    """Operator calls need the admin token; without one configured the admin API is off."""
    if not settings.admin_token:
        raise Refused(
            403, "admin API is disabled: the coordinator was started without an admin token", "admin_forbidden"
        )
    presented = credentials.credentials if credentials else ""
    if not secrets.compare_digest(presented.encode(), settings.admin_token.encode()):
        raise Refused(403, "Authorization: admin token required for this call", "admin_forbidden")


def device_or_admin(credentials: Credentials, db: DbDep, settings: SettingsDep) -> None:
    """Model downloads: any enrolled device, or the operator."""
    token = _token(credentials)
    if settings.admin_token and secrets.compare_digest(token.encode(), settings.admin_token.encode()):
        return
    device_for(credentials, db)


DeviceDep = Annotated[Device, Depends(current_device)]
