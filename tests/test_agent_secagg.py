"""Four real `pf-agent` processes take part in a secure-aggregation round against a real coordinator
process: each trains, joins, runs the four phases in the foreground and reports the round done; the
round commits with all four and the coordinator never held an individual update."""

from __future__ import annotations

import json

from test_agent_harness import Coordinator, device_token, finish, make_shards, start_agent


def test_four_agents_finish_a_secure_round(tmp_path):
    shards, _ = make_shards(tmp_path, 4, 120, partition="iid", seed=2)
    with Coordinator(tmp_path, goal=4, secure_aggregation="true", secagg_phase_timeout=30) as coordinator:
        agents = [
            start_agent(coordinator.url, shard, tmp_path / f"state-{i}", "--rounds", "1", "--seed", str(i))
            for i, shard in enumerate(shards)
        ]
        records = [json.loads(finish(agent, timeout=300)[0].strip().splitlines()[-1]) for agent in agents]
        token = device_token(tmp_path / "state-0")
        detail = coordinator.get("/v1/rounds/1", token).json()
    assert detail["status"] == "committed" and detail["received"] == 4, detail
    assert detail["secure_aggregation"] is True and detail["secagg_phase"] == "done"
    for record in records:
        assert record["round"] == 1 and record["secure_aggregation"] == "done", record
        assert record["bytes_sent"] > record["bytes_raw_float32"]  # the masked vector: 4 bytes a parameter, and keys
