"""FedDyn on real agents (device_agent/feddyn.py, coordinator/strategies/feddyn.py): the engine's
linear term, the device state g_k staged with an upload and adopted on acknowledgement, and the
device states of a real federation agreeing with the server's h by FedDyn's algebra."""

from __future__ import annotations

import numpy as np
import pytest
from test_agent_harness import Coordinator, device_token, finish, make_shards, start_agent

from device_agent.feddyn import current_g, next_g, trainer_options
from device_agent.state import AgentState
from engine import load_model_bytes
from engine.models import build_lenet
from engine.optimizer import SGD
from engine.serialize.container import load
from engine.trainer import Trainer
from protocol.messages import Task


def task(**changes) -> Task:
    return Task(round_id=1, base_version=0, epochs=1, batch_size=4, lr=0.1, momentum=0.0, deadline=0.0, **changes)


def test_linear_and_prox_terms_step_by_hand():
    """One SGD step on L - <g, w> + alpha/2 ||w - base||^2 = the plain step + lr * g at w = base, and a
    second step also pulls by lr * alpha * (w - base)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 1, 28, 28)).astype(np.float32), np.array([0, 1, 2, 3])
    alpha, lr = 0.5, 0.1
    base = build_lenet(0).state_dict()
    g = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
    dyn = Trainer(build_lenet(0), optimizer=SGD(lr, momentum=0.0), prox_mu=alpha, linear_term=g)
    plain = Trainer(build_lenet(0), optimizer=SGD(lr, momentum=0.0))
    dyn.step(x, y)
    plain.step(x, y)
    w1 = dyn.get_weights()
    for k in base:
        np.testing.assert_allclose(w1[k] - plain.get_weights()[k], lr * g[k], atol=1e-6)
    plain.set_weights(w1)  # from the same point: the gradient of the terms is alpha (w - base) - g
    dyn.step(x, y)
    plain.step(x, y)
    for k in base:
        np.testing.assert_allclose(
            dyn.get_weights()[k] - plain.get_weights()[k], -lr * (alpha * (w1[k] - base[k]) - g[k]), atol=1e-6
        )
    with pytest.raises(ValueError, match="linear_term"):
        plain.set_linear_term(g)


def test_device_state_math_and_options():
    delta = {"w": np.array([1.0, -2.0], np.float32), "b": np.array([0.5], np.float32)}
    stored = {"w": np.array([0.1, 0.2], np.float32), "b": np.zeros(3, np.float32)}  # b: an old shape
    assert current_g(stored, delta)["b"].tolist() == [0.0]
    new = next_g(task(feddyn_alpha=0.1), stored, delta)
    np.testing.assert_allclose(new["w"], [0.1 - 0.1, 0.2 + 0.2])
    np.testing.assert_allclose(new["b"], [-0.05])
    assert next_g(task(fedprox_mu=0.3), stored, delta) is None
    assert trainer_options(task(fedprox_mu=0.3), stored, delta) == {"prox_mu": 0.3}
    options = trainer_options(task(feddyn_alpha=0.2), stored, delta)
    assert options["prox_mu"] == 0.2 and options["linear_term"]["w"].tolist() == pytest.approx([0.1, 0.2])
    wire = task(feddyn_alpha=0.2).to_dict()
    assert Task.from_dict(wire).feddyn_alpha == 0.2 and "feddyn_alpha" not in task().to_dict()


def test_g_is_adopted_only_when_the_upload_is_acknowledged(tmp_path):
    state = AgentState(tmp_path)
    assert state.feddyn() == {}
    g1 = {"w": np.array([1.0, 2.0], np.float32)}
    state.save_pending(1, b"update", None, {}, feddyn=g1)
    assert state.feddyn() == {}  # staged, not yet adopted
    state.finish_pending(acknowledged=True)
    assert state.feddyn()["w"].tolist() == [1.0, 2.0]
    assert load(tmp_path / "feddyn.pft", kind="feddyn").tensors["w"].tolist() == [1.0, 2.0]  # a container, no pickle
    state.save_pending(2, b"update", None, {}, feddyn={"w": np.array([5.0, 5.0], np.float32)})
    state.finish_pending(acknowledged=False)  # refused: the server never counted it, g stays
    assert state.feddyn()["w"].tolist() == [1.0, 2.0]


@pytest.mark.slow
def test_real_agents_keep_g_consistent_with_the_servers_h(tmp_path):
    """Two agents, both in every round (participation 1), equal sample counts, float32 uploads:
    FedDyn's server gives w_r = w_{r-1} + D_r - h_r / alpha with h_r = -alpha (D_1 + ... + D_r), so
    the mean of the devices' g (each -alpha * the sum of its own deltas) is -alpha (D_1 + D_2) where
    D_1 = (w_1 - w_0) / 2 and D_2 = (w_2 - w_1 - D_1) / 2."""
    alpha, rounds = 0.1, 2
    shards, _ = make_shards(tmp_path, 2, 200, partition="shards:2", seed=3)
    options = dict(goal=2, epochs=1, strategy="feddyn", feddyn_alpha=alpha, participation=1.0)
    with Coordinator(tmp_path, influence_bound=False, encoding="float32", **options) as coordinator:
        agents = [
            start_agent(coordinator.url, shard, tmp_path / f"state-{i}", "--rounds", str(rounds), "--seed", str(i))
            for i, shard in enumerate(shards)
        ]
        for agent in agents:
            finish(agent, timeout=300)
        token = device_token(tmp_path / "state-0")
        w = [load_model_bytes(coordinator.get(f"/v1/models/{v}", token).content).state_dict() for v in range(3)]
    gs = [AgentState(tmp_path / f"state-{i}").feddyn() for i in range(2)]
    assert all(gs) and set(gs[0]) == set(w[0])
    for k in w[0]:
        d1 = (w[1][k] - w[0][k]) / 2
        d2 = (w[2][k] - w[1][k] - d1) / 2
        np.testing.assert_allclose((gs[0][k] + gs[1][k]) / 2, -alpha * (d1 + d2), atol=2e-6)
        assert not np.allclose(gs[0][k], gs[1][k])  # each device its own state
