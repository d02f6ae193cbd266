"""The agent's side of the HTTP API: a small httpx client that is patient with the network
and strict with the server.

- every request has a timeout;
- connection errors, timeouts and 5xx answers are retried with exponential backoff and
  full jitter (so a thousand phones that lost the server do not come back in lockstep);
- a 4xx is never retried: it means *we* are wrong (bad token, round closed, body
  refused), so it is raised as `RejectedError` with the server's reason and the caller
  drops the round;
- uploads carry the caller's Idempotency-Key, so retrying one is always safe.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from protocol.messages import CheckinAnswer, UploadReceipt

log = logging.getLogger("pocketfed.agent.client")


class CoordinatorError(Exception):
    """Talking to the coordinator failed."""


class RejectedError(CoordinatorError):
    """The coordinator answered 4xx: the request itself is wrong and retrying would not help."""

    def __init__(self, status: int, detail: str, method: str, path: str):
        super().__init__(f"{method} {path} refused with {status}: {detail}")
        self.status, self.detail, self.path = status, detail, path


class UnavailableError(CoordinatorError):
    """The coordinator could not be reached (or kept failing with 5xx) after every retry."""


@dataclass
class RetryPolicy:
    attempts: int = 6  # total tries per request
    base_delay: float = 0.5  # seconds before the first retry
    max_delay: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)] (AWS architecture blog, 2015)."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


class CoordinatorClient:
    """Typed calls for each endpoint of /v1; `token` is set after enrollment."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        event_hooks: dict[str, list[Callable]] | None = None,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.token = token
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            transport=transport,
            event_hooks=event_hooks or {},
            headers={"User-Agent": "pocketfed-agent/0.1"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport with retries

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last_problem = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                delay = self.retry.delay(attempt - 1, self._rng)
                log.info("retrying %s %s in %.1fs (%s)", method, path, delay, last_problem)
                self._sleep(delay)
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts
                last_problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in ok:
                return response
            if response.status_code >= 500:
                last_problem = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            raise RejectedError(response.status_code, _detail(response), method, path)
        raise UnavailableError(
            f"{method} {path}: coordinator unavailable after {self.retry.attempts} "
            f"attempts; last problem: {last_problem}"
        )

    # ------------------------------------------------------------------ endpoints

    def enroll(self, enrollment_key: str, name: str | None = None) -> tuple[str, str]:
        """POST /v1/devices -> (device_id, token)."""
        body = self._request(
            "POST", "/v1/devices", ok=(200, 201), json={"enrollment_key": enrollment_key, "name": name}
        ).json()
        return str(body["device_id"]), str(body["token"])

    def latest_model(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models/latest").json()

    def download_model(self, version: int, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """GET /v1/models/{version}; returns (None, etag) when our cached copy is current (304)."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self._request("GET", f"/v1/models/{int(version)}", ok=(200, 304), headers=headers)
        new_etag = response.headers.get("ETag", etag)
        if response.status_code == 304:
            return None, new_etag
        return response.content, new_etag

    def checkin(self, num_samples: int | None) -> CheckinAnswer:
        """POST /v1/checkin -> a task, or when to come back (a malformed answer raises ProtocolError)."""
        body = {"eligible": True, "num_samples": num_samples}
        return CheckinAnswer.from_dict(self._request("POST", "/v1/checkin", json=body).json())

    def upload(self, round_id: int, body: bytes, idempotency_key: str) -> UploadReceipt:
        """POST the update bytes; safe to call again with the same key (counted once)."""
        response = self._request(
            "POST",
            f"/v1/rounds/{int(round_id)}/updates",
            ok=(200, 201, 202),
            content=body,
            headers={"Content-Type": "application/octet-stream", "Idempotency-Key": idempotency_key},
        )
        return UploadReceipt.from_dict(response.json())
