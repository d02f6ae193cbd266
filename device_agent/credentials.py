"""The device's credentials: enroll once, then trade the bearer token for a fresh one every
`rotate_token_days`, so a token copied off a phone (a backup, a log) stops working on its own.

Rotation is one request (POST /v1/devices/{id}/token): the old token dies as the new one is issued.
If its answer is lost, the next request gets 401 and the runner enrolls again (runner.py), so a
lost answer costs a new device id, never a device locked out for good.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from device_agent.client import CoordinatorClient
from device_agent.state import AgentState

log = logging.getLogger("pocketfed.agent")
DAY = 86400.0


class CredentialSettings(Protocol):
    coordinator: str
    enrollment_key: str
    name: str | None
    rotate_token_days: float


def ensure_token(
    client: CoordinatorClient, state: AgentState, config: CredentialSettings, now: float | None = None
) -> None:
    """Give `client` a valid token: the saved one, a rotated one when it is `rotate_token_days` old
    (0: never rotate), or a fresh enrollment when there is none."""
    now = time.time() if now is None else now
    ident = state.identity(config.coordinator)
    if ident is None:
        device_id, token = client.enroll(config.enrollment_key, config.name)
        state.save_identity(config.coordinator, device_id, token, issued_at=now)
        log.info("enrolled as device %s", device_id)
        client.token = token
        return
    device_id, client.token = ident["device_id"], ident["token"]
    issued_at = ident.get("issued_at")
    if not isinstance(issued_at, (int, float)):  # saved before tokens had an age: its clock starts now
        state.save_identity(config.coordinator, device_id, client.token, issued_at=now)
    elif config.rotate_token_days > 0 and now - issued_at >= config.rotate_token_days * DAY:
        token = client.rotate_token(device_id)
        state.save_identity(config.coordinator, device_id, token, issued_at=now)
        client.token = token
        log.info("token rotated after %.0f days", (now - issued_at) / DAY)
