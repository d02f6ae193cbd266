"""The fault proxy in front of a real coordinator on loopback: it relays, refuses, delays, cuts
mid-body in both directions, counts what it did, and records the uploads it relayed whole."""

from __future__ import annotations

import json
from collections import deque

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes
from protocol.update import encode_update
from simulation.faultproxy import FaultProxy, Faults
from simulation.httpwire import HttpStream

KEY = "proxy-key"
SHAPES = {"w": (64, 32), "b": (32,)}


@pytest.fixture
def server(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=0, shapes=SHAPES))
    settings = Settings(db=str(tmp_path / "c.db"), model=str(model), enrollment_key=KEY, goal=3, deadline=3600)
    with ServerThread(create_app(settings)) as running:
        yield running


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def body(round_id: int = 1, seed: int = 0) -> bytes:
    return encode_update(random_delta(SHAPES, seed), sample_count=7, round_id=round_id, base_version=0)


def received(server, round_id: int = 1) -> int:
    return httpx.get(f"{server.url}/v1/rounds/{round_id}").json()["received"]


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "wire" / "uploads.jsonl").read_text().splitlines()]


def test_parser_finds_the_same_boundaries_whatever_the_chunking():
    stream = (
        b"POST /v1/rounds/3/updates HTTP/1.1\r\nContent-Length: 5\r\nIdempotency-Key: k\r\n\r\nhello"
        b"GET /v1/models/1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    whole = [
        (e.kind, e.message.start, e.message.head_end, e.message.end)
        for e in HttpStream("request", deque()).feed(stream)
    ]
    parser, split = HttpStream("request", deque()), []
    for i in range(len(stream)):
        split += [(e.kind, e.message.start, e.message.head_end, e.message.end) for e in parser.feed(stream[i : i + 1])]
    first_head = stream.index(b"\r\n\r\n") + 4
    second = first_head + 5
    assert (
        whole
        == split
        == [
            ("head", 0, first_head, second),
            ("end", 0, first_head, second),
            ("head", second, len(stream), len(stream)),
            ("end", second, len(stream), len(stream)),
        ]
    )
    requests = deque()
    HttpStream("request", requests).feed(stream)
    assert requests[0].upload_round == 3 and bytes(requests[0].body) == b"hello"
    assert requests[1].upload_round is None


def test_chunked_bodies_make_the_parser_step_aside():
    parser = HttpStream("response", deque())
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert parser.opaque


def test_relays_and_records_an_upload_without_faults(server, tmp_path):
    with (
        FaultProxy(port_of(server.url), record_dir=tmp_path / "wire") as proxy,
        httpx.Client(base_url=proxy.url, timeout=10) as client,
    ):
        device = TestDevice(client, KEY)
        device.task()
        answer = device.upload(1, body(), key="k1")
        assert answer.status_code == 202 and answer.json()["received"] == 1
        assert device.upload(1, body(), key="k1").json() == answer.json()  # a replay, answered again
    assert received(server) == 1
    assert proxy.counters["uploads_forwarded"] == 2 and proxy.counters["uploads_acknowledged"] == 2
    assert proxy.counters["connections"] == 1 and proxy.counters["requests"] == proxy.counters["responses"] == 4
    forwarded, answered = (
        [e for e in events(tmp_path) if e["event"] == "forwarded"],
        [e for e in events(tmp_path) if e["event"] == "answered"],
    )
    assert [(e["key"], e["round_id"], e["size"]) for e in forwarded] == [("k1", 1, len(body()))] * 2
    assert [(e["status"], e["delivered"]) for e in answered] == [(202, True)] * 2
    saved = (tmp_path / "wire" / "bodies" / f"{forwarded[0]['sha256']}.bin").read_bytes()
    assert saved == body()


def test_refuses_connections(server, tmp_path):
    with FaultProxy(port_of(server.url), Faults(refuse=1.0)) as proxy, pytest.raises(httpx.TransportError):
        httpx.get(proxy.url + "/healthz", timeout=5)
    assert proxy.counters["refused"] == 1 and proxy.counters["bytes_up"] == 0


def test_a_request_cut_mid_body_is_never_counted(server, tmp_path):
    with (
        FaultProxy(port_of(server.url), Faults(cut_request=1.0), record_dir=tmp_path / "wire") as proxy,
        httpx.Client(base_url=server.url, timeout=10) as direct,
    ):
        device = TestDevice(direct, KEY)
        device.task()
        with pytest.raises(httpx.TransportError):
            httpx.post(
                f"{proxy.url}/v1/rounds/1/updates",
                content=body(),
                headers={**device.headers, "Idempotency-Key": "cut"},
                timeout=10,
            )
        assert received(server) == 0
        assert device.upload(1, body(), key="cut").json()["received"] == 1  # the device's retry, direct
    assert proxy.counters["cut_requests"] == 1
    assert 0 < proxy.counters["bytes_up"] < len(body())  # some of the body went through, not all
    assert proxy.counters["uploads_forwarded"] == 0 and events(tmp_path) == []


def test_an_answer_cut_mid_body_leaves_the_update_counted_once(server, tmp_path):
    with (
        FaultProxy(port_of(server.url), Faults(cut_ack=1.0), record_dir=tmp_path / "wire") as proxy,
        httpx.Client(base_url=proxy.url, timeout=10) as client,
    ):
        device = TestDevice(client, KEY)
        device.task()
        with pytest.raises(httpx.TransportError):  # counted by the server, the device never heard
            device.upload(1, body(), key="lost-answer")
        assert received(server) == 1
        assert proxy.counters["cut_responses"] == 1 and proxy.counters["uploads_acknowledged"] == 1
        [answered] = [e for e in events(tmp_path) if e["event"] == "answered"]
        assert (answered["status"], answered["delivered"]) == (202, False)
        proxy.faults = Faults()
        again = device.upload(1, body(), key="lost-answer")
    assert again.json() == {"accepted": True, "round_id": 1, "received": 1, "goal": 3}
    assert received(server) == 1


def test_delays_and_stays_correct(server):
    with (
        FaultProxy(port_of(server.url), Faults(seed=1, delay=1.0, max_delay=0.02)) as proxy,
        httpx.Client(base_url=proxy.url, timeout=10) as client,
    ):
        device = TestDevice(client, KEY)
        model = client.get("/v1/models/0", headers=device.headers)
    assert model.status_code == 200 and len(model.content) > 64 * 32 * 4
    assert proxy.counters["delayed"] == 4  # 2 requests + 2 responses


def test_faults_are_a_function_of_the_seed(server):
    def outcomes(seed: int) -> list[bool]:
        with FaultProxy(port_of(server.url), Faults(seed=seed, refuse=0.5)) as proxy:
            result = []
            for _ in range(16):
                try:
                    result.append(httpx.get(proxy.url + "/healthz", timeout=5).status_code == 200)
                except httpx.TransportError:
                    result.append(False)
            return result

    first = outcomes(7)
    assert first == outcomes(7) and 0 < sum(first) < 16
    assert first != outcomes(8)


def test_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="cut_request"):
        Faults(cut_request=1.5)
    assert np.isclose(Faults().max_delay, 0.3)
