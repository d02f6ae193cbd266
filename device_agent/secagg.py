"""The device's side of a secure-aggregation round over HTTP: it drives protocol/secagg's ClientSession.

After training, the device joins the round's cohort and polls GET /v1/rounds/{id}/secagg; it answers
each phase's message once: its public keys, then its encrypted Shamir shares, then the masked vector
([w, q(w/W * delta)] plus its share of the DP noise, its self mask and its pairwise masks, w its
sample count capped at W), then the shares the server needs to unmask the cohort's sum. The delta
itself never leaves the device, and the session answers a repeated server message with the same
bytes, so a retry after a lost response is harmless.

`cryptography` (the `secagg` extra) is imported only when a round asks for secure aggregation; the
agent runs on numpy + httpx otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.client import CoordinatorClient, RejectedError

log = logging.getLogger("pocketfed.agent")

PROTOCOL_PHASES = ("advertise", "share_keys", "masked_input", "unmask")
LONG_POLL = 10.0  # seconds the server may hold a status request until there is news
KIND = {"advertise": "advertise", "share_keys": "shares", "masked_input": "masked_input", "unmask": "unmask"}


@dataclass
class SecAggOutcome:
    status: str  # done | abandoned | dropped (the server went on without us) | left (leave_after) | failed
    reason: str | None
    index: int | None
    bytes_up: int  # message payloads this device sent (without HTTP framing)
    bytes_down: int  # payloads of the server's answers


def vector_of(delta: Mapping[str, np.ndarray], layout: list) -> np.ndarray:
    """The delta flattened in the server's tensor order; a tensor the device did not train is zero."""
    parts = []
    for name, shape in layout:
        shape = tuple(int(s) for s in shape)
        value = delta.get(name)
        if value is None:
            value = np.zeros(shape)
        elif tuple(np.shape(value)) != shape:
            raise ValueError(f"tensor {name!r}: the round expects shape {shape}, the delta has {np.shape(value)}")
        parts.append(np.asarray(value, np.float64).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


class SecAggParticipant:
    def __init__(
        self,
        client: CoordinatorClient,
        round_id: int,
        deadline: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        leave_after: str | None = None,
    ):
        self.client, self.round_id, self.deadline = client, round_id, deadline
        self.sleep, self.clock, self.leave_after = sleep, clock, leave_after
        self.bytes_up = self.bytes_down = 0
        self.sent: list[bytes] = []  # every payload sent, for tests that look for the delta in them

    def run(self, delta: Mapping[str, np.ndarray], sample_count: int) -> SecAggOutcome:
        """Take part until the sum is unmasked, the round is abandoned or the server goes on without us."""
        from protocol.secagg import ClientSession, SecAggError
        from protocol.secagg.crypto import KeyPair
        from protocol.secagg.wire import b64

        session: ClientSession | None = None
        answered: set[str] = set()
        # the round's keys go with the join: the server skips the advertise phase when all members' came so
        keys = (KeyPair.generate(), KeyPair.generate())
        advertised = {"mask_key": b64(keys[0].public), "share_key": b64(keys[1].public)}
        self.bytes_up += len(json.dumps(advertised, separators=(",", ":")))
        status = self._got(self.client.secagg_join(self.round_id, LONG_POLL, keys=advertised))
        try:
            while True:
                phase, index = status["phase"], status.get("index")
                if phase == "done":
                    return self._outcome("done", None, index)
                if phase == "abandoned":
                    if session is not None and status.get("message"):
                        session.abandon(status["message"])
                    return self._outcome("abandoned", status.get("reason"), index)
                if self.clock() > self.deadline:
                    return self._outcome("abandoned", "the round's deadline passed", index)
                if session is None and status.get("config") is not None:
                    session = ClientSession(status["config"], index, keys=keys)
                    session.advertise()  # what the join sent (a server that ignored it gets it again below)
                    vector = vector_of(delta, status["layout"])
                    if phase != "advertise" or not status.get("waiting"):  # the server took the join's keys
                        answered.add("advertise")
                        if self.leave_after == "advertise":
                            return self._outcome("left", "left after advertise (as asked)", index)
                if phase in PROTOCOL_PHASES and session is not None:
                    if not status.get("expected") and phase not in answered:
                        return self._outcome("dropped", f"the server closed phase {phase} without this device", index)
                    if status.get("waiting") and phase not in answered:
                        message = status.get("message")
                        if phase == "advertise":
                            out: Any = session.advertise()
                        elif phase == "share_keys":
                            out = session.share_keys(message)
                        elif phase == "masked_input":
                            out = session.masked_input(message, vector, sample_count)
                        else:
                            out = session.unmask(message)
                        wait = 0 if self.leave_after == phase else LONG_POLL
                        answer = self._send(phase, out, wait)
                        answered.add(phase)
                        if self.leave_after == phase:
                            return self._outcome("left", f"left after {phase} (as asked)", index)
                        # the answer carries the long poll's status (an older server does not: ask)
                        status = answer.get("status") or self._got(
                            self.client.secagg_status(self.round_id, phase, LONG_POLL)
                        )
                        continue
                previous = status
                status = self._got(self.client.secagg_status(self.round_id, phase, LONG_POLL))
                if status == previous:  # no news after the long poll: do not spin
                    self.sleep(float(status.get("retry_after") or 0.25))
        except RejectedError as exc:
            return self._outcome("dropped", f"{exc.status}: {exc.detail}", status.get("index"))
        except SecAggError as exc:  # the server's message breaks the protocol: refuse and stop
            log.warning("round %d: secure aggregation refused a server message: %s", self.round_id, exc)
            return self._outcome("failed", str(exc), status.get("index"))

    def _send(self, phase: str, message: dict[str, Any] | bytes, wait: float) -> dict[str, Any]:
        raw = message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode()
        self.bytes_up += len(raw)
        self.sent.append(raw)
        return self._got(self.client.secagg_send(self.round_id, KIND[phase], message, wait))

    def _got(self, answer: dict[str, Any]) -> dict[str, Any]:
        self.bytes_down += len(json.dumps(answer, separators=(",", ":")))
        return answer

    def _outcome(self, status: str, reason: str | None, index: int | None) -> SecAggOutcome:
        if status != "done":
            log.info("round %d: secure aggregation %s: %s", self.round_id, status, reason)
        return SecAggOutcome(status, reason, index, self.bytes_up, self.bytes_down)


def secure_round(agent: Any, task: Any, delta: Mapping[str, np.ndarray], metrics: dict[str, float]) -> dict[str, Any]:
    """The agent's task for a secure-aggregation round, after training: the round is marked done here
    first (one contribution per round, whatever happens), then the phases run (or are handed off)."""
    agent.state.set_last_round(task.round_id)
    samples = agent.train_set.size()
    record = {
        "round": task.round_id,
        "version": task.base_version,
        "samples": samples,
        **{k: metrics[k] for k in ("loss_before", "loss_after", "acc_before", "acc_after")},
        "bytes_raw_float32": 4 * sum(np.size(d) for d in delta.values()),
        "encoding": "secagg",
        "topk_fraction": None,
    }
    hand_off = agent.secagg_hand_off
    client = agent.client
    if hand_off is not None:  # the agent's client moves on to other work (another simulated device's token)
        client = CoordinatorClient(agent.config.coordinator, token=agent.client.token, retry=agent.client.retry)
    participant = SecAggParticipant(
        client,
        task.round_id,
        task.deadline,
        sleep=time.sleep if hand_off else agent.sleep,
        leave_after=agent.config.secagg_leave_after,
    )
    if hand_off is not None:

        def run() -> SecAggOutcome:
            try:
                return participant.run(delta, samples)
            finally:
                client.close()

        hand_off(run)
        record.update(secure_aggregation="handed off", bytes_sent=0)
        return record
    outcome = participant.run(delta, samples)
    record.update(secure_aggregation=outcome.status, bytes_sent=outcome.bytes_up, secagg_reason=outcome.reason)
    return record
