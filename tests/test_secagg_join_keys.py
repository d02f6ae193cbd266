"""Keys advertised with the cohort join (coordinator/service/secagg_keys.py): when every member's keys
came with its join, the advertise phase closes as the cohort is fixed and the join already answers
with the neighbours' keys; a member that joined without keys advertises as before; bad keys are
refused at the join."""

from __future__ import annotations

import httpx
from test_secagg_http import enrolled, start

from coordinator.testing import ServerThread
from protocol.secagg.crypto import KeyPair
from protocol.secagg.wire import b64


def keys_of(pair: tuple[KeyPair, KeyPair]) -> dict[str, str]:
    return {"mask_key": b64(pair[0].public), "share_key": b64(pair[1].public)}


def test_keys_with_every_join_skip_the_advertise_phase(tmp_path):
    with ServerThread(start(tmp_path, goal=4)) as srv:
        clients = enrolled(srv.url, 4)
        round_id = [c.checkin(10).task for c in clients][0].round_id
        pairs = [(KeyPair.generate(), KeyPair.generate()) for _ in clients]
        with httpx.Client(base_url=srv.url) as http:
            h = [{"Authorization": f"Bearer {c.token}"} for c in clients]
            url = f"/v1/rounds/{round_id}/secagg/join"
            same = {"mask_key": b64(pairs[0][0].public), "share_key": b64(pairs[0][0].public)}
            assert http.post(url, json=same, headers=h[0]).status_code == 422  # the two keys must differ
            short = {"mask_key": "AAAA", "share_key": b64(pairs[0][1].public)}
            assert http.post(url, json=short, headers=h[0]).status_code == 422
            assert http.post(url, json={"other": 1}, headers=h[0]).status_code == 422
            for i in range(3):
                assert http.post(url, json=keys_of(pairs[i]), headers=h[i]).json()["phase"] == "joining"
            last = http.post(url, json=keys_of(pairs[3]), headers=h[3]).json()
    assert last["phase"] == "share_keys" and last["waiting"] is True  # the advertise phase is already over
    message = last["message"]
    assert message["type"] == "neighbour_keys" and message["index"] == last["index"] == 4
    sent = {i + 1: keys_of(pairs[i]) for i in range(4)}
    got = {e["index"]: {"mask_key": e["mask_key"], "share_key": e["share_key"]} for e in message["neighbours"]}
    assert got and 4 not in got and all(got[j] == sent[j] for j in got)  # the keys each neighbour joined with


def test_a_member_without_keys_advertises_by_itself(tmp_path):
    with ServerThread(start(tmp_path, goal=4)) as srv:
        clients = enrolled(srv.url, 4)
        round_id = [c.checkin(10).task for c in clients][0].round_id
        pairs = [(KeyPair.generate(), KeyPair.generate()) for _ in clients]
        for i in range(3):
            clients[i].secagg_join(round_id, keys=keys_of(pairs[i]))
        status = clients[3].secagg_join(round_id)  # an older agent: no keys; it fixes the cohort
        assert status["phase"] == "advertise" and status["waiting"] is True and status["index"] == 4
        others = [clients[i].secagg_status(round_id) for i in range(3)]
        assert all(s["phase"] == "advertise" and s["waiting"] is False for s in others)  # their keys are in
        advert = {"type": "advertise", "round_id": round_id, "index": 4, **keys_of(pairs[3])}
        answer = clients[3].secagg_send(round_id, "advertise", advert, wait=10)
        assert answer["accepted"] is True and answer["status"]["phase"] == "share_keys"
        for c in clients:
            c.close()
