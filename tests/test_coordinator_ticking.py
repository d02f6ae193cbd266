"""Rounds settle in the background, never in a GET; an upload after its round's deadline is refused
even before the background tick has closed the round; check-ins keep devices.last_seen; /metrics
has histograms and bounded labels."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from coordinator.api import create_app
from coordinator.api.deps import token_hash
from coordinator.settings import Settings
from coordinator.testing import FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes, tick
from protocol.update import encode_update

KEY = "k"
SHAPES = {"w": (3, 3), "b": (3,)}


def serve(tmp_path, clock: FakeClock, tick_interval: float, **options) -> ServerThread:
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        enrollment_key=KEY,
        tick_interval=tick_interval,
        **{"goal": 2, "min_devices": 1, "deadline": 60, "min_fraction": 0.5, **options},
    )
    return ServerThread(create_app(settings, clock=clock))


def update(round_id: int = 1, seed: int = 0) -> bytes:
    return encode_update(random_delta(SHAPES, seed), sample_count=5, round_id=round_id, base_version=0)


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_background_tick_commits_at_the_deadline_without_any_request(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=0.02) as server, httpx.Client(base_url=server.url) as client:
        device = TestDevice(client, KEY)
        device.task()
        assert device.upload(1, update()).status_code == 202
        store = server.server.config.app.state.services.store
        clock.advance(60)  # from here on, no request at all
        wait_for(lambda: getattr(store.open_round(), "id", 1) == 2, "the background tick")  # commit, then open
        r1 = store.round(1)
        assert (r1.status, r1.result_version, r1.closed_at) == ("committed", 1, clock())
        assert store.open_round().base_version == 1


def test_get_handlers_do_not_settle_rounds(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=3600) as server, httpx.Client(base_url=server.url) as client:
        app = server.server.config.app
        TestDevice(client, KEY).task()
        clock.advance(120)  # far past the deadline; the ticker sleeps for an hour
        for path in ("/v1/rounds", "/v1/rounds/1", "/", "/metrics", "/healthz", "/v1/models", "/v1/models/latest"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/rounds/1").json()["status"] == "open"  # none of them settled it
        assert client.get("/healthz").json()["round_id"] == 1
        tick(app)
        r1 = client.get("/v1/rounds/1").json()
        assert r1["status"] == "abandoned" and "fewer than the minimum" in r1["reason"]


def test_a_late_upload_is_refused_by_the_deadline_before_the_tick(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=3600) as server, httpx.Client(base_url=server.url) as client:
        services = server.server.config.app.state.services
        store = services.store
        a, b, c = (TestDevice(client, KEY) for _ in range(3))
        a.task(), b.task()
        services.ticker.stop()  # a stalled timer: nothing settles rounds any more
        clock.advance(60)  # the deadline, to the second
        late = a.upload(1, update(seed=1))
        assert late.status_code == 409 and "round 1 passed its deadline" in late.json()["detail"]
        assert store.round(1).received == 0 and not store.has_update(1, a.id)
        answer = c.checkin().json()  # and no task from a round past its deadline
        assert answer["status"] == "retry" and "passed its deadline" in answer["reason"]
        assert store.round(1).status == "open"  # only the deadline check refused them
        services.ticker.start()  # ticking every hour: only a wake makes it settle now
        again = b.upload(1, update(seed=2))
        assert again.status_code == 409 and "late update refused" in again.json()["detail"]
        wait_for(lambda: store.round(1).status == "abandoned", "the tick the late upload woke")
        assert store.round(1).received == 0


def test_check_ins_keep_last_seen_to_the_minute(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=3600, deadline=3600) as server, httpx.Client(base_url=server.url) as c:
        store = server.server.config.app.state.services.store
        device = TestDevice(c, KEY)
        assert store.device_by_token(token_hash(device.token)).last_seen is None  # enrolled, never seen
        first = clock()
        device.task()
        assert store.device_by_token(token_hash(device.token)).last_seen == first  # written before the answer
        clock.advance(30)
        device.task()  # within the minute: no write
        assert store.device_by_token(token_hash(device.token)).last_seen == first
        clock.advance(30)
        assert device.checkin(eligible=False).json()["status"] == "retry"  # any check-in counts
        assert store.device_by_token(token_hash(device.token)).last_seen == first + 60


def test_a_token_idle_for_longer_than_device_token_idle_days_expires(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=3600, deadline=3600) as server, httpx.Client(base_url=server.url) as c:
        device = TestDevice(c, KEY)
        assert device.checkin(eligible=False).status_code == 200
        clock.advance(89 * 86400)
        assert device.checkin(eligible=False).status_code == 200  # active: the window slides
        clock.advance(90 * 86400 + 120)
        expired = device.checkin(eligible=False)
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]


def test_metrics_histograms_and_bounded_labels(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=3600, goal=1) as server, httpx.Client(base_url=server.url) as client:
        device = TestDevice(client, KEY)
        device.task()
        body = update()
        assert device.upload(1, body).status_code == 202  # goal 1: the round commits
        for i in range(30):  # hostile label values: random methods and paths
            client.request(f"X{i}{'Q' * 200}", "/healthz")
            client.get(f"/no/such/path/{i}")
            client.request(f"BREW{i}", f"/v1/rounds/{i}/teapot")
        text = client.get("/metrics").text
    assert re.search(r"^pf_upload_seconds_count 1\.0$", text, re.M)
    assert re.search(r'^pf_upload_seconds_bucket\{le="\+Inf"\} 1\.0$', text, re.M)
    assert re.search(rf"^pf_upload_bytes_sum {len(body)}\.0$", text, re.M)
    assert re.search(r'^pf_round_duration_seconds_count\{outcome="committed"\} 1\.0$', text, re.M)
    assert "# TYPE pf_round_duration_seconds histogram" in text
    requests = re.findall(
        r'^pf_http_requests_total\{method="([^"]*)",route="([^"]*)",status="(\d+)"\} (\S+)$', text, re.M
    )
    methods = {m for m, _, _, _ in requests}
    routes = {r for _, r, _, _ in requests}
    assert methods <= {"GET", "POST", "other"} and "other" in methods
    assert "unmatched" in routes and not any("no/such" in r or "teapot" in r for r in routes)
    assert len(requests) < 12  # 90 odd requests, a handful of series
    unmatched = sum(float(n) for m, r, _, n in requests if r == "unmatched")
    assert unmatched == 60


@pytest.mark.parametrize("name", ["pf_upload_seconds", "pf_upload_bytes", "pf_round_duration_seconds"])
def test_histograms_are_exposed_before_any_observation(tmp_path, name):
    with serve(tmp_path, FakeClock(), tick_interval=3600) as server, httpx.Client(base_url=server.url) as client:
        assert f"# TYPE {name} histogram" in client.get("/metrics").text


def test_the_lease_holder_forgets_rate_limit_windows_older_than_an_hour(tmp_path):
    clock = FakeClock()
    with serve(tmp_path, clock, tick_interval=0.02) as server:
        services = server.server.config.app.state.services
        store = services.store
        assert [store.hit("enroll:1.2.3.4", 60, clock()) for _ in range(2)] == [1, 2]
        clock.advance(1800)
        store.hit("enroll:1.2.3.4", 60, clock())
        clock.advance(1860)  # the first window is now more than an hour old, the second is not
        wait_for(lambda: store.hit("enroll:1.2.3.4", 60, clock() - 3660) == 1, "the old window pruned")
        assert store.hit("enroll:1.2.3.4", 60, clock() - 1860) == 2  # the newer window kept its count
