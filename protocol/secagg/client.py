"""One device's side of one secure-aggregation round, as a state machine without I/O.

    session = ClientSession(config, index)             # config: SecAggConfig or its to_dict()
    advertise = session.advertise()                     # phase 1: two public keys
    shares = session.share_keys(neighbour_keys)         # phase 2: encrypted Shamir shares
    masked = session.masked_input(forwarded, delta, n)  # phase 3: bytes (a masked-input frame)
    reply = session.unmask(unmask_request)              # phase 4: shares the server may have

Each call checks the server's message (type, round, this device, neighbours, sizes) and raises
`SecAggError` naming the problem. Calling a phase again with the identical message returns the
identical answer (a retry after a lost response); a different message for a finished phase is
refused. `unmask` never reveals both the seed share and the key share of one device, across all
requests of the round. `to_bytes`/`from_bytes` persist the session (it holds secrets: store it
where the device keeps its private data).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from protocol.deltas import clip_by_l2
from protocol.secagg import crypto, shamir
from protocol.secagg.noise import sample_skellam
from protocol.secagg.params import SecAggConfig
from protocol.secagg.quantize import FIELD_DTYPE, flatten, to_field
from protocol.secagg.wire import (
    SecAggError,
    b64,
    envelope,
    index_list,
    listing,
    obj,
    pack_frame,
    unb64,
    unpack_frame,
)

SHARE_PLAINTEXT = struct.Struct("<II")  # sender, receiver; then the seed share and the key share
SHARE_CIPHERTEXT_BYTES = crypto.NONCE_BYTES + SHARE_PLAINTEXT.size + 2 * shamir.SHARE_BYTES + crypto.TAG_BYTES
CLIENT_STATE = "secagg-client-state"


def digest(message: Mapping[str, Any]) -> str:
    """A canonical fingerprint of a JSON message (to tell a retry from a different message)."""
    return hashlib.sha256(json.dumps(message, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def masked_frame(round_id: int, index: int, vector: np.ndarray) -> bytes:
    header = {"round_id": round_id, "index": index, "length": int(vector.size)}
    return pack_frame("masked_input", header, vector.astype("<u4").tobytes())


class ClientSession:
    def __init__(
        self,
        config: SecAggConfig | Mapping[str, Any],
        index: int,
        *,
        entropy: Callable[[int], bytes] = os.urandom,
        rng: np.random.Generator | None = None,
        keys: tuple[crypto.KeyPair, crypto.KeyPair] | None = None,
    ):
        self.config = config if isinstance(config, SecAggConfig) else SecAggConfig.from_dict(config)
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= self.config.cohort_size:
            raise SecAggError(f"device index {index!r} is not in [1, {self.config.cohort_size}]")
        self.index = index
        self.neighbours = self.config.graph[index]
        self._entropy = entropy
        self._rng = rng if rng is not None else np.random.default_rng(int.from_bytes(entropy(32), "big"))
        self.phase = "new"
        self.abandon_reason: str | None = None
        # (mask, share) key pairs: made here, or before the config was known (advertised with the join)
        mask, share = keys if keys is not None else (crypto.KeyPair.generate(entropy), crypto.KeyPair.generate(entropy))
        if mask.public == share.public:
            raise SecAggError("the mask and share key pairs must differ")
        self._mask = mask  # its agreement with a neighbour seeds their pairwise mask
        self._share = share  # its agreement keys the AEAD of the shares
        self._pair_keys: dict[tuple[int, str], bytes] = {}  # cache of derived keys (not persisted)
        self._seed: bytes | None = None  # b_i, the self-mask seed
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (mask public key, share public key)
        self._received: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (its seed share, its key share)
        self._revealed: dict[int, str] = {}  # neighbour -> "seed" | "key"
        self._answers: dict[str, Any] = {}  # digest of a server message -> our answer to it

    # ------------------------------------------------------------ phases

    def advertise(self) -> dict[str, Any]:
        """Phase 1: the device's two public keys for this round."""
        self._require("advertise", ("new", "advertised"))
        self.phase = "advertised"
        return {
            "type": "advertise",
            "round_id": self.config.round_id,
            "index": self.index,
            "mask_key": b64(self._mask.public),
            "share_key": b64(self._share.public),
        }

    def share_keys(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Phase 2: split the seed and the mask key among the neighbours that advertised keys."""
        key = self._replay("share_keys", message, ("advertised",))
        if key is None:
            return self._answers[digest(message)]
        msg = self._own(message, "neighbour_keys")
        peers: dict[int, tuple[bytes, bytes]] = {}
        entries = listing(msg, "neighbours", "neighbour_keys")
        index_list([obj(e, "neighbour_keys entry").get("index") for e in entries], "neighbour_keys", self.neighbours)
        for entry in entries:
            j = entry["index"]
            mask_key = unb64(entry.get("mask_key"), f"mask_key of {j}", 32)
            peers[j] = (mask_key, unb64(entry.get("share_key"), f"share_key of {j}", 32))
        self._need_threshold(len(peers), "neighbours advertised keys")
        own = {self._mask.public, self._share.public}
        keys = [k for pair in peers.values() for k in pair]
        if len(set(keys)) != len(keys) or own & set(keys):
            raise SecAggError("neighbour_keys: a public key appears twice (replayed or forged keys)")
        self._peers = peers
        self._seed = self._entropy(32)
        holders = sorted(peers)
        t = self.config.threshold
        seed_shares = shamir.split(self._seed, t, holders, self._entropy)
        key_shares = shamir.split(self._mask.private, t, holders, self._entropy)
        out = []
        for j in holders:
            aead_key = self._pair_key(j, "share-encryption")
            plaintext = SHARE_PLAINTEXT.pack(self.index, j) + seed_shares[j] + key_shares[j]
            ciphertext = crypto.encrypt(aead_key, plaintext, self.config.round_id, self.index, j, self._entropy)
            out.append({"to": j, "ciphertext": b64(ciphertext)})
        answer = {
            "type": "shares",
            "round_id": self.config.round_id,
            "index": self.index,
            "seed_commitment": b64(crypto.commit(self._seed, self.config.round_id, self.index)),
            "shares": out,
        }
        return self._answered(key, answer, "shared")

    def masked_input(
        self, message: Mapping[str, Any], delta: np.ndarray | Mapping[str, np.ndarray], sample_count: int
    ) -> bytes:
        """Phase 3: [w, q((w/W) delta)] + noise + PRG(seed) + pairwise masks, as a masked-input frame."""
        key = self._replay("masked_input", message, ("shared",))
        if key is None:
            return self._answers[digest(message)]
        msg = self._own(message, "forwarded_shares")
        entries = listing(msg, "shares", "forwarded_shares")
        senders = index_list([obj(e, "forwarded share").get("from") for e in entries], "forwarded_shares", self._peers)
        self._need_threshold(len(senders), "neighbours sent shares")
        received = {}
        for entry in entries:
            j = entry["from"]
            ciphertext = unb64(entry.get("ciphertext"), f"share from {j}", SHARE_CIPHERTEXT_BYTES)
            aead_key = self._pair_key(j, "share-encryption")
            plain = crypto.decrypt(aead_key, ciphertext, self.config.round_id, j, self.index)
            if SHARE_PLAINTEXT.unpack_from(plain) != (j, self.index):
                raise SecAggError(f"share from device {j}: the sealed sender/receiver do not match the envelope")
            body = plain[SHARE_PLAINTEXT.size :]
            received[j] = (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :])
        vector = self._encode(delta, sample_count)
        crypto.prg_into(vector, self._seed, +1)
        for j in sorted(received):
            seed = self._pair_key(j, "pairwise-mask")
            crypto.prg_into(vector, seed, +1 if self.index < j else -1)
        self._received = received
        return self._answered(key, masked_frame(self.config.round_id, self.index, vector), "masked")

    def unmask(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Phase 4: for each listed neighbour, its seed share (it survived) or key share (it dropped)."""
        key = self._replay("unmask", message, ("masked", "unmasking"), repeatable=True)
        if key is None:
            return self._answers[digest(message)]
        msg = self._own(message, "unmask_request")
        survivors = index_list(listing(msg, "survivors", "unmask_request"), "unmask_request survivors", self._received)
        dropped = index_list(listing(msg, "dropped", "unmask_request"), "unmask_request dropped", self._received)
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise SecAggError(f"unmask_request asks for both shares of device {both[0]}: refused")
        for j, kind in [(j, "seed") for j in survivors] + [(j, "key") for j in dropped]:
            if self._revealed.get(j, kind) != kind:
                raise SecAggError(
                    f"unmask_request asks for the {kind} share of device {j}, whose {self._revealed[j]} share "
                    "was already revealed: refused (it would unmask that device's input)"
                )
        self._need_threshold(len(survivors), "neighbours survived (so this device's seed could not be recovered)")
        for j in survivors:
            self._revealed[j] = "seed"
        for j in dropped:
            self._revealed[j] = "key"
        answer = {
            "type": "unmask",
            "round_id": self.config.round_id,
            "index": self.index,
            "seed_shares": [{"of": j, "share": b64(self._received[j][0])} for j in survivors],
            "key_shares": [{"of": j, "share": b64(self._received[j][1])} for j in dropped],
        }
        return self._answered(key, answer, "unmasking")

    def abandon(self, message: Mapping[str, Any]) -> str:
        """The server called the round off: forget the secrets, keep the reason."""
        msg = obj(message, "abandoned")
        if msg.get("type") != "abandoned" or msg.get("round_id") != self.config.round_id:
            raise SecAggError("expected this round's 'abandoned' message")
        reason = msg.get("reason")
        self.abandon_reason = reason if isinstance(reason, str) else "no reason given"
        self.phase = "abandoned"
        self._mask = self._share = crypto.KeyPair(bytes(32))
        self._seed, self._received, self._answers, self._pair_keys = None, {}, {}, {}
        return self.abandon_reason

    # ------------------------------------------------------------ helpers

    def _require(self, action: str, phases: tuple[str, ...]) -> None:
        if self.phase == "abandoned":
            raise SecAggError(f"{action}: the round was abandoned ({self.abandon_reason})")
        if self.phase not in phases:
            raise SecAggError(f"{action}: not allowed in phase {self.phase!r} (expected {' or '.join(phases)})")

    def _replay(self, action: str, message: Mapping[str, Any], phases: tuple[str, ...], repeatable: bool = False):
        """None if `message` was answered already (a retry); else its digest, after the phase check."""
        key = digest(obj(message, action))
        if key in self._answers and self.phase != "abandoned":
            return None
        order = ("new", "advertised", "shared", "masked", "unmasking")
        if not repeatable and self.phase in order and order.index(self.phase) > order.index(phases[-1]):
            raise SecAggError(f"{action}: already done for a different server message; refused")
        self._require(action, phases)
        return key

    def _answered(self, key: str, answer: Any, phase: str) -> Any:
        self._answers[key] = answer
        self.phase = phase
        return answer

    def _own(self, message: Mapping[str, Any], kind: str) -> dict[str, Any]:
        msg, index = envelope(message, kind, self.config.round_id, self.config.cohort_size)
        if index != self.index:
            raise SecAggError(f"{kind}: addressed to device {index}, this is device {self.index}")
        return msg

    def _need_threshold(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggError(f"only {count} {what}; the threshold is {self.config.threshold}: refused")

    def _pair_key(self, j: int, purpose: str) -> bytes:
        if (j, purpose) not in self._pair_keys:
            mask_public, share_public = self._peers[j]
            own, peer = (self._mask, mask_public) if purpose == "pairwise-mask" else (self._share, share_public)
            self._pair_keys[j, purpose] = own.agree(peer, purpose, self.config.round_id, self.index, j)
        return self._pair_keys[j, purpose]

    def _encode(self, delta: np.ndarray | Mapping[str, np.ndarray], sample_count: int) -> np.ndarray:
        cfg = self.config
        values = flatten(delta) if isinstance(delta, Mapping) else np.asarray(delta, np.float64).reshape(-1)
        if values.size != cfg.vector_length:
            raise SecAggError(f"delta has {values.size} values, the round expects {cfg.vector_length}")
        if cfg.clip_norm is not None:
            values = clip_by_l2({"v": values}, cfg.clip_norm)[0]["v"].astype(np.float64)
        ints, _ = cfg.quantizer.encode(values, sample_count, self._rng)
        if cfg.device_noise_variance > 0:
            ints[1:] += sample_skellam(self._rng, cfg.device_noise_variance, cfg.vector_length)
        return to_field(ints).astype(FIELD_DTYPE)

    # ------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        masked = next((a for a in self._answers.values() if isinstance(a, bytes)), b"")
        header = {
            "config": self.config.to_dict(),
            "index": self.index,
            "phase": self.phase,
            "abandon_reason": self.abandon_reason,
            "mask_key": b64(self._mask.private),
            "share_key": b64(self._share.private),
            "seed": b64(self._seed) if self._seed is not None else None,
            "peers": [[j, b64(m), b64(s)] for j, (m, s) in sorted(self._peers.items())],
            "received": [[j, b64(a), b64(b)] for j, (a, b) in sorted(self._received.items())],
            "revealed": [[j, kind] for j, kind in sorted(self._revealed.items())],
            "answers": {k: ("masked" if isinstance(a, bytes) else a) for k, a in self._answers.items()},
        }
        return pack_frame(CLIENT_STATE, header, masked)

    @classmethod
    def from_bytes(cls, data: bytes, *, entropy: Callable[[int], bytes] = os.urandom) -> ClientSession:
        header, body = unpack_frame(data, CLIENT_STATE)
        try:
            session = cls(header["config"], header["index"], entropy=entropy)
            session.phase = header["phase"]
            session.abandon_reason = header["abandon_reason"]
            session._mask = crypto.KeyPair(unb64(header["mask_key"], "mask_key", 32))
            session._share = crypto.KeyPair(unb64(header["share_key"], "share_key", 32))
            session._seed = None if header["seed"] is None else unb64(header["seed"], "seed", 32)
            session._peers = {j: (unb64(m, "peer", 32), unb64(s, "peer", 32)) for j, m, s in header["peers"]}
            session._received = {
                j: (unb64(a, "share", shamir.SHARE_BYTES), unb64(b, "share", shamir.SHARE_BYTES))
                for j, a, b in header["received"]
            }
            session._revealed = {j: kind for j, kind in header["revealed"]}
            session._answers = {k: (bytes(body) if a == "masked" else a) for k, a in header["answers"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"client state: malformed ({exc!r})") from None
        return session
