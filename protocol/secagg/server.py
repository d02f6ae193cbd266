"""The coordinator's side of one secure-aggregation round, as a state machine without I/O.

    server = ServerSession(config)
    server.receive_advertise(msg) ...   ; outgoing = server.close_advertise()     # {index: neighbour_keys}
    server.receive_shares(msg) ...      ; outgoing = server.close_share_keys()    # {index: forwarded_shares}
    server.receive_masked(frame) ...    ; outgoing = server.close_masked_input()  # {index: unmask_request}
    server.receive_unmask(msg) ...      ; result = server.finish()                # AggregateResult

The caller decides when a phase ends (everyone answered: `waiting_for()` is empty, or a deadline
passed); whoever has not answered by then has dropped. `receive_*` return True for a new message
and False for an identical retry; anything else raises `SecAggError` naming the problem (wrong
phase, unknown sender, bad sizes, a different second message). `close_*` and `finish` raise
`RoundAbandoned` when the round cannot go on (too few survivors, a device short of shares, a
survivor graph that would expose partial sums); the session then stays abandoned and
`abandoned_message()` tells devices why. `outgoing(index)` re-serves a device's current message.

Only the running sum of masked vectors is kept, never a device's vector. `to_bytes`/`from_bytes`
persist the whole state between phases (no pickle: a frame of JSON and the raw sum).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.secagg import crypto, graph, shamir
from protocol.secagg.client import SHARE_CIPHERTEXT_BYTES, digest
from protocol.secagg.params import SecAggConfig
from protocol.secagg.quantize import FIELD_DTYPE
from protocol.secagg.wire import (
    RoundAbandoned,
    SecAggError,
    b64,
    envelope,
    index_list,
    integer,
    listing,
    obj,
    pack_frame,
    unb64,
    unpack_frame,
)

PHASES = ("advertise", "share_keys", "masked_input", "unmask", "done", "abandoned")
SERVER_STATE = "secagg-server-state"


@dataclass(frozen=True)
class AggregateResult:
    round_id: int
    survivors: tuple[int, ...]  # devices whose input is in the sum
    total_weight: int  # sum of the capped sample counts
    weighted_sum: np.ndarray  # ~ sum(w_i * delta_i), float64, de-quantized
    noise_std: float  # std of the DP noise on weighted_sum (0 without DP)

    @property
    def mean(self) -> np.ndarray:
        """The weighted FedAvg mean of the survivors' deltas."""
        return self.weighted_sum / self.total_weight


class ServerSession:
    def __init__(self, config: SecAggConfig):
        self.config = config
        self.phase = "advertise"
        self.abandon_reason: str | None = None
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # U1: index -> (mask key, share key)
        self.commitments: dict[int, bytes] = {}  # U2: index -> seed commitment
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ciphertext
        self.masked: dict[int, str] = {}  # U3: index -> sha256 of its frame
        self.masked_sum = np.zeros(config.vector_length + 1, FIELD_DTYPE)
        self.revealed: dict[int, dict[str, dict[int, bytes]]] = {}  # U4: responder -> seed/key -> of -> share
        self.digests: dict[str, dict[int, str]] = {"advertise": {}, "shares": {}, "unmask": {}}
        self.dropped: dict[str, list[int]] = {}  # phase -> devices that went silent in it

    # ------------------------------------------------------------ phase 1: advertise keys

    def receive_advertise(self, message: Mapping[str, Any]) -> bool:
        msg, i = self._accept("advertise", message)
        if msg is None:
            return False
        mask_key = unb64(msg.get("mask_key"), "advertise mask_key", 32)
        share_key = unb64(msg.get("share_key"), "advertise share_key", 32)
        if mask_key == share_key:
            raise SecAggError(f"advertise from device {i}: the mask and share keys must differ")
        for j, pair in self.keys.items():
            if {mask_key, share_key} & set(pair):
                raise SecAggError(f"advertise from device {i}: a public key device {j} already advertised")
        self.keys[i] = (mask_key, share_key)
        return self._record("advertise", i, message)

    def close_advertise(self) -> dict[int, dict[str, Any]]:
        self._phase("close_advertise", "advertise")
        self._enough("advertise", set(self.keys), set(self.keys))
        return self._advance("share_keys", self.keys)

    # ------------------------------------------------------------ phase 2: share keys

    def receive_shares(self, message: Mapping[str, Any]) -> bool:
        msg, i = self._accept("shares", message, members=self.keys)
        if msg is None:
            return False
        entries = listing(msg, "shares", "shares")
        expected = self._live(i, self.keys)
        receivers = index_list([obj(e, "share").get("to") for e in entries], f"shares from {i}", expected)
        if set(receivers) != set(expected):
            raise SecAggError(f"shares from device {i}: must go to exactly its neighbours that advertised keys")
        out = {e["to"]: unb64(e.get("ciphertext"), f"share {i}->{e['to']}", SHARE_CIPHERTEXT_BYTES) for e in entries}
        self.commitments[i] = unb64(msg.get("seed_commitment"), f"seed_commitment of {i}", 32)
        self.ciphertexts[i] = out
        return self._record("shares", i, message)

    def close_share_keys(self) -> dict[int, dict[str, Any]]:
        self._phase("close_share_keys", "share_keys")
        self._enough("share_keys", set(self.commitments), set(self.commitments))
        return self._advance("masked_input", self.commitments)

    # ------------------------------------------------------------ phase 3: masked input

    def receive_masked(self, frame: bytes) -> bool:
        header, body = unpack_frame(frame, "masked_input")
        d = self.config.vector_length + 1
        i = integer(header, "index", 1, self.config.cohort_size, "masked_input")
        if header.get("round_id") != self.config.round_id or header.get("length") != d:
            raise SecAggError(f"masked_input from {i}: round_id/length must be {self.config.round_id}/{d}")
        if len(body) != 4 * d:
            raise SecAggError(f"masked_input from {i}: body of {len(body)} bytes, expected {4 * d}")
        fingerprint = hashlib.sha256(frame).hexdigest()
        if i in self.masked:
            if self.masked[i] != fingerprint:
                raise SecAggError(f"masked_input from device {i}: a different vector was already accepted")
            return False
        self._phase("masked_input", "masked_input")
        if i not in self.commitments:
            raise SecAggError(f"masked_input from device {i}: it did not complete the share-keys phase")
        np.add(self.masked_sum, np.frombuffer(body, FIELD_DTYPE), out=self.masked_sum)
        self.masked[i] = fingerprint
        return True

    def close_masked_input(self) -> dict[int, dict[str, Any]]:
        self._phase("close_masked_input", "masked_input")
        survivors = set(self.masked)
        self._enough("masked_input", survivors, set(self.commitments))
        parts = graph.components(survivors, self.config.graph)
        if len(parts) > 1:
            self._abandon(
                f"the survivors' neighbour graph split into {len(parts)} parts (sizes "
                f"{sorted(len(p) for p in parts)}): unmasking would reveal partial sums"
            )
        self.ciphertexts = {}  # delivered; no longer needed
        return self._advance("unmask", self.masked)

    # ------------------------------------------------------------ phase 4: unmask

    def receive_unmask(self, message: Mapping[str, Any]) -> bool:
        msg, i = self._accept("unmask", message, members=self.masked)
        if msg is None:
            return False
        request = self.outgoing(i)
        got = {}
        wants = (("seed_shares", "seed", request["survivors"]), ("key_shares", "key", request["dropped"]))
        for field, kind, wanted in wants:
            entries = listing(msg, field, "unmask")
            of = index_list([obj(e, "unmask share").get("of") for e in entries], f"{field} from {i}", wanted)
            if set(of) != set(wanted):
                raise SecAggError(f"unmask from device {i}: {field} must cover exactly {sorted(wanted)}")
            got[kind] = {e["of"]: unb64(e.get("share"), f"{field} of {e['of']}", shamir.SHARE_BYTES) for e in entries}
        self.revealed[i] = got
        return self._record("unmask", i, message)

    def finish(self) -> AggregateResult:
        """Reconstruct seeds of survivors and keys of the dropped, remove every mask, decode the sum."""
        if self.phase == "done":
            return self._result()
        self._phase("finish", "unmask")
        responders = set(self.revealed)
        self._enough("unmask", responders, set(self.commitments))
        total = self.masked_sum.copy()
        for i in sorted(self.masked):
            seed = self._recover(i, "seed")
            if crypto.commit(seed, self.config.round_id, i) != self.commitments[i]:
                self._abandon(f"the reconstructed seed of device {i} does not match its commitment")
            crypto.prg_into(total, seed, -1)
        for j in sorted(set(self.commitments) - set(self.masked)):
            key = crypto.KeyPair(self._recover(j, "key"))
            if key.public != self.keys[j][0]:
                self._abandon(f"the reconstructed mask key of dropped device {j} does not match its public key")
            for h in self._live(j, self.masked):
                seed = key.agree(self.keys[h][0], "pairwise-mask", self.config.round_id, j, h)
                crypto.prg_into(total, seed, -1 if h < j else +1)  # h added +PRG if h < j
        self.masked_sum = total
        self.revealed = {}
        self.phase = "done"
        return self._result()

    def _recover(self, of: int, kind: str) -> bytes:
        shares = [(h, got[kind][of]) for h, got in self.revealed.items() if of in got[kind]]
        if len(shares) < self.config.threshold:
            self._abandon(f"only {len(shares)} {kind} shares of device {of} arrived; {self.config.threshold} needed")
        try:
            return shamir.reconstruct(shares, self.config.threshold)
        except shamir.ShamirError as exc:
            self._abandon(f"the {kind} shares of device {of} are inconsistent: {exc}")

    def _result(self) -> AggregateResult:
        total_weight, weighted_sum = self.config.quantizer.decode(self.masked_sum)
        survivors = tuple(sorted(self.masked))
        return AggregateResult(
            self.config.round_id,
            survivors,
            total_weight,
            weighted_sum,
            self.config.central_noise_std(len(survivors)) * self.config.max_weight,
        )

    # ------------------------------------------------------------ what devices are sent

    def outgoing(self, index: int) -> dict[str, Any] | None:
        """The message device `index` should have now (None if it has dropped or nothing is due)."""
        r = self.config.round_id
        if self.phase == "abandoned":
            return self.abandoned_message()
        if self.phase == "share_keys" and index in self.keys:
            peers = [
                {"index": j, "mask_key": b64(self.keys[j][0]), "share_key": b64(self.keys[j][1])}
                for j in self._live(index, self.keys)
            ]
            return {"type": "neighbour_keys", "round_id": r, "index": index, "neighbours": peers}
        if self.phase == "masked_input" and index in self.commitments:
            shares = [
                {"from": j, "ciphertext": b64(self.ciphertexts[j][index])} for j in self._live(index, self.commitments)
            ]
            return {"type": "forwarded_shares", "round_id": r, "index": index, "shares": shares}
        if self.phase == "unmask" and index in self.masked:
            live = self._live(index, self.commitments)
            survivors = [j for j in live if j in self.masked]
            dropped = [j for j in live if j not in self.masked]
            return {"type": "unmask_request", "round_id": r, "index": index, "survivors": survivors, "dropped": dropped}
        return None

    def abandoned_message(self) -> dict[str, Any]:
        return {"type": "abandoned", "round_id": self.config.round_id, "reason": self.abandon_reason}

    def waiting_for(self) -> list[int]:
        """Devices the current phase still expects a message from."""
        expected = {
            "advertise": set(range(1, self.config.cohort_size + 1)),
            "share_keys": set(self.keys),
            "masked_input": set(self.commitments),
            "unmask": set(self.masked),
        }.get(self.phase, set())
        have = {"advertise": self.keys, "share_keys": self.commitments, "masked_input": self.masked}.get(
            self.phase, self.revealed
        )
        return sorted(expected - set(have))

    def abandon(self, reason: str) -> dict[str, Any]:
        """Call the round off (e.g. a deadline with too few devices); returns the message for devices."""
        if self.phase != "abandoned":
            self.phase, self.abandon_reason = "abandoned", reason
        return self.abandoned_message()

    # ------------------------------------------------------------ checks and bookkeeping

    def _live(self, i: int, alive: Mapping[int, Any]) -> list[int]:
        return [j for j in self.config.graph[i] if j in alive]

    def _phase(self, action: str, phase: str) -> None:
        if self.phase == "abandoned":
            raise SecAggError(f"{action}: the round was abandoned ({self.abandon_reason})")
        if self.phase != phase:
            raise SecAggError(f"{action}: the round is in phase {self.phase!r}, not {phase!r}")

    def _accept(self, kind: str, message: Mapping[str, Any], members: Mapping[int, Any] | None = None):
        """(message, sender) to process, or (None, sender) for an identical retry."""
        msg, i = envelope(message, kind, self.config.round_id, self.config.cohort_size)
        seen = self.digests[kind].get(i)
        if seen is not None:
            if seen != digest(msg):
                raise SecAggError(f"{kind} from device {i}: a different message was already accepted")
            return None, i
        self._phase(kind, {"advertise": "advertise", "shares": "share_keys", "unmask": "unmask"}[kind])
        if members is not None and i not in members:
            raise SecAggError(f"{kind} from device {i}: it is not among the devices this phase expects")
        return msg, i

    def _record(self, kind: str, i: int, message: Mapping[str, Any]) -> bool:
        self.digests[kind][i] = digest(message)
        return True

    def _enough(self, phase: str, alive: set[int], needs: set[int]) -> None:
        """Abandon unless enough devices remain and each of `needs` keeps t live neighbours."""
        cfg = self.config
        self.dropped[phase] = sorted(set(range(1, cfg.cohort_size + 1)) - alive - set().union(*self.dropped.values()))
        if len(alive) < cfg.min_survivors:
            self._abandon(
                f"only {len(alive)} of {cfg.cohort_size} devices remain after the {phase} phase; the round needs "
                f"at least {cfg.min_survivors} (dropout tolerance {cfg.dropout_tolerance:.3g})"
            )
        for i in sorted(needs):
            live = len(self._live(i, {j: None for j in alive}))
            if live < cfg.threshold:
                self._abandon(
                    f"device {i} has {live} live neighbours after the {phase} phase; threshold {cfg.threshold} needed"
                )

    def _advance(self, phase: str, recipients: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        self.phase = phase
        return {i: self.outgoing(i) for i in sorted(recipients)}

    def _abandon(self, reason: str):
        self.abandon(reason)
        raise RoundAbandoned(reason)

    # ------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        def shares(table: dict[int, bytes]) -> list:
            return [[j, b64(v)] for j, v in sorted(table.items())]

        header = {
            "config": self.config.to_dict(),
            "phase": self.phase,
            "abandon_reason": self.abandon_reason,
            "keys": [[i, b64(m), b64(s)] for i, (m, s) in sorted(self.keys.items())],
            "commitments": shares(self.commitments),
            "ciphertexts": [[i, shares(table)] for i, table in sorted(self.ciphertexts.items())],
            "masked": [[i, h] for i, h in sorted(self.masked.items())],
            "revealed": [[i, shares(got["seed"]), shares(got["key"])] for i, got in sorted(self.revealed.items())],
            "digests": {kind: [[i, h] for i, h in sorted(table.items())] for kind, table in self.digests.items()},
            "dropped": self.dropped,
        }
        return pack_frame(SERVER_STATE, header, self.masked_sum.tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerSession:
        header, body = unpack_frame(data, SERVER_STATE)

        def shares(rows: list, size: int) -> dict[int, bytes]:
            return {int(j): unb64(v, "stored share", size) for j, v in rows}

        try:
            session = cls(SecAggConfig.from_dict(header["config"]))
            if header["phase"] not in PHASES:
                raise ValueError(f"unknown phase {header['phase']!r}")
            if len(body) != session.masked_sum.nbytes:
                raise ValueError(f"masked sum of {len(body)} bytes, expected {session.masked_sum.nbytes}")
            session.phase, session.abandon_reason = header["phase"], header["abandon_reason"]
            session.keys = {int(i): (unb64(m, "key", 32), unb64(s, "key", 32)) for i, m, s in header["keys"]}
            session.commitments = shares(header["commitments"], 32)
            session.ciphertexts = {int(i): shares(rows, SHARE_CIPHERTEXT_BYTES) for i, rows in header["ciphertexts"]}
            session.masked = {int(i): str(h) for i, h in header["masked"]}
            session.revealed = {
                int(i): {"seed": shares(seed, shamir.SHARE_BYTES), "key": shares(key, shamir.SHARE_BYTES)}
                for i, seed, key in header["revealed"]
            }
            session.digests = {kind: {int(i): str(h) for i, h in rows} for kind, rows in header["digests"].items()}
            session.dropped = {str(k): [int(i) for i in v] for k, v in header["dropped"].items()}
            session.masked_sum = np.frombuffer(body, FIELD_DTYPE).copy()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggError(f"server state: malformed ({exc})") from None
        return session
