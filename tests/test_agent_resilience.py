"""Crashes and outages: kill-and-resume, a coordinator that comes up late, a 4xx not retried."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from test_agent_harness import (
    REPO,
    Coordinator,
    agent_args,
    env,
    finish,
    free_port,
    make_shards,
    recorder,
    start_agent,
    wait_until,
)


def test_killed_after_upload_resends_with_the_same_key_and_counts_once(tmp_path):
    [data], _ = make_shards(tmp_path, 1, 120, partition="iid")
    state = tmp_path / "state"
    with Coordinator(tmp_path, goal=2) as coordinator, recorder(coordinator.port) as proxy:
        proxy.hold_upload_answers = True  # the server counts the update; the device never hears back
        agent = start_agent(proxy.url, data, state, "--once")
        assert proxy.upload_seen.wait(180), "the agent never uploaded"
        wait_until(lambda: coordinator.get("/v1/rounds/1").json()["received"] == 1, 30, "the update to count")
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        pending = json.loads((state / "pending.json").read_text())  # the crash left the upload pending

        proxy.hold_upload_answers = False
        out, _ = finish(start_agent(proxy.url, data, state, "--once"), timeout=120)
        record = json.loads(out.strip().splitlines()[-1])
        assert record["resumed"] is True and record["round"] == 1
        uploads = [r for r in proxy.requests() if r.path.endswith("/updates")]
        assert [u.headers["idempotency-key"] for u in uploads] == [pending["idempotency_key"]] * 2
        assert uploads[0].body == uploads[1].body
        detail = coordinator.get("/v1/rounds/1").json()
        assert detail["received"] == 1  # counted once
        assert not (state / "pending.json").exists()


def test_killed_mid_training_restarts_and_finishes_the_round(tmp_path):
    [data], _ = make_shards(tmp_path, 1, 400, partition="iid")
    state = tmp_path / "state"
    with Coordinator(tmp_path, goal=1, epochs=40) as coordinator:  # seconds of training: the kill lands mid-way
        agent = start_agent(coordinator.url, data, state, "--once")
        wait_until(lambda: (state / "model.pfm").exists(), 120, "the model download")
        time.sleep(0.3)
        agent.send_signal(signal.SIGKILL)  # dies while training
        agent.wait(10)
        assert coordinator.get("/v1/rounds/1").json()["received"] == 0, "killed too late: not mid-training"
        assert not (state / "pending.json").exists()
        out, _ = finish(start_agent(coordinator.url, data, state, "--once"), timeout=180)
        record = json.loads(out.strip().splitlines()[-1])
        wait_until(lambda: coordinator.get("/v1/rounds/1").json()["status"] == "committed", 30, "the commit")
        detail = coordinator.get("/v1/rounds/1").json()
        assert record["round"] == 1 and detail["received"] == 1
        assert not (state / "pending.json").exists()


def test_coordinator_down_at_first_then_up(tmp_path):
    [data], _ = make_shards(tmp_path, 1, 120, partition="iid")
    port = free_port()
    agent = start_agent(f"http://127.0.0.1:{port}", data, tmp_path / "state", "--once", "--retries", "3")
    try:
        time.sleep(3)
        assert agent.poll() is None, "the agent gave up while the coordinator was down"
        with Coordinator(tmp_path, port=port, goal=1):
            out, err = finish(agent, timeout=180)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert "retrying POST /v1/devices" in err or "unavailable" in err
    assert json.loads(out.strip().splitlines()[-1])["round"] == 1


def test_a_4xx_is_reported_and_not_retried(tmp_path):
    [data], _ = make_shards(tmp_path, 1, 60, partition="iid")
    args = agent_args("", data, tmp_path / "state", "--once")
    args[args.index("--enrollment-key") + 1] = "wrong-key"
    with Coordinator(tmp_path, goal=1) as coordinator, recorder(coordinator.port) as proxy:
        args[args.index("--coordinator") + 1] = proxy.url
        done = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "POST /v1/devices refused with 40" in done.stderr
    assert [(r.method, r.path) for r in proxy.requests()] == [("POST", "/v1/devices")]  # exactly one try
