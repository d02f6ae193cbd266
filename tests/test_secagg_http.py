"""Secure aggregation over the real HTTP API: devices (device_agent/secagg.py, in threads) against a
real coordinator on a real port and SQLite file. The committed model is the survivors' weighted FedAvg
up to quantization, with dropouts at each phase; too many dropouts abandon the round and devices are
told why; replays count once; no byte a device sent holds its delta."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread, random_delta, stand_in_model_bytes
from device_agent.client import CoordinatorClient, RetryPolicy
from device_agent.secagg import SecAggParticipant
from engine.serialize.container import loads
from protocol.secagg.wire import unpack_frame

pytest_plugins = ["postgres_helpers"]  # pg_url: a throwaway PostgreSQL database

KEY = "secagg-http-test-enrollment-key"
ADMIN = "secagg-test-admin-token-0123456789"
SHAPES = {"w": (12, 10), "b": (10,)}
BASE = loads(stand_in_model_bytes(shapes=SHAPES)).tensors


def start(tmp_path, **options):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(shapes=SHAPES))
    defaults = {
        "admin_token": ADMIN,
        "enroll_per_address": 100_000,
        "goal": 6,
        "over_select": 1.0,
        "deadline": 120,
        "tick_interval": 0.05,
        "secagg_phase_timeout": 4.0,
    }
    defaults["db"] = str(tmp_path / "c.db")
    settings = Settings(
        model=str(model),
        enrollment_key=KEY,
        secure_aggregation=True,
        strategy="fedavg",
        min_retry_after=0,
        max_retry_after=1,
        **{**defaults, **options},
    )
    return create_app(settings)


def enrolled(url: str, count: int) -> list[CoordinatorClient]:
    clients = []
    for _ in range(count):
        client = CoordinatorClient(url, retry=RetryPolicy(attempts=8))
        client.token = client.enroll(KEY)[1]
        clients.append(client)
    return clients


def play(url: str, deltas, samples, leave_after=None):
    """Every device checks in, then runs the protocol in its own thread; returns (outcomes, participants)."""
    clients = enrolled(url, len(deltas))
    tasks = [c.checkin(10).task for c in clients]
    assert all(t is not None and t.secure_aggregation for t in tasks)
    leave_after = leave_after or {}
    parts = [
        SecAggParticipant(c, t.round_id, t.deadline, leave_after=leave_after.get(i))
        for i, (c, t) in enumerate(zip(clients, tasks, strict=True))
    ]
    outcomes: list = [None] * len(parts)

    def run(i: int) -> None:
        outcomes[i] = parts[i].run(deltas[i], samples[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return outcomes, parts, tasks[0].round_id


def wait_closed(client: httpx.Client, round_id: int) -> dict:
    for _ in range(200):
        detail = client.get(f"/v1/rounds/{round_id}").json()
        if detail["status"] != "open":
            return detail
        threading.Event().wait(0.05)
    raise AssertionError(f"round {round_id} is still open: {detail}")


def expected_model(deltas, samples, included):
    weights = [min(samples[i], 1000) for i in included]
    return {
        name: BASE[name] + sum(w * deltas[i][name].astype(np.float64) for w, i in zip(weights, included)) / sum(weights)
        for name in SHAPES
    }


def check_model(client, version, deltas, samples, included):
    got = loads(client.get(f"/v1/models/{version}").content).tensors
    want = expected_model(deltas, samples, included)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], atol=2e-4)


@pytest.fixture
def server(tmp_path):
    def make(**options):
        app = start(tmp_path, **options)
        return ServerThread(app)

    return make


def admin_client(url: str, device: CoordinatorClient) -> httpx.Client:
    client = httpx.Client(base_url=url)
    client.headers.update({"Authorization": f"Bearer {device.token}"})
    return client


DELTAS = [random_delta(SHAPES, seed, scale=0.05) for seed in range(6)]
SAMPLES = [5, 17, 40, 3, 2000, 9]  # 2000 is capped at max_weight 1000 before masking


def test_all_devices_give_the_weighted_mean_and_no_byte_holds_a_delta(server):
    with server() as srv:
        outcomes, parts, round_id = play(srv.url, DELTAS, SAMPLES)
        assert [o.status for o in outcomes] == ["done"] * 6, outcomes
        reader = enrolled(srv.url, 1)[0]
        with admin_client(srv.url, reader) as client:
            detail = wait_closed(client, round_id)
            assert detail["status"] == "committed" and detail["received"] == 6
            assert detail["secure_aggregation"] is True and detail["secagg_phase"] == "done"
            as_admin = client.get(f"/v1/rounds/{round_id}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
            assert as_admin["participants"] == []  # the server holds no individual update
            assert "secure aggregation: done (6 devices)" in client.get("/").text  # the dashboard says so
            check_model(client, detail["result_version"], DELTAS, SAMPLES, range(6))
        store = srv.server.config.app.state.services.store
        assert store.round_updates(round_id) == []  # the server holds no individual update
        for part, delta in zip(parts, DELTAS, strict=True):
            flat32 = np.concatenate([delta[n].reshape(-1) for n in sorted(delta)]).astype(np.float32)
            for payload in part.sent:
                for chunk in range(0, flat32.size - 4, 4):  # no 16-byte run of the delta, as float32 or float64
                    assert flat32[chunk : chunk + 4].tobytes() not in payload
                    assert flat32[chunk : chunk + 2].astype(np.float64).tobytes() not in payload
            frame = next(p for p in part.sent if p.startswith(b"PFSECAGG"))
            header, body = unpack_frame(frame, "masked_input")
            vector = np.frombuffer(body, "<u4")
            assert vector.size == flat32.size + 1
            # uniform in Z_(2^32): each of 16 equal bins of the top bits holds about 1/16 of the entries
            counts = np.bincount(vector >> 28, minlength=16)
            expected = vector.size / 16
            assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 15 dof: p < 1e-6 to fail
            assert abs(int(vector[0])) > 2000 or vector[0] != min(SAMPLES[parts.index(part)], 1000)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_dropouts_at_two_phases_still_give_the_survivors_sum(server, database, request):
    options = {"db": request.getfixturevalue("pg_url")} if database == "postgresql" else {}
    with server(**options) as srv:
        leave = {1: "advertise", 4: "masked_input"}  # 1 never shares keys; 4 vanishes before unmasking
        outcomes, _, round_id = play(srv.url, DELTAS, SAMPLES, leave_after=leave)
        statuses = [o.status for o in outcomes]
        assert statuses[1] == "left" and statuses[4] == "left", outcomes
        assert [s for i, s in enumerate(statuses) if i not in leave] == ["done"] * 4, outcomes
        reader = enrolled(srv.url, 1)[0]
        with admin_client(srv.url, reader) as client:
            detail = wait_closed(client, round_id)
            assert detail["status"] == "committed", detail
            assert detail["received"] == 5  # device 4's masked input counts: its mask is removed without it
            check_model(client, detail["result_version"], DELTAS, SAMPLES, [0, 2, 3, 4, 5])


def test_too_many_dropouts_abandon_the_round_and_devices_are_told_why(server):
    with server() as srv:
        leave = {0: "advertise", 1: "advertise", 2: "advertise"}  # 3 of 6: over the tolerance of 2
        outcomes, _, round_id = play(srv.url, DELTAS, SAMPLES, leave_after=leave)
        rest = [outcomes[i] for i in range(3, 6)]
        assert all(o.status == "abandoned" for o in rest), rest
        assert all("at least 4" in (o.reason or "") for o in rest), rest
        reader = enrolled(srv.url, 1)[0]
        with admin_client(srv.url, reader) as client:
            detail = wait_closed(client, round_id)
            assert detail["status"] == "abandoned" and "secure aggregation" in detail["reason"]
            assert detail["result_version"] is None


def test_replays_count_once_and_devices_cannot_speak_for_others(server):
    from protocol.secagg import ClientSession

    with server(deadline=20) as srv:  # 4 of 6 join: the cohort forms when only 4 phases' time (16 s) is left
        clients = enrolled(srv.url, 4)
        tasks = [c.checkin(10).task for c in clients[:4]]
        round_id = tasks[0].round_id
        with httpx.Client(base_url=srv.url) as http:
            h = [{"Authorization": f"Bearer {c.token}"} for c in clients]
            plain = http.post(f"/v1/rounds/{round_id}/updates", content=b"x", headers={**h[0], "Idempotency-Key": "a"})
            assert plain.status_code == 409 and "secure aggregation" in plain.json()["detail"]
            early = http.post(f"/v1/rounds/{round_id}/secagg/advertise", json={}, headers=h[0])
            assert early.status_code == 403
            for headers in h[:3]:
                assert http.post(f"/v1/rounds/{round_id}/secagg/join", headers=headers).json()["phase"] == "joining"
            again = http.post(f"/v1/rounds/{round_id}/secagg/join", headers=h[0]).json()
            assert again["phase"] == "joining" and again["cohort_size"] == 3  # a second join changes nothing
            status = http.post(f"/v1/rounds/{round_id}/secagg/join", headers=h[3]).json()
        for _ in range(3):
            status = clients[3].secagg_status(round_id, since="joining", wait=10)  # a long poll
            if status["phase"] != "joining":
                break
        assert status["phase"] == "advertise" and status["cohort_size"] == 4
        session = ClientSession(status["config"], status["index"])
        message = session.advertise()
        first = clients[3].secagg_send(round_id, "advertise", message)
        assert first["accepted"] is True and first["status"] is None  # no wait: no status
        replay = clients[3].secagg_send(round_id, "advertise", message, wait=0.3)
        assert replay["accepted"] is False  # a replay
        # with wait: the long poll's answer (others have not advertised, so after 0.3 s, no news)
        assert replay["status"]["phase"] == "advertise" and replay["status"]["waiting"] is False
        assert replay["status"]["index"] == status["index"]
        other = dict(message, index=status["index"] % 4 + 1)
        with httpx.Client(base_url=srv.url) as http:
            refused = http.post(f"/v1/rounds/{round_id}/secagg/advertise", json=other, headers=h[3])
            assert refused.status_code == 403 and "index" in refused.json()["detail"]
            forged = dict(message, mask_key="AAAA")
            bad = http.post(f"/v1/rounds/{round_id}/secagg/advertise", json=forged, headers=h[3])
            assert bad.status_code == 422, bad.text
            garbage = http.post(f"/v1/rounds/{round_id}/secagg/masked_input", content=b"\x00" * 64, headers=h[3])
            assert garbage.status_code == 422 and "masked_input" in garbage.json()["detail"]
            not_json = http.post(f"/v1/rounds/{round_id}/secagg/unmask", content=b"{", headers=h[3])
            assert not_json.status_code == 422
            huge = http.post(f"/v1/rounds/{round_id}/secagg/shares", content=b" " * (9 << 20), headers=h[3])
            assert huge.status_code == 413
            stranger = http.get(f"/v1/rounds/{round_id}/secagg")
            assert stranger.status_code == 401
        for c in clients:
            c.close()


def test_strategies_that_need_every_update_refuse_secure_aggregation_at_startup():
    for strategy in ("median", "trimmed_mean", "krum", "multikrum"):
        with pytest.raises(ValueError, match="secure_aggregation cannot combine with strategy"):
            Settings(secure_aggregation=True, strategy=strategy)


def test_dp_rounds_admit_each_device_with_probability_q_and_say_so(tmp_path):
    """Poisson admission: ~q of the fleet is admitted, a device asking again gets the same answer, and
    /v1/rounds says which sampling the accountant charged."""
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        enrollment_key=KEY,
        goal=20,
        over_select=10.0,
        dp_noise_multiplier=1.0,
        dp_population=100,
        enroll_per_address=1_000,  # 200 devices from one test address
    )
    with ServerThread(create_app(settings)) as srv, httpx.Client(base_url=srv.url) as http:
        from coordinator.testing import TestDevice

        devices = [TestDevice(http, KEY) for _ in range(200)]
        first = [d.checkin().json()["status"] == "task" for d in devices]
        assert [d.checkin().json()["status"] == "task" for d in devices] == first  # decided once per device
        assert 20 <= sum(first) <= 62  # Binomial(200, 0.2): mean 40, sd 5.7
        summary = http.get("/v1/rounds").json()[0]
        assert summary["dp_sampling"] == "poisson" and summary["dp_sampling_rate"] == 0.2


def test_distributed_dp_the_sum_carries_the_central_noise_the_accountant_charges(server):
    """Secure aggregation with DP: each device clips to C and adds its Skellam share; the unmasked mean
    carries noise of the configured size, every device counts once, and epsilon is charged."""
    from coordinator.service.secagg_config import secagg_config
    from coordinator.settings import RoundSettings
    from protocol.deltas import clip_by_l2

    z, clip = 1.0, 0.5
    options = {"dp_noise_multiplier": z, "dp_clip_norm": clip, "dp_sampling": "unamplified"}
    with server(**options) as srv:
        outcomes, _, round_id = play(srv.url, DELTAS, SAMPLES)
        assert [o.status for o in outcomes] == ["done"] * 6, outcomes
        reader = enrolled(srv.url, 1)[0]
        with admin_client(srv.url, reader) as client:
            detail = wait_closed(client, round_id)
            assert detail["status"] == "committed" and detail["total_samples"] == 6  # max_weight 1 in DP rounds
            assert detail["epsilon"] > 0 and detail["dp_sampling"] == "unamplified"
            assert detail["dp_sampling_rate"] == 1.0
            got = loads(client.get(f"/v1/models/{detail['result_version']}").content).tensors
    clipped = [clip_by_l2(d, clip)[0] for d in DELTAS]
    noise = np.concatenate([(got[n] - BASE[n] - sum(c[n] for c in clipped) / 6).reshape(-1) for n in sorted(SHAPES)])
    config = secagg_config(RoundSettings(goal=6, **options, secure_aggregation=True), 1, 6, noise.size, bytes(32))
    expected = config.central_noise_std(6) / 6  # on the mean of 6 survivors
    assert 0.75 * expected < np.std(noise) < 1.25 * expected, (np.std(noise), expected)
    assert abs(np.mean(noise)) < 4 * expected / np.sqrt(noise.size)
