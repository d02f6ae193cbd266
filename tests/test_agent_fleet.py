"""Issue 17 on the device: an agent the coordinator did not pick for training still personalizes on
new versions (personalize tasks, evaluate tasks, its own conditional-GET refresh), and an agent that
meets 429 and 503 with Retry-After waits as told and carries on. Real coordinator, real HTTP on
loopback, in-process agents (their waits are recorded, not slept)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread
from device_agent.client import CoordinatorClient, RetryPolicy
from device_agent.eligibility import AlwaysEligible
from device_agent.personal import load_personal_model
from device_agent.runner import Agent, AgentConfig
from device_agent.state import AgentState
from engine.data import ArrayDataset, load_default

KEY, ADMIN = "enroll-secret", "admin-secret"


def local_data(classes: tuple[int, ...], n: int = 60, seed: int = 0) -> ArrayDataset:
    """A label-skewed device: `n` training examples of the given classes."""
    train = load_default("train")
    labels = np.asarray(train.get_batch(np.arange(train.size()))[1]).reshape(-1)
    pool = np.flatnonzero(np.isin(labels, classes))
    idx = np.random.default_rng(seed).choice(pool, n, replace=False)
    x, y = train.get_batch(idx)
    return ArrayDataset(x.astype(np.float32), y)


@pytest.fixture
def coordinator(tmp_path):
    def start(**options):
        settings = Settings(
            db=str(tmp_path / "coord.db"),
            goal=1,
            min_devices=1,  # one-device rounds: a test of tasks, not of privacy
            over_select=1.0,
            min_fraction=1.0,
            deadline=300,
            batch_size=16,
            enrollment_key=KEY,
            admin_token=ADMIN,
            min_retry_after=0,
            max_retry_after=2,
            tick_interval=0.05,
            **options,
        )
        app = create_app(settings)
        server = ServerThread(app).__enter__()
        server.app = app
        started.append(server)
        server.http = httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"})
        return server

    started: list = []
    yield start
    for server in started:
        server.http.close()
        server.__exit__(None, None, None)


def make_agent(url: str, state_dir, data, sleeps: list | None = None, transport=None, **config) -> Agent:
    sleeps = [] if sleeps is None else sleeps
    client = CoordinatorClient(
        url, retry=RetryPolicy(attempts=3, base_delay=0), sleep=sleeps.append, transport=transport, seed=1
    )
    cfg = AgentConfig(coordinator=url, enrollment_key=KEY, **config)
    return Agent(cfg, client, AgentState(state_dir), data, AlwaysEligible(), sleep=sleeps.append, emit=lambda _: None)


def train_one_round(server, tmp_path) -> int:
    """A trainer device does the open round; training is then paused. Returns the version it made."""
    trainer = make_agent(server.url, tmp_path / "trainer", local_data((0, 1, 2, 3), seed=9), rounds=1)
    [record] = trainer.run()
    assert record["kind"] == "train"
    for _ in range(200):
        detail = server.http.get(f"/v1/rounds/{record['round']}").json()
        if detail["status"] == "committed":
            break
        time.sleep(0.05)
    assert server.http.post("/v1/admin/pause").status_code == 200
    return int(detail["result_version"])


def test_a_device_never_picked_personalizes_on_the_new_version_and_reports(coordinator, tmp_path):
    server = coordinator()
    version = train_one_round(server, tmp_path)
    state_dir = tmp_path / "bystander"
    bystander = make_agent(server.url, state_dir, local_data((5, 7)), once=True)
    [record] = bystander.run()
    assert record["kind"] == "personalize" and record["version"] == version
    assert bystander.personal.base_version() == version  # its personal layers now sit on the new version
    assert bystander.state.cached_model()[0] == version
    assert record["personal_acc"] > record["global_acc"]  # a 2-class device: its own head wins
    fed = server.http.get("/v1/federated-metrics").json()[str(version)]
    assert fed["devices"] == 1 and fed["samples"] == bystander.eval_set.size()
    assert fed["personal_accuracy"] == pytest.approx(record["personal_acc"])
    assert fed["personalization_lift"] == pytest.approx(record["personal_acc"] - record["global_acc"])
    # what `pf-agent predict` serves: the new base with the personal layers just fitted
    model = load_personal_model(AgentState(state_dir))
    mine = AgentState(state_dir).personal()[0]
    assert all(np.array_equal(model.params[n].value, v) for n, v in mine.items())
    # reported: the next check-in has nothing for it (a retry, waited as told)
    sleeps: list = []
    again = make_agent(server.url, state_dir, local_data((5, 7)), sleeps, rounds=1)
    again.ensure_enrolled()
    again.one_round()
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 2 + 1


def test_an_evaluate_task_measures_without_adopting(coordinator, tmp_path):
    server = coordinator()
    version = train_one_round(server, tmp_path)
    state_dir = tmp_path / "device"
    first = make_agent(server.url, state_dir, local_data((1, 8)), once=True)
    assert first.run()[0]["kind"] == "personalize"
    server.app.state.services.fedmetrics.request_evaluation([0])  # e.g. a candidate the operator wants measured
    [record] = make_agent(server.url, state_dir, local_data((1, 8)), once=True).run()
    assert record["kind"] == "evaluate" and record["version"] == 0
    state = AgentState(state_dir)
    assert state.cached_model()[0] == version and state.personal()[1]["base_version"] == version  # nothing adopted
    assert server.http.get("/v1/federated-metrics").json()["0"]["devices"] == 1


def test_without_personalize_tasks_the_agent_refreshes_with_a_conditional_get(coordinator, tmp_path):
    server = coordinator(personalize_tasks=False)
    version = train_one_round(server, tmp_path)
    seen: list[tuple[str, int]] = []

    def record(response: httpx.Response) -> None:
        seen.append((response.request.url.path, response.status_code))

    agent = make_agent(server.url, tmp_path / "d", local_data((2, 3)), rounds=1, refresh_interval=60)
    agent.client._http.event_hooks["response"] = [record]
    agent.refresh.clock = iter([1e9, 2e9, 3e9, 4e9, 5e9]).__next__  # every look is due
    agent.ensure_enrolled()
    agent.one_round()  # paused: a retry answer, so the agent looks for a new base itself
    assert agent.personal.base_version() == version
    agent.one_round()  # nothing new: a bodiless 304
    latest = [status for path, status in seen if path == "/v1/models/latest"]
    assert latest == [200, 304], seen
    assert server.http.get("/v1/federated-metrics").json() == {}  # nobody asked: nothing reported


class Throttled:
    """An ASGI front for the real coordinator: the first check-ins get 429 and 503 with Retry-After."""

    def __init__(self, app, refusals: list[tuple[int, str]]):
        self.app, self.refusals = app, list(refusals)
        self.state = app.state  # ServerThread's users reach the services through it

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/checkin" and self.refusals:
            status, retry_after = self.refusals.pop(0)
            body = json.dumps({"detail": "slow down"}).encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", retry_after.encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def test_429_and_503_with_retry_after_are_waited_out_in_full_and_never_end_the_agent(tmp_path):
    settings = Settings(
        db=str(tmp_path / "coord.db"),
        goal=1,
        min_devices=1,
        over_select=1.0,
        deadline=300,
        enrollment_key=KEY,
        tick_interval=0.05,
    )
    # 2 tries per request: the first two refusals exhaust one check-in's retries (the agent then waits
    # as the server last asked and checks in again), the third is retried within the next check-in.
    refusals = [(429, "45"), (503, "700"), (429, "3")]
    app = Throttled(create_app(settings), refusals)
    with ServerThread(app) as server:
        sleeps: list[float] = []
        client = CoordinatorClient(server.url, retry=RetryPolicy(attempts=2), sleep=sleeps.append, seed=3)
        cfg = AgentConfig(coordinator=server.url, enrollment_key=KEY, rounds=1)
        data = local_data((0, 1))
        agent = Agent(cfg, client, AgentState(tmp_path / "s"), data, AlwaysEligible(), sleep=sleeps.append)
        [record] = agent.run()  # a 429 is not fatal: the round is done
    assert record["kind"] == "train" and not app.refusals
    waits = sleeps[:3]
    assert 45 <= waits[0] <= 45 + 4.5  # retried after the 429's Retry-After, plus at most 10% jitter
    assert 700 <= waits[1] <= 700 + 70  # the 503's 700 s honoured in full: no cap of ours below it
    assert 3 <= waits[2] <= 3 + 1


def test_pf_agent_keeps_running_through_a_429_on_check_in(tmp_path):
    """The CLI end to end: `pf-agent run --once` against a real server whose first check-in answers 429."""
    settings = Settings(
        db=str(tmp_path / "coord.db"),
        goal=1,
        min_devices=1,
        over_select=1.0,
        deadline=300,
        enrollment_key=KEY,
        tick_interval=0.05,
    )
    app = Throttled(create_app(settings), [(429, "1")])
    x, y = local_data((0, 1), n=40).get_batch(np.arange(40))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    with ServerThread(app) as server:
        args = [sys.executable, "-m", "device_agent", "run", "--coordinator", server.url, "--data"]
        args += [str(tmp_path / "data.npz"), "--state-dir", str(tmp_path / "s"), "--enrollment-key", KEY]
        args += ["--once", "--ignore-conditions", "--json", "--retries", "1"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["kind"] == "train"
    assert "429" in done.stderr and not app.refusals
