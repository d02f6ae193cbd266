"""The agent's HTTP client: what is retried, what is not, and what each request carries."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from device_agent.client import (
    CoordinatorClient,
    DeadlinePassed,
    RejectedError,
    RetryPolicy,
    UnavailableError,
    parse_retry_after,
)
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


# ---------------------------------------------------------------------- pacing: 408, 429, 503 and Retry-After


@pytest.mark.parametrize("status", [408, 429, 503])
def test_paced_statuses_wait_the_servers_retry_after_in_full_plus_jitter(status):
    def paced(request, n):
        if n < 3:
            return httpx.Response(status, headers={"Retry-After": "120"}, json={"detail": "slow down"})
        return httpx.Response(200, json={"status": "retry", "retry_after": 5})

    client, seen, sleeps = make_client(paced)
    assert client.checkin(10).status == "retry"
    assert len(seen) == 3 and len(sleeps) == 2
    # never sooner than asked, never capped at the policy's max_delay (4 s here), jitter <= R/10
    assert all(120 <= s <= 132 for s in sleeps), sleeps
    assert sleeps[0] != sleeps[1]  # jittered


def test_retry_after_as_an_http_date_is_honoured():
    now = 1_800_000_000.0
    when = email.utils.formatdate(now + 90, usegmt=True)

    def paced(request, n):
        return httpx.Response(429, headers={"Retry-After": when}) if n == 1 else httpx.Response(200, json={})

    client, seen, sleeps = make_client(paced)
    client._clock = lambda: now
    client.latest_model()
    assert 90 <= sleeps[0] <= 99


def test_parse_retry_after():
    now = 1_800_000_000.0
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after(" 0 ", now) == 0
    assert parse_retry_after(email.utils.formatdate(now - 50, usegmt=True), now) == 0  # a date in the past
    assert parse_retry_after("999999999", now) == 24 * 3600  # only the absolute ceiling applies
    for garbage in (None, "", "soon", "-5", "1.5e3", "Mon, 99 Foo 2026"):
        assert parse_retry_after(garbage, now) is None, garbage


def test_a_paced_status_without_retry_after_backs_off_like_a_5xx():
    client, seen, sleeps = make_client(
        lambda req, n: httpx.Response(429) if n < 3 else httpx.Response(200, json={}), attempts=4
    )
    client.latest_model()
    assert len(sleeps) == 2 and all(0 <= s <= 0.5 * 2**i for i, s in enumerate(sleeps))


def test_exhausted_retries_carry_the_servers_last_wait():
    client, seen, sleeps = make_client(lambda req, n: httpx.Response(503, headers={"Retry-After": "300"}), attempts=3)
    with pytest.raises(UnavailableError, match="HTTP 503") as info:
        client.checkin(1)
    assert info.value.retry_after == 300 and len(seen) == 3


def test_other_4xx_are_not_retried_even_with_retry_after():
    client, seen, sleeps = make_client(
        lambda req, n: httpx.Response(409, headers={"Retry-After": "1"}, json={"detail": "round closed"})
    )
    with pytest.raises(RejectedError):
        client.upload(1, b"u", "k")
    assert len(seen) == 1 and sleeps == []


def test_redirects_are_not_followed():
    client, seen, sleeps = make_client(
        lambda req, n: httpx.Response(302, headers={"Location": "http://elsewhere.test/v1/checkin"})
    )
    with pytest.raises(RejectedError, match="302"):
        client.checkin(1)
    assert len(seen) == 1


def test_an_upload_retry_past_the_deadline_is_dropped_unless_an_attempt_went_unanswered():
    now = [1000.0]
    client, seen, sleeps = make_client(lambda req, n: httpx.Response(503, headers={"Retry-After": "60"}))
    client._clock = lambda: now[0]
    with pytest.raises(DeadlinePassed):
        client.upload(1, b"u", "k", deadline=1030.0)  # the 60 s wait would end after the deadline
    assert len(seen) == 1 and sleeps == []

    def lost_then_ok(request, n):
        if n == 1:
            raise httpx.ReadTimeout("no answer")  # the server may have counted it
        return httpx.Response(202, json={"accepted": True, "round_id": 1, "received": 1, "goal": 1})

    client, seen, sleeps = make_client(lost_then_ok)
    client._clock = lambda: 2000.0  # already past the deadline: only a replay can tell what happened
    assert client.upload(1, b"u", "k", deadline=1030.0).accepted
    assert [r.headers["Idempotency-Key"] for r in seen] == ["k", "k"]
