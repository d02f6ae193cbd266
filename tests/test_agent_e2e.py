"""End to end: a real coordinator (uvicorn on loopback) and three agent processes on label-skewed
shards of the embedded data. Rounds commit, the global model gets better, and each device
reports its personal model's accuracy beside the global one's."""

from __future__ import annotations

import json

import pytest
from test_agent_harness import Coordinator, device_token, finish, make_shards, start_agent

from engine.data import load_default
from engine.trainer import evaluate_model_bytes

N_DEVICES, ROUNDS = 3, 3


@pytest.mark.slow
def test_three_agents_federate_and_personalize(tmp_path):
    shards, _ = make_shards(tmp_path, N_DEVICES, 300, partition="dirichlet:0.3", seed=1)
    with Coordinator(tmp_path, goal=N_DEVICES, epochs=2, encoding="float16") as coordinator:
        agents = [
            start_agent(coordinator.url, shard, tmp_path / f"state-{i}", "--rounds", str(ROUNDS), "--seed", str(i))
            for i, shard in enumerate(shards)
        ]
        outputs = [finish(agent, timeout=400)[0] for agent in agents]
        rounds = coordinator.get("/v1/rounds").json()
        token = device_token(tmp_path / "state-0")
        latest = coordinator.get("/v1/models/latest", token).json()
        first_model = coordinator.get("/v1/models/0", token).content
        last_model = coordinator.get(f"/v1/models/{latest['version']}", token).content

    committed = [r for r in rounds if r["status"] == "committed"]
    assert len(committed) >= ROUNDS, rounds
    assert latest["version"] >= ROUNDS

    records = [[json.loads(line) for line in out.strip().splitlines()] for out in outputs]
    for device, recs in enumerate(records):
        assert [r["round"] for r in recs] == sorted(r["id"] for r in committed)[:ROUNDS]
        for r in recs:
            assert r["bytes_sent"] < 0.6 * r["bytes_raw_float32"]  # float16 halves it (plus a header)
            assert 0 <= r["personal_acc"] <= 1 and 0 <= r["global_acc"] <= 1
        print(
            f"device {device}: "
            + ", ".join(
                f"round {r['round']}: global {r['global_acc']:.3f} personal {r['personal_acc']:.3f}" for r in recs
            )
        )

    test = load_default("test")
    before = evaluate_model_bytes(first_model, test)["accuracy"]
    after = evaluate_model_bytes(last_model, test)["accuracy"]
    print(f"global test accuracy: v0 {before:.3f} -> v{latest['version']} {after:.3f}")
    assert after > before + 0.15
    # On label-skewed shards a personal head should beat the global model on the device's own data.
    final = [recs[-1] for recs in records]
    mean_personal = sum(r["personal_acc"] for r in final) / len(final)
    mean_global = sum(r["global_acc"] for r in final) / len(final)
    print(f"last round, mean over devices: personal {mean_personal:.3f} vs global {mean_global:.3f}")
    assert mean_personal > mean_global
