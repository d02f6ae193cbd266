"""Secure aggregation end to end, in process: exact mask cancellation, FedAvg equivalence, dropouts at
every phase, abandonment, DP noise, and persistence of both sides mid-round (protocol/secagg)."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_helpers import entropy, lenet_deltas, quantized_sum, run_phase, start

from protocol.secagg import (
    ClientSession,
    RoundAbandoned,
    SecAggConfig,
    SecAggError,
    ServerSession,
    crypto,
    run_round,
)
from protocol.secagg.quantize import from_field
from protocol.secagg.wire import unpack_frame

SAMPLES = [600, 30, 1500, 250, 999, 1000, 7, 420]  # some above max_weight 1000: capped


def inputs_for(n: int, size: int | None = None) -> dict[int, tuple[np.ndarray, int]]:
    deltas = lenet_deltas(60)  # one set of real deltas for every test (computed once)
    return {i: (deltas[i - 1][:size], SAMPLES[(i - 1) % len(SAMPLES)]) for i in range(1, n + 1)}


def fedavg(inputs, survivors, max_weight=1000) -> tuple[np.ndarray, int]:
    weights = np.array([min(inputs[i][1], max_weight) for i in survivors], np.float64)
    stacked = np.stack([inputs[i][0].astype(np.float64) for i in survivors])
    return (weights[:, None] * stacked).sum(0) / weights.sum(), int(weights.sum())


def test_masks_cancel_exactly():
    config = SecAggConfig.create(1, 8, 5000, rounding="deterministic")
    inputs = inputs_for(8, 5000)
    server, clients = start(config)
    out = run_phase(server, clients, None, "advertise")
    out = run_phase(server, clients, out, "share_keys")
    frames = {i: clients[i].masked_input(out[i], *inputs[i]) for i in clients}
    vectors = {i: np.frombuffer(unpack_frame(f, "masked_input")[1], "<u4") for i, f in frames.items()}
    masked_sum = sum(vectors.values(), np.zeros(5001, np.uint32))
    self_masks = sum((crypto.prg(c._seed, 5001) for c in clients.values()), np.zeros(5001, np.uint32))
    expected = quantized_sum(config, inputs, clients)
    assert np.array_equal(masked_sum - self_masks, expected)  # every pairwise mask cancelled, bit for bit
    assert not np.array_equal(masked_sum, expected)
    assert from_field(expected)[0] == sum(min(inputs[i][1], 1000) for i in clients)


@pytest.mark.parametrize("n", [5, 20, 60])
def test_round_gives_the_weighted_fedavg_mean(n):
    config = SecAggConfig.create(2, n, 61706)
    inputs = inputs_for(n)
    result, trace = run_round(config, inputs, entropy=entropy(n), seed=n)
    assert result.survivors == tuple(range(1, n + 1))
    mean, total_weight = fedavg(inputs, result.survivors)
    assert result.total_weight == total_weight  # sample counts are capped, then summed exactly
    error = np.max(np.abs(result.mean - mean))
    assert error <= config.quantizer.mean_error_bound(n, total_weight)
    assert error > 0  # quantization is real (stochastic rounding)
    assert np.max(np.abs(mean)) > 100 * config.quantizer.mean_error_bound(n, total_weight)  # the bound is tight


DROPS = {  # phase -> devices vanishing after it (20 devices, 6 may drop)
    "before advertising": {"setup": {3, 9, 10, 11, 17, 20}},
    "after advertising": {"advertise": {1, 2, 3, 4, 5, 6}},
    "after sharing keys": {"share_keys": {2, 4, 6, 8, 10, 12}},
    "after masked input": {"masked_input": {15, 16, 17, 18, 19, 20}},
    "at every phase": {"setup": {1}, "advertise": {2, 3}, "share_keys": {4, 5}, "masked_input": {6}},
}


@pytest.mark.parametrize("case", sorted(DROPS))
def test_dropouts_up_to_the_tolerance_leave_the_exact_survivors_sum(case):
    config = SecAggConfig.create(3, 20, 4000, rounding="deterministic")
    inputs = inputs_for(20, 4000)
    drops = DROPS[case]
    result, _ = run_round(config, inputs, drop_after=drops, entropy=entropy(3))
    assert not isinstance(result, RoundAbandoned), result
    never_masked = set().union(*(v for k, v in drops.items() if k != "masked_input"))
    assert set(result.survivors) == set(range(1, 21)) - never_masked  # a device that masked is in the sum
    exact = quantized_sum(config, inputs, result.survivors)
    total_weight, weighted_sum = config.quantizer.decode(exact)
    assert result.total_weight == total_weight
    assert np.array_equal(result.weighted_sum, weighted_sum)  # exact: the same integers, decoded alike
    mean, _ = fedavg(inputs, result.survivors)
    assert np.max(np.abs(result.mean - mean)) <= config.quantizer.mean_error_bound(len(result.survivors), total_weight)


@pytest.mark.parametrize("phase", ["setup", "advertise", "share_keys", "masked_input"])
def test_one_dropout_too_many_abandons_the_round_with_a_reason(phase):
    config = SecAggConfig.create(4, 20, 500)
    result, _ = run_round(config, inputs_for(20, 500), drop_after={phase: set(range(1, 8))})
    assert isinstance(result, RoundAbandoned)
    after = {"setup": "advertise", "advertise": "share_keys", "share_keys": "masked_input", "masked_input": "unmask"}
    assert result.reason == (
        f"only 13 of 20 devices remain after the {after[phase]} phase; the round needs at least 14 "
        "(dropout tolerance 0.333)"
    )


def test_abandonment_reaches_the_devices_and_stops_them():
    config = SecAggConfig.create(5, 6, 300)
    server, clients = start(config)
    for i in (1, 2, 3, 4):  # 2 of 6 silent, tolerance floor(6/3) = 2: fine
        server.receive_advertise(clients[i].advertise())
    outgoing = server.close_advertise()
    server.receive_shares(clients[1].share_keys(outgoing[1]))
    with pytest.raises(RoundAbandoned, match="only 1 of 6 devices remain after the share_keys phase"):
        server.close_share_keys()
    message = server.outgoing(1)
    assert message == server.abandoned_message() and message["type"] == "abandoned"
    assert clients[2].abandon(message).startswith("only 1 of 6")
    with pytest.raises(SecAggError, match="the round was abandoned"):
        clients[2].share_keys(outgoing[2])
    with pytest.raises(SecAggError, match="abandoned"):
        server.receive_shares(clients[3].share_keys(outgoing[3]))


def test_a_device_left_with_too_few_live_neighbours_abandons_the_round():
    config = SecAggConfig.create(6, 30, 200, neighbours=6, threshold=4)
    near = config.graph[1][:3]  # three of device 1's six neighbours go silent
    server, clients = start(config)
    live = {i: c for i, c in clients.items() if i not in near}
    with pytest.raises(RoundAbandoned, match="device 1 has 3 live neighbours after the advertise phase; threshold 4"):
        run_phase(server, live, None, "advertise")


def test_a_split_survivor_graph_is_never_unmasked():
    config = SecAggConfig.create(7, 10, 200, neighbours=4, threshold=3)
    halves = [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)]  # two cliques: every device has 4 neighbours, no path between
    config.__dict__["graph"] = {i: tuple(j for j in h if j != i) for h in halves for i in h}  # devices agree
    server = ServerSession(config)
    clients = {i: ClientSession(config, i, entropy=entropy(i)) for i in range(1, 11)}
    out = run_phase(server, clients, None, "advertise")
    out = run_phase(server, clients, out, "share_keys")
    with pytest.raises(RoundAbandoned, match=r"split into 2 parts \(sizes \[5, 5\]\): unmasking would reveal"):
        run_phase(server, clients, out, "masked_input", inputs_for(10, 200))
    assert server.phase == "abandoned"


def test_distributed_skellam_noise_gives_the_central_noise():
    n, d, clip = 20, 20_000, 0.05
    config = SecAggConfig.create(8, n, d, clip_norm=clip, noise_multiplier=1.0, max_weight=1, rounding="deterministic")
    inputs = {i: (x, 1) for i, (x, _) in inputs_for(n, d).items()}
    result, _ = run_round(config, inputs, seed=8)
    clipped = [x * min(1.0, clip / np.linalg.norm(x.astype(np.float64))) for x, _ in inputs.values()]
    noise = result.weighted_sum - np.sum(clipped, axis=0)
    assert result.total_weight == n
    assert result.noise_std == pytest.approx(config.central_noise_std(n))
    # z * Delta2 / S over min_survivors devices' shares; all n survived, so a little more
    expected = (clip + np.sqrt(d) / config.quantizer.scale) * np.sqrt(n / config.min_survivors)
    assert result.noise_std == pytest.approx(expected, rel=1e-9)
    assert abs(np.std(noise) / result.noise_std - 1) < 0.03  # d = 20,000 samples of the noise
    assert abs(np.mean(noise)) < 4 * result.noise_std / np.sqrt(d)


def test_sessions_survive_being_saved_and_restored_between_every_phase():
    config = SecAggConfig.create(9, 12, 3000, rounding="deterministic")
    inputs = inputs_for(12, 3000)
    drops = {"advertise": {1}, "share_keys": {2}, "masked_input": {3}}
    result, _ = run_round(config, inputs, drop_after=drops, persist=True, entropy=entropy(9))
    assert result.survivors == tuple(i for i in range(1, 13) if i not in (1, 2))
    assert np.array_equal(
        config.quantizer.decode(quantized_sum(config, inputs, result.survivors))[1], result.weighted_sum
    )


def test_state_bytes_round_trip_mid_protocol_and_refuse_garbage():
    config = SecAggConfig.create(10, 6, 100)
    server, clients = start(config)
    keys = run_phase(server, clients, None, "advertise")
    forwarded = run_phase(server, clients, keys, "share_keys")
    saved = server.to_bytes()
    restored = ServerSession.from_bytes(saved)
    assert restored.to_bytes() == saved and restored.outgoing(3) == forwarded[3]
    client_saved = clients[3].to_bytes()
    again = ClientSession.from_bytes(client_saved)
    assert again.to_bytes() == client_saved
    assert again.share_keys(keys[3]) == clients[3].share_keys(keys[3])  # the retry gets the same ciphertexts
    with pytest.raises(SecAggError, match="expected a 'secagg-server-state' frame"):
        ServerSession.from_bytes(client_saved)
    with pytest.raises(SecAggError, match="exceeds the data"):
        ServerSession.from_bytes(saved[:40])
    with pytest.raises(SecAggError, match="masked sum of"):
        ServerSession.from_bytes(saved[:-4])
