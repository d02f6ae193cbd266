"""The state directory: atomic files, the pending upload, and what survives a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.state import AgentState


def test_identity_is_per_coordinator(tmp_path):
    state = AgentState(tmp_path)
    assert state.identity("http://a") is None
    state.save_identity("http://a", "dev-1", "tok")
    assert AgentState(tmp_path).identity("http://a")["token"] == "tok"
    assert state.identity("http://b") is None  # another coordinator: enroll again
    state.forget_identity()
    assert state.identity("http://a") is None


def test_cached_model_is_verified_against_its_hash(tmp_path):
    state = AgentState(tmp_path)
    assert state.cached_model() is None
    state.save_model(3, '"etag3"', b"model three")
    assert state.cached_model() == (3, '"etag3"', b"model three")
    (tmp_path / "model.pfm").write_bytes(b"model four, half-written")  # a crash between the two writes
    assert state.cached_model() is None


def test_pending_upload_keeps_its_key_until_acknowledged(tmp_path):
    state = AgentState(tmp_path)
    residual = {"w": np.arange(4, dtype=np.float32)}
    key = state.save_pending(5, b"update bytes", residual, {"round": 5})
    # a new process (after a crash) sees the same bytes and the same key
    info, body = AgentState(tmp_path).pending()
    assert (info["idempotency_key"], info["round_id"], body) == (key, 5, b"update bytes")
    assert state.residual() == {}  # the staged residual is not adopted before the ack
    state.finish_pending(acknowledged=True)
    assert state.pending() is None and state.last_round() == 5
    np.testing.assert_array_equal(state.residual()["w"], residual["w"])


def test_refused_upload_discards_the_staged_residual(tmp_path):
    state = AgentState(tmp_path)
    state.save_pending(1, b"x", {"w": np.ones(2, np.float32)}, {})
    state.finish_pending(acknowledged=False)
    assert state.pending() is None and state.residual() == {}
    assert not any(p.name.startswith("pending") for p in tmp_path.iterdir())


def test_corrupt_pending_is_ignored_not_sent(tmp_path):
    state = AgentState(tmp_path)
    state.save_pending(2, b"the real update", None, {})
    (tmp_path / "pending.bin").write_bytes(b"the real upd")  # truncated by a crash
    assert state.pending() is None


def test_no_temp_files_left_behind(tmp_path):
    state = AgentState(tmp_path)
    state.save_identity("http://a", "d", "t")
    state.save_model(1, None, b"m")
    state.save_personal({"fc.weight": np.zeros((2, 2), np.float32)}, {"base_version": 1})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    tensors, meta = state.personal()
    assert meta == {"base_version": 1} and tensors["fc.weight"].shape == (2, 2)


def test_a_kill_while_finishing_an_upload_keeps_the_round_recorded(tmp_path, monkeypatch):
    state = AgentState(tmp_path)
    state.save_pending(7, b"update bytes", None, {"round": 7})
    real_unlink = Path.unlink

    def killed_at_the_pending_file(self, *args, **kwargs):
        if self.name == "pending.json":
            raise KeyboardInterrupt("killed")  # the process dies here
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_at_the_pending_file)
    with pytest.raises(KeyboardInterrupt):
        state.finish_pending(acknowledged=True)
    monkeypatch.undo()
    assert AgentState(tmp_path).last_round() == 7  # after restart the device knows round 7 is done
