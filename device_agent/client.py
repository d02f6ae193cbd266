"""The agent's side of the HTTP API: a small httpx client that is patient with the network
and strict with the server (docs/protocol.md, "Retries and back-off").

- every request has a timeout;
- connection errors, timeouts and 5xx answers are retried with exponential backoff and
  full jitter (so a thousand phones that lost the server do not come back in lockstep);
- 408, 429 and 503 are the server pacing us: they are retried, never before the server's
  `Retry-After` (seconds or an HTTP-date; no cap of ours below it), plus a little jitter;
- any other 4xx is never retried: it means *we* are wrong (bad token, round closed, body
  refused), so it is raised as `RejectedError` with the server's reason and the caller
  drops the round;
- uploads carry the caller's Idempotency-Key, so retrying one is always safe; once the
  round's deadline has passed an upload is retried only when an earlier attempt got no answer.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from protocol.messages import CheckinAnswer, FederatedMetrics, UploadReceipt

log = logging.getLogger("pocketfed.agent.client")

PACED_STATUSES = frozenset({408, 429, 503})  # the server asks us to come back later
MAX_RETRY_AFTER = 24 * 3600.0  # an absolute ceiling against a garbled header, far above any real pacing


class CoordinatorError(Exception):
    """Talking to the coordinator failed."""


class RejectedError(CoordinatorError):
    """The coordinator answered 4xx: the request itself is wrong and retrying would not help."""

    def __init__(self, status: int, detail: str, method: str, path: str):
        super().__init__(f"{method} {path} refused with {status}: {detail}")
        self.status, self.detail, self.path = status, detail, path


class UnavailableError(CoordinatorError):
    """The coordinator could not be reached (or kept failing or pacing us) after every retry.

    `retry_after` is the last wait the server asked for (None if it named none)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlinePassed(CoordinatorError):
    """An upload's retry would land after the round's deadline, and every earlier attempt was answered."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    None when absent or unparseable; never negative; at most MAX_RETRY_AFTER."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


@dataclass
class RetryPolicy:
    attempts: int = 6  # total tries per request
    base_delay: float = 0.5  # seconds before the first retry
    max_delay: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)] (AWS architecture blog, 2015)."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))

    @staticmethod
    def paced(seconds: float, rng: random.Random) -> float:
        """A server-asked wait R plus jitter in [0, max(1, R/10)]: never sooner than asked, and a fleet
        told the same R does not come back in lockstep."""
        seconds = min(max(0.0, float(seconds)), MAX_RETRY_AFTER)
        return seconds + rng.uniform(0, max(1.0, seconds / 10))


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
        clock: Callable[[], float] = time.time,
    ):
        self.token = token
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._clock = clock
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            transport=transport,
            event_hooks=event_hooks or {},
            headers={"User-Agent": "pocketfed-agent/0.1"},
            follow_redirects=False,  # a redirect would hand our token to another host
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def paced_wait(self, seconds: float) -> float:
        """How long to wait when told "come back in `seconds`" (jittered, never shorter)."""
        return self.retry.paced(seconds, self._rng)

    # ------------------------------------------------------------------ transport with retries

    def _request(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (200,),
        deadline: float | None = None,
        outcome_unknown: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with retries. With `deadline`, a retry that would start after it is not made unless an
        earlier attempt got no answer (`outcome_unknown`: it may have been counted; only a replay tells)."""
        headers = dict(kwargs.pop("headers", None) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last_problem, server_wait = "", None
        for attempt in range(self.retry.attempts):
            if attempt:
                if server_wait is not None:
                    delay = self.retry.paced(server_wait, self._rng)
                else:
                    delay = self.retry.delay(attempt - 1, self._rng)
                if deadline is not None and not outcome_unknown and self._clock() + delay > deadline:
                    raise DeadlinePassed(
                        f"{method} {path}: the next try would be after the round's deadline ({last_problem})"
                    )
                log.info("retrying %s %s in %.1fs (%s)", method, path, delay, last_problem)
                self._sleep(delay)
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts, a truncated answer
                last_problem, server_wait = f"{type(exc).__name__}: {exc}", None
                outcome_unknown = outcome_unknown or not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                continue
            if response.status_code in ok:
                return response
            status = response.status_code
            if status >= 500 or status in PACED_STATUSES:
                server_wait = parse_retry_after(response.headers.get("Retry-After"), self._clock())
                last_problem = f"HTTP {status}: {_detail(response)}"
                continue
            raise RejectedError(status, _detail(response), method, path)
        raise UnavailableError(
            f"{method} {path}: coordinator unavailable after {self.retry.attempts} "
            f"attempts; last problem: {last_problem}",
            retry_after=server_wait,
        )

    # ------------------------------------------------------------------ endpoints

    def enroll(self, enrollment_key: str, name: str | None = None) -> tuple[str, str]:
        """POST /v1/devices -> (device_id, token)."""
        body = self._request(
            "POST", "/v1/devices", ok=(200, 201), json={"enrollment_key": enrollment_key, "name": name}
        ).json()
        return str(body["device_id"]), str(body["token"])

    def rotate_token(self, device_id: str) -> str:
        """POST /v1/devices/{id}/token -> a new token (the one presented stops working)."""
        return str(self._request("POST", f"/v1/devices/{device_id}/token", ok=(200,)).json()["token"])

    def latest_model(self, etag: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
        """GET /v1/models/latest -> (its description, ETag); (None, etag) when unchanged since `etag` (304)."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self._request("GET", "/v1/models/latest", ok=(200, 304), headers=headers)
        if response.status_code == 304:
            return None, response.headers.get("ETag", etag)
        return response.json(), response.headers.get("ETag")

    def download_model(self, version: int, etag: str | None = None) -> tuple[bytes | None, str | None]:
        """GET /v1/models/{version}; returns (None, etag) when our cached copy is current (304)."""
        headers = {"If-None-Match": etag} if etag else {}
        response = self._request("GET", f"/v1/models/{int(version)}", ok=(200, 304), headers=headers)
        if response.status_code == 304:
            return None, response.headers.get("ETag", etag)
        return response.content, response.headers.get("ETag")

    def checkin(self, num_samples: int | None, task_kinds: list[str] | None = None) -> CheckinAnswer:
        """POST /v1/checkin -> a task, or when to come back (a malformed answer raises ProtocolError).
        `task_kinds`: what we can do besides training (evaluate, personalize); the server then may ask it."""
        body: dict[str, Any] = {"eligible": True, "num_samples": num_samples}
        if task_kinds:
            body["task_kinds"] = list(task_kinds)
        return CheckinAnswer.from_dict(self._request("POST", "/v1/checkin", json=body).json())

    def report_metrics(self, metrics: FederatedMetrics) -> None:
        """POST /v1/federated-metrics: what an evaluate or personalize task measured (safe to repeat)."""
        self._request("POST", "/v1/federated-metrics", ok=(200, 201, 204), json=metrics.to_dict())

    def upload(
        self,
        round_id: int,
        body: bytes,
        idempotency_key: str,
        *,
        deadline: float | None = None,
        outcome_unknown: bool = False,
    ) -> UploadReceipt:
        """POST the update bytes; safe to call again with the same key (counted once)."""
        response = self._request(
            "POST",
            f"/v1/rounds/{int(round_id)}/updates",
            ok=(200, 201, 202),
            deadline=deadline,
            outcome_unknown=outcome_unknown,
            content=body,
            headers={"Content-Type": "application/octet-stream", "Idempotency-Key": idempotency_key},
        )
        return UploadReceipt.from_dict(response.json())

    # ------------------------------------------------------------------ secure aggregation (device_agent/secagg.py)

    def secagg_status(self, round_id: int, since: str | None = None, wait: float = 0) -> dict[str, Any]:
        """GET /v1/rounds/{id}/secagg: the phase, this device's index and config, the message due to it;
        with `wait`, a long poll answered when the phase is no longer `since` or our message is due."""
        params: dict[str, Any] = {"wait": wait} if wait else {}
        if since is not None:
            params["since"] = since
        return self._request("GET", f"/v1/rounds/{int(round_id)}/secagg", params=params).json()

    def secagg_join(self, round_id: int, wait: float = 0) -> dict[str, Any]:
        """Join the round's cohort; with `wait`, answered once the cohort is fixed (a long poll)."""
        params: dict[str, Any] = {"wait": wait} if wait else {}
        return self._request("POST", f"/v1/rounds/{int(round_id)}/secagg/join", params=params).json()

    def secagg_send(self, round_id: int, kind: str, message: dict[str, Any] | bytes, wait: float = 0) -> dict[str, Any]:
        """POST one phase's message (a replay of an accepted one is answered again, counted once); with
        `wait`, the answer's `status` is what the long poll after it would have said."""
        path = f"/v1/rounds/{int(round_id)}/secagg/{kind}"
        params: dict[str, Any] = {"wait": wait} if wait else {}
        if isinstance(message, bytes):
            headers = {"Content-Type": "application/octet-stream"}
            return self._request(
                "POST", path, content=message, headers=headers, params=params, outcome_unknown=True
            ).json()
        return self._request("POST", path, json=message, params=params, outcome_unknown=True).json()
