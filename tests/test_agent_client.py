"""The agent's HTTP client: what is retried, what is not, and what each request carries."""

from __future__ import annotations

import httpx
import pytest

from device_agent.client import CoordinatorClient, RejectedError, RetryPolicy, UnavailableError
from protocol.messages import CheckinAnswer


def make_client(handler, attempts: int = 4) -> tuple[CoordinatorClient, list[httpx.Request], list[float]]:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request, len(seen))

    client = CoordinatorClient(
        "http://coordinator.test",
        token="tok",
        transport=httpx.MockTransport(recording),
        retry=RetryPolicy(attempts=attempts, base_delay=0.5, max_delay=4.0),
        seed=1,
        sleep=sleeps.append,
    )
    return client, seen, sleeps


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_4xx_is_not_retried_and_names_the_reason(status):
    refuse = {"detail": "round 7 is closed"}
    client, seen, sleeps = make_client(lambda req, n: httpx.Response(status, json=refuse))
    with pytest.raises(RejectedError, match=f"refused with {status}: round 7 is closed") as info:
        client.upload(7, b"bytes", "key-1")
    assert info.value.status == status
    assert len(seen) == 1 and sleeps == []


def test_5xx_and_connection_errors_are_retried_with_growing_jittered_backoff():
    def flaky(request, n):
        if n == 1:
            raise httpx.ConnectError("connection refused")
        if n == 2:
            raise httpx.ReadTimeout("timed out")
        if n == 3:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(200, json={"status": "retry", "retry_after": 5})

    client, seen, sleeps = make_client(flaky)
    assert client.checkin(100) == CheckinAnswer("retry", retry_after=5)
    assert len(seen) == 4 and len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 0 <= delay <= 0.5 * 2**attempt  # full jitter below the exponential cap


def test_gives_up_after_the_attempts_with_the_last_problem():
    client, seen, sleeps = make_client(lambda req, n: httpx.Response(502, text="bad gateway"), attempts=3)
    with pytest.raises(UnavailableError, match="after 3 attempts.*HTTP 502"):
        client.latest_model()
    assert len(seen) == 3


def test_backoff_is_capped():
    policy = RetryPolicy(attempts=20, base_delay=1.0, max_delay=4.0)
    import random

    rng = random.Random(0)
    assert max(policy.delay(a, rng) for a in range(20)) <= 4.0


def test_upload_carries_key_token_and_raw_bytes_and_retries_with_the_same_key():
    def handler(request, n):
        if n == 1:
            return httpx.Response(500)
        return httpx.Response(202, json={"accepted": True, "round_id": 3, "received": 1, "goal": 2})

    client, seen, _ = make_client(handler)
    assert client.upload(3, b"\x00update", "abc123").accepted is True
    assert [r.headers["Idempotency-Key"] for r in seen] == ["abc123", "abc123"]
    assert all(r.headers["Authorization"] == "Bearer tok" for r in seen)
    assert seen[0].url.path == "/v1/rounds/3/updates" and seen[0].content == b"\x00update"
    assert seen[0].headers["Content-Type"] == "application/octet-stream"


def test_model_download_uses_etag_and_understands_304():
    def handler(request, n):
        if request.headers.get("If-None-Match") == '"abc"':
            return httpx.Response(304, headers={"ETag": '"abc"'})
        return httpx.Response(200, content=b"model", headers={"ETag": '"abc"'})

    client, seen, _ = make_client(handler)
    assert client.download_model(2) == (b"model", '"abc"')
    assert client.download_model(2, '"abc"') == (None, '"abc"')
    assert seen[1].headers["If-None-Match"] == '"abc"'


def test_every_request_has_a_timeout():
    client, seen, _ = make_client(lambda req, n: httpx.Response(200, json={}))
    client.latest_model()
    timeouts = seen[0].extensions["timeout"]
    assert all(timeouts[k] is not None for k in ("connect", "read", "write", "pool"))
