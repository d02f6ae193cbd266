"""Secure aggregation against a hostile server and hostile or repeating devices: both shares of one
device are never revealed, replays are idempotent, conflicting messages and malformed ones are refused
with errors that name the problem (protocol/secagg)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from secagg_helpers import lenet_deltas, quantized_sum, run_phase, start

from protocol.secagg import SecAggConfig, SecAggError
from protocol.secagg.client import masked_frame
from protocol.secagg.crypto import DecryptionError
from protocol.secagg.wire import b64, unb64

D = 200


def inputs(n: int) -> dict[int, tuple[np.ndarray, int]]:
    return {i: (lenet_deltas(60)[i - 1][:D], 100 + i) for i in range(1, n + 1)}


def masked_round(n: int = 6, **options):
    """A round where every device has sent its masked input; returns (config, server, clients, requests)."""
    config = SecAggConfig.create(21, n, D, **options)
    server, clients = start(config, seed=21)
    out = run_phase(server, clients, None, "advertise")
    out = run_phase(server, clients, out, "share_keys")
    requests = run_phase(server, clients, out, "masked_input", inputs(n))
    return config, server, clients, requests


def request(index: int, survivors: list[int], dropped: list[int]) -> dict:
    return {"type": "unmask_request", "round_id": 21, "index": index, "survivors": survivors, "dropped": dropped}


def test_a_device_never_reveals_both_shares_of_one_neighbour():
    config, _, clients, _ = masked_round()
    assert config.neighbours == 5 and config.threshold == 3
    device = clients[1]
    first = device.unmask(request(1, [2, 3, 4, 5], [6]))
    assert [s["of"] for s in first["seed_shares"]] == [2, 3, 4, 5] and [s["of"] for s in first["key_shares"]] == [6]
    assert device.unmask(request(1, [2, 3, 4, 5], [6])) == first  # a retry: the same answer
    with pytest.raises(SecAggError, match="key share was already revealed"):
        device.unmask(request(1, [2, 3, 6], []))  # now claims 6 survived: its seed share would unmask it
    with pytest.raises(SecAggError, match="seed share was already revealed"):
        device.unmask(request(1, [3, 4, 5], [2]))
    with pytest.raises(SecAggError, match="asks for both shares of device 3"):
        clients[2].unmask(request(2, [1, 3, 4], [3]))
    with pytest.raises(SecAggError, match="only 2 neighbours survived"):
        clients[2].unmask(request(2, [1, 3], [4, 5, 6]))  # too few: would only help isolate device 2
    assert device.unmask(request(1, [2, 3, 4], [6]))["key_shares"] == first["key_shares"]  # a consistent subset


def test_the_honest_server_asks_every_device_the_same_story():
    config = SecAggConfig.create(22, 20, D)
    server, clients = start(config, seed=22)
    out = run_phase(server, clients, None, "advertise")
    out = run_phase(server, clients, out, "share_keys")
    live = {i: c for i, c in clients.items() if i not in (4, 9, 13)}  # these vanish before masking
    requests = run_phase(server, live, out, "masked_input", inputs(20))
    said_survived = {j for r in requests.values() for j in r["survivors"]}
    said_dropped = {j for r in requests.values() for j in r["dropped"]}
    assert said_dropped == {4, 9, 13} and not said_survived & said_dropped


def test_replays_are_idempotent_and_conflicts_refused():
    config = SecAggConfig.create(23, 6, D, rounding="deterministic")
    server, clients = start(config, seed=23)
    advert = clients[1].advertise()
    assert server.receive_advertise(advert) is True and server.receive_advertise(copy.deepcopy(advert)) is False
    assert clients[1].advertise() == advert
    forged = {**advert, "mask_key": b64(bytes(range(32)))}
    with pytest.raises(SecAggError, match="advertise from device 1: a different message was already accepted"):
        server.receive_advertise(forged)
    for i in range(2, 7):
        server.receive_advertise(clients[i].advertise())
    keys = server.close_advertise()
    assert server.receive_advertise(advert) is False  # a late retry of an accepted message: still fine

    shares = {i: clients[i].share_keys(keys[i]) for i in clients}
    assert clients[2].share_keys(keys[2]) == shares[2]  # same ciphertexts, not fresh ones
    for i in clients:
        assert server.receive_shares(shares[i]) is True
    assert server.receive_shares(shares[3]) is False
    forwarded = server.close_share_keys()
    other = {**keys[2], "neighbours": keys[2]["neighbours"][:-1]}
    with pytest.raises(SecAggError, match="already done for a different server message"):
        clients[2].share_keys(other)

    frames = {i: clients[i].masked_input(forwarded[i], *inputs(6)[i]) for i in clients}
    assert clients[4].masked_input(forwarded[4], *inputs(6)[4]) == frames[4]
    for i in clients:
        assert server.receive_masked(frames[i]) is True
    assert server.receive_masked(frames[4]) is False
    altered = masked_frame(23, 4, np.zeros(D + 1, np.uint32))
    with pytest.raises(SecAggError, match="masked_input from device 4: a different vector was already accepted"):
        server.receive_masked(altered)
    requests = server.close_masked_input()

    answers = {i: clients[i].unmask(requests[i]) for i in clients}
    for i in clients:
        assert server.receive_unmask(answers[i]) is True
        assert server.receive_unmask(answers[i]) is False
    result = server.finish()
    assert np.array_equal(server.finish().weighted_sum, result.weighted_sum)  # finishing twice is harmless
    exact = config.quantizer.decode(quantized_sum(config, inputs(6), range(1, 7)))[1]
    assert np.array_equal(result.weighted_sum, exact)  # nothing was counted twice


def _mutated(message: dict, **changes) -> dict:
    return {**copy.deepcopy(message), **changes}


def test_the_server_refuses_malformed_and_out_of_place_messages():
    config = SecAggConfig.create(24, 6, D)
    server, clients = start(config, seed=24)
    advert = clients[1].advertise()
    cases = [
        (_mutated(advert, round_id=99), "round_id 99 is not this round"),
        (_mutated(advert, index=7), "index 7 is outside"),
        (_mutated(advert, type="shares"), "expected a 'advertise' message"),
        (_mutated(advert, mask_key="@@@"), "not valid base64"),
        (_mutated(advert, mask_key=b64(bytes(31))), "31 bytes, expected 32"),
        (_mutated(advert, share_key=advert["mask_key"]), "the mask and share keys must differ"),
        ("not an object", "expected a JSON object"),
    ]
    for message, error in cases:
        with pytest.raises(SecAggError, match=error):
            server.receive_advertise(message)
    for i in range(1, 6):  # device 6 never advertises
        server.receive_advertise(clients[i].advertise())
    copied = {**clients[6].advertise(), "mask_key": advert["mask_key"]}
    with pytest.raises(SecAggError, match="advertise from device 6: a public key device 1 already advertised"):
        server.receive_advertise(copied)
    keys = server.close_advertise()
    with pytest.raises(SecAggError, match="phase 'share_keys', not 'advertise'"):
        server.receive_advertise(clients[6].advertise())
    shares = clients[1].share_keys(keys[1])
    with pytest.raises(SecAggError, match="must go to exactly its neighbours"):
        server.receive_shares(_mutated(shares, shares=shares["shares"][:-1]))
    short = [dict(s) for s in shares["shares"]]
    short[0]["ciphertext"] = b64(unb64(short[0]["ciphertext"], "x")[:-1])
    with pytest.raises(SecAggError, match="bytes, expected 102"):
        server.receive_shares(_mutated(shares, shares=short))
    with pytest.raises(SecAggError, match="device 6: it is not among the devices this phase expects"):
        server.receive_shares(_mutated(shares, index=6))
    for i in range(1, 6):
        server.receive_shares(clients[i].share_keys(keys[i]))
    forwarded = server.close_share_keys()
    frame = clients[1].masked_input(forwarded[1], *inputs(6)[1])
    for bad, error in (
        (frame[:-4], "body of"),
        (b"garbage!" + frame[8:], "wrong magic"),
        (masked_frame(24, 1, np.zeros(D, np.uint32)), "round_id/length must be 24/201"),
        (masked_frame(24, 6, np.zeros(D + 1, np.uint32)), "did not complete the share-keys phase"),
    ):
        with pytest.raises(SecAggError, match=error):
            server.receive_masked(bad)


def test_a_device_refuses_malformed_server_messages():
    config = SecAggConfig.create(25, 12, D, neighbours=4, threshold=3)
    server, clients = start(config, seed=25)
    keys = run_phase(server, clients, None, "advertise")
    device = clients[1]
    message = keys[1]
    stranger = next(j for j in range(2, 13) if j not in config.graph[1])
    others = copy.deepcopy(message["neighbours"])
    cases = [
        (_mutated(message, index=2), "addressed to device 2, this is device 1"),
        (_mutated(message, neighbours=others[:2]), "only 2 neighbours advertised keys; the threshold is 3"),
        (_mutated(message, neighbours=[{**others[0], "index": stranger}] + others[1:]), "not one of the expected"),
        (
            _mutated(message, neighbours=[others[0], {**others[1], "mask_key": others[0]["mask_key"]}] + others[2:]),
            "a public key appears twice",
        ),
    ]
    for bad, error in cases:
        with pytest.raises(SecAggError, match=error):
            device.share_keys(bad)
    with pytest.raises(SecAggError, match="not allowed in phase 'advertised'"):
        device.masked_input({"type": "forwarded_shares", "round_id": 25, "index": 1, "shares": []}, *inputs(12)[1])
    forwarded = run_phase(server, clients, keys, "share_keys")[1]
    tampered = copy.deepcopy(forwarded)
    raw = bytearray(unb64(tampered["shares"][0]["ciphertext"], "x"))
    raw[30] ^= 0x40
    tampered["shares"][0]["ciphertext"] = b64(bytes(raw))
    sender = tampered["shares"][0]["from"]
    with pytest.raises(DecryptionError, match=f"share from device {sender} to 1 failed authentication"):
        device.masked_input(tampered, *inputs(12)[1])
    swapped = copy.deepcopy(forwarded)
    swapped["shares"][0]["ciphertext"], swapped["shares"][1]["ciphertext"] = (
        swapped["shares"][1]["ciphertext"],
        swapped["shares"][0]["ciphertext"],
    )
    with pytest.raises(DecryptionError, match="failed authentication"):
        device.masked_input(swapped, *inputs(12)[1])  # a share relabelled as another sender's
    with pytest.raises(SecAggError, match="delta has 10 values, the round expects 200"):
        device.masked_input(forwarded, np.zeros(10), 5)
    frame = device.masked_input(forwarded, *inputs(12)[1])  # the untouched message still works
    assert server.receive_masked(frame) is True
