"""The agent's loop in-process, against a scripted coordinator (httpx.MockTransport): caching,
privacy settings, top-k residuals, conditions that stop holding, personalization, predict."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import numpy as np
import pytest

from device_agent.__main__ import main as agent_main
from device_agent.client import CoordinatorClient, RejectedError, RetryPolicy
from device_agent.eligibility import AlwaysEligible, Probe, Verdict
from device_agent.personal import personal_names
from device_agent.runner import Agent, AgentConfig
from device_agent.state import AgentState
from engine.data import ArrayDataset, load_default
from engine.models import build_model_bytes
from engine.serialize.container import loads
from protocol.messages import Task
from protocol.update import decode_update

MODEL = build_model_bytes("lenet", seed=0)
MODEL_ETAG = f'"{hashlib.sha256(MODEL).hexdigest()}"'  # what the coordinator sends: the body's sha256
TRAINABLE = loads(MODEL).metadata["trainable"]


def local_data(n: int = 96, seed: int = 0) -> ArrayDataset:
    train = load_default("train")
    idx = np.random.default_rng(seed).choice(train.size(), n, replace=False)
    x, y = train.get_batch(idx)
    return ArrayDataset(x.astype(np.float32), y)


class FakeCoordinator:
    """Hands out `tasks` in order (then "retry"), serves MODEL, keeps what was uploaded."""

    def __init__(self, *tasks: dict):
        self.tasks = list(tasks)
        self.uploads: list[tuple[str, bytes]] = []
        self.model_gets = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/devices":
            return httpx.Response(201, json={"device_id": "dev", "token": "tok"})
        if path == "/v1/checkin":
            if not self.tasks:
                return httpx.Response(200, json={"status": "retry", "retry_after": 1})
            return httpx.Response(200, json={"status": "task", "task": self.tasks[0]})
        if path.startswith("/v1/models/"):
            self.model_gets += 1
            if request.headers.get("If-None-Match") == MODEL_ETAG:
                return httpx.Response(304, headers={"ETag": MODEL_ETAG})
            return httpx.Response(200, content=MODEL, headers={"ETag": MODEL_ETAG})
        if path.endswith("/updates"):
            self.uploads.append((request.headers["Idempotency-Key"], request.content))
            self.tasks.pop(0)
            return httpx.Response(202, json={"accepted": True, "round_id": 1, "received": 1, "goal": 1})
        return httpx.Response(404, json={"detail": path})


def task(round_id: int = 1, **options) -> dict:
    return {
        "round_id": round_id,
        "base_version": 0,
        "epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "deadline": time.time() + 600,
        "fedprox_mu": 0.0,
        "clip_norm": None,
        "noise_multiplier": 0.0,
        "encoding": "float32",
        "topk_fraction": None,
        **options,
    }


def make_agent(tmp_path, fake: FakeCoordinator, probe: Probe | None = None, **config) -> Agent:
    client = CoordinatorClient(
        "http://fake",
        transport=httpx.MockTransport(fake),
        retry=RetryPolicy(attempts=2, base_delay=0),
        sleep=lambda s: None,
    )
    cfg = AgentConfig(coordinator="http://fake", enrollment_key="k", **config)
    return Agent(
        cfg,
        client,
        AgentState(tmp_path / "state"),
        local_data(),
        probe or AlwaysEligible(),
        sleep=lambda s: None,
        emit=lambda line: None,
    )


def test_two_rounds_cache_the_model_and_report_every_field(tmp_path):
    fake = FakeCoordinator(task(1, encoding="int8"), task(2, encoding="int8"))
    records = make_agent(tmp_path, fake, rounds=2).run()
    assert [r["round"] for r in records] == [1, 2]
    assert fake.model_gets == 1  # version unchanged: the second round uses the cached file
    for r in records:
        for key in (
            "round",
            "version",
            "samples",
            "loss_before",
            "loss_after",
            "acc_before",
            "acc_after",
            "personal_acc",
            "global_acc",
            "bytes_sent",
            "bytes_raw_float32",
        ):
            assert r[key] is not None, key
        assert r["bytes_sent"] < 0.3 * r["bytes_raw_float32"]
        assert r["loss_after"] < r["loss_before"]
    update = decode_update(fake.uploads[0][1], expected={n: loads(MODEL).tensors[n].shape for n in TRAINABLE})
    assert update.encoding == "int8"
    assert update.sample_count == records[0]["samples"] == 77  # 96 minus the 20% holdout
    assert fake.uploads[0][0] != fake.uploads[1][0]  # a fresh idempotency key per update


def test_clipping_and_noise_follow_the_task(tmp_path):
    fake = FakeCoordinator(task(1, clip_norm=0.01))
    make_agent(tmp_path, fake, once=True).run()
    delta = decode_update(fake.uploads[0][1]).delta
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
    assert norm == pytest.approx(0.01, rel=1e-4)
    assert json.loads(json.dumps(loads(fake.uploads[0][1]).metadata["metrics"]))["delta_norm"] > 0.01

    noisy = FakeCoordinator(task(1, clip_norm=0.01, noise_multiplier=1.0))
    make_agent(tmp_path / "n", noisy, once=True).run()
    noisy_delta = decode_update(noisy.uploads[0][1]).delta
    total = sum(v.size for v in noisy_delta.values())
    noise_norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in noisy_delta.values())))
    assert noise_norm == pytest.approx(0.01 * np.sqrt(total), rel=0.05)  # std = multiplier * clip_norm


def test_topk_keeps_a_residual_between_rounds(tmp_path):
    fake = FakeCoordinator(task(1, topk_fraction=0.05, encoding="int8"), task(2, topk_fraction=0.05))
    agent = make_agent(tmp_path, fake, rounds=1)
    agent.run()
    residual = agent.state.residual()
    assert set(residual) == set(TRAINABLE) and sum(np.abs(v).sum() for v in residual.values()) > 0
    update = decode_update(fake.uploads[0][1])
    assert update.sparse
    kept = sum(np.count_nonzero(v) for v in update.delta.values())
    assert kept <= 0.05 * sum(v.size for v in update.delta.values()) + len(update.delta)


class StopsAfter(Probe):
    def __init__(self, ok_checks: int):
        self.left = ok_checks

    def check(self) -> Verdict:
        self.left -= 1
        return Verdict(self.left >= 0, "charging" if self.left >= 0 else "power: unplugged")


def test_conditions_lost_mid_training_discard_the_round(tmp_path, caplog):
    fake = FakeCoordinator(task(1, epochs=3))
    agent = make_agent(tmp_path, fake, probe=StopsAfter(4))
    with caplog.at_level("WARNING"):
        assert agent.do_task(Task.from_dict(task(1, epochs=3))) is None
    assert "power: unplugged" in caplog.text and "discarded" in caplog.text
    assert fake.uploads == [] and agent.state.pending() is None


def test_personal_layers_default_to_the_head_and_are_configurable():
    assert personal_names(["c1.weight", "c1.bias", "fc.weight", "fc.bias"]) == ["fc.weight", "fc.bias"]
    assert personal_names(["c1.weight", "fc2.weight", "fc2.bias", "fc3.weight"], ["fc2"]) == ["fc2.weight", "fc2.bias"]
    with pytest.raises(ValueError, match="match no parameter"):
        personal_names(["fc.weight"], ["conv9"])


def test_predict_uses_the_personal_model(tmp_path, capsys):
    fake = FakeCoordinator(task(1))
    agent = make_agent(tmp_path, fake, once=True)
    agent.run()
    personal, meta = agent.state.personal()
    assert set(personal) == set(personal_names(TRAINABLE)) and meta["base_version"] == 0
    x = local_data(3, seed=5).data
    np.save(tmp_path / "three.npy", x)
    state_dir = str(tmp_path / "state")
    assert agent_main(["predict", "--state-dir", state_dir, "--input", str(tmp_path / "three.npy")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 3 and all(0 <= line["class"] < 10 for line in lines)
    assert all(sum(line["probabilities"]) == pytest.approx(1, abs=1e-3) for line in lines)
    with pytest.raises(SystemExit, match="shape"):
        np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
        agent_main(["predict", "--state-dir", str(tmp_path / "state"), "--input", str(tmp_path / "bad.npy")])


class TokenRevoked(FakeCoordinator):
    """Refuses the token on check-in `refusals` times; counts enrollments."""

    def __init__(self, refusals: int, *tasks: dict):
        super().__init__(*tasks)
        self.refusals, self.enrollments = refusals, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/devices":
            self.enrollments += 1
        if request.url.path == "/v1/checkin" and self.refusals:
            self.refusals -= 1
            return httpx.Response(401, json={"detail": "Authorization: unknown token"})
        return super().__call__(request)


def test_a_revoked_token_leads_to_one_new_enrollment_not_a_loop(tmp_path):
    fake = TokenRevoked(1, task(1))
    assert [r["round"] for r in make_agent(tmp_path, fake, once=True).run()] == [1]
    assert fake.enrollments == 2
    stubborn = TokenRevoked(5, task(1))
    with pytest.raises(RejectedError, match="401"):
        make_agent(tmp_path / "s", stubborn, once=True).run()
    assert stubborn.enrollments == 2


# ---------------------------------------------------------------------- temporary refusals and pacing


class Scripted(FakeCoordinator):
    """FakeCoordinator whose check-ins first answer the given (status, headers, json) replies in turn."""

    def __init__(self, checkin_replies: list[tuple[int, dict, dict]], *tasks: dict, model: bytes = MODEL):
        super().__init__(*tasks)
        self.checkin_replies, self.checkins, self.model = list(checkin_replies), 0, model

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/checkin":
            self.checkins += 1
            if self.checkin_replies:
                status, headers, body = self.checkin_replies.pop(0)
                return httpx.Response(status, headers=headers, json=body)
        if request.url.path.startswith("/v1/models/") and self.model is not MODEL:
            self.model_gets += 1
            return httpx.Response(200, content=self.model, headers={"ETag": MODEL_ETAG})
        return super().__call__(request)


def pacing_agent(tmp_path, fake: FakeCoordinator, **config) -> tuple[Agent, list[float]]:
    """An agent whose waits (the runner's and the client's) are recorded instead of slept."""
    sleeps: list[float] = []
    client = CoordinatorClient(
        "http://fake", transport=httpx.MockTransport(fake), retry=RetryPolicy(attempts=2), sleep=sleeps.append, seed=3
    )
    cfg = AgentConfig(coordinator="http://fake", enrollment_key="k", max_wait=30.0, **config)
    agent = Agent(cfg, client, AgentState(tmp_path / "state"), local_data(), AlwaysEligible(), sleep=sleeps.append)
    agent.emit = lambda line: None
    return agent, sleeps


def test_a_429_on_check_in_is_waited_out_not_fatal(tmp_path):
    throttled = (429, {"Retry-After": "45"}, {"detail": "too many requests"})
    fake = Scripted([throttled, throttled, throttled], task(1))  # outlasts the client's 2 attempts
    agent, sleeps = pacing_agent(tmp_path, fake, once=True)
    assert [r["round"] for r in agent.run()] == [1]
    assert fake.checkins == 4 and len(fake.uploads) == 1
    # client retry (45 + jitter), then the runner waits the same server-asked 45 s (not --max-wait's 30)
    assert len(sleeps) == 3 and all(45 <= s <= 49.5 for s in sleeps), sleeps


def test_pace_steering_is_followed_beyond_max_wait(tmp_path):
    steer = (200, {"Retry-After": "600"}, {"status": "retry", "retry_after": 600, "reason": "round full"})
    fake = Scripted([steer], task(1))
    agent, sleeps = pacing_agent(tmp_path, fake, once=True)
    agent.run()
    assert len(sleeps) == 1 and 600 <= sleeps[0] <= 660  # the server's wait in full, jittered


def test_a_503_on_upload_keeps_the_update_pending_and_resends_it(tmp_path):
    class Busy(FakeCoordinator):
        refusals = 3

        def __call__(self, request):
            if request.url.path.endswith("/updates") and self.refusals:
                self.refusals -= 1
                self.uploads.append((request.headers["Idempotency-Key"], request.content))
                return httpx.Response(503, headers={"Retry-After": "20"})
            return super().__call__(request)

    fake = Busy(task(1))
    agent, sleeps = pacing_agent(tmp_path, fake, once=True)
    assert [r["round"] for r in agent.run()] == [1]
    keys, bodies = {k for k, _ in fake.uploads}, {b for _, b in fake.uploads}
    assert len(fake.uploads) == 4 and len(keys) == 1 and len(bodies) == 1  # one update, sent 4 times
    assert all(20 <= s <= 22 for s in sleeps), sleeps


def test_a_corrupted_model_is_refused_and_the_round_not_taken_again(tmp_path, caplog):
    container = loads(MODEL)
    tampered = dict(container.tensors)
    tampered["fc3.bias"] = tampered["fc3.bias"] + 1.0  # a well-formed file with other weights
    from engine.serialize.container import dumps

    evil = dumps(tampered, container.metadata, kind="model")  # its own checksum holds; the ETag does not
    fake = Scripted([], task(1), model=evil)
    agent, sleeps = pacing_agent(tmp_path, fake, rounds=1)
    with caplog.at_level("WARNING"):
        assert agent.one_round() is None
        assert agent.one_round() is None  # the same task offered again: not downloaded or trained again
    assert fake.uploads == [] and fake.model_gets == 2  # two tries at the download, then the round is dropped
    assert "does not match the ETag" in caplog.text and agent.state.last_round() == 1
    assert agent.state.cached_model() is None  # nothing unverified is cached

    flipped = bytearray(MODEL)
    flipped[-5] ^= 0xFF  # a bit flip in the weights: the container's checksum catches it too
    fake = Scripted([], task(1), model=bytes(flipped))
    agent, _ = pacing_agent(tmp_path / "b", fake, rounds=1)
    assert agent.one_round() is None and fake.uploads == []


def test_a_missing_model_version_drops_the_task_without_exiting(tmp_path):
    class Gone(FakeCoordinator):
        def __call__(self, request):
            if request.url.path.startswith("/v1/models/"):
                return httpx.Response(404, json={"detail": "model version 0 does not exist"})
            return super().__call__(request)

    fake = Gone(task(1))
    agent, _ = pacing_agent(tmp_path, fake)
    assert agent.one_round() is None and agent.state.last_round() == 1 and fake.uploads == []


def test_the_deadline_passing_during_training_drops_the_round(tmp_path):
    fake = FakeCoordinator(task(1, epochs=200, deadline=time.time() + 0.3))
    agent, _ = pacing_agent(tmp_path, fake)
    assert agent.one_round() is None
    assert fake.uploads == [] and agent.state.pending() is None and agent.state.last_round() == 1


def test_an_int4_task_gets_a_packed_int4_update(tmp_path):
    fake = FakeCoordinator(task(1, encoding="int4"))
    record = make_agent(tmp_path, fake, once=True).run()[-1]
    update = decode_update(fake.uploads[0][1], expected={n: loads(MODEL).tensors[n].shape for n in TRAINABLE})
    assert update.encoding == "int4"
    assert record["bytes_sent"] < 0.16 * record["bytes_raw_float32"]
    assert any(np.abs(v).max() > 0 for v in update.delta.values())


def test_an_int4_bitmap_top_k_task_gets_a_bitmap_update_under_an_eighth(tmp_path):
    fake = FakeCoordinator(task(1, encoding="int4-bitmap", topk_fraction=0.5))
    record = make_agent(tmp_path, fake, once=True).run()[-1]
    stored = loads(fake.uploads[0][1], kind="update").tensors
    update = decode_update(fake.uploads[0][1], expected={n: loads(MODEL).tensors[n].shape for n in TRAINABLE})
    assert update.encoding == "int4-bitmap" and update.sparse
    assert any(name.endswith("/mask") for name in stored)
    assert record["bytes_sent"] < record["bytes_raw_float32"] / 8
