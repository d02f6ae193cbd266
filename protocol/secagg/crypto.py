"""The cryptographic primitives, all from `cryptography` (the only module of pocketfed that imports it).

- X25519 key agreement. Each device makes two key pairs per round: a *mask* pair, whose agreement
  with a neighbour seeds their pairwise mask, and a *share* pair, whose agreement keys the AEAD
  that carries Shamir shares between them through the server.
- HKDF-SHA256 turns a raw X25519 secret into a 32-byte key. The `info` label separates purposes,
  protocol version and round (and names the pair), so one agreement never serves two uses.
- ChaCha20-Poly1305 encrypts a share message; the associated data binds round, sender and receiver,
  so the server cannot replay a ciphertext to another device or round. Nonces are random
  (96 bits; a key encrypts two messages per round, one in each direction).
- PRG: AES-256-CTR keyed by a 32-byte seed, counter block 0, read as little-endian uint32: every
  device and the server expand a seed to the same vector, at AES-NI speed.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable

import numpy as np

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # pragma: no cover - exercised only where the extra is missing
    raise ImportError(
        f"secure aggregation needs the cryptography package: pip install 'pocketfed[secagg]' ({exc})"
    ) from None

from protocol.secagg.wire import SecAggError

LABEL = b"pocketfed-secagg-v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_ZERO_BLOCK = bytes(16)


class DecryptionError(SecAggError):
    """A share ciphertext failed authentication: altered, truncated, or not meant for this device."""


class KeyPair:
    """An X25519 key pair from 32 private bytes (any 32 bytes: X25519 clamps them)."""

    def __init__(self, private: bytes):
        if len(private) != KEY_BYTES:
            raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(private)}")
        self.private = bytes(private)
        self._key = X25519PrivateKey.from_private_bytes(self.private)
        self.public = self._key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, entropy: Callable[[int], bytes] = os.urandom) -> KeyPair:
        return cls(entropy(KEY_BYTES))

    def agree(self, peer_public: bytes, purpose: str, round_id: int, a: int, b: int) -> bytes:
        """HKDF-SHA256(X25519(ours, peer_public)), labelled with purpose, round and the pair {a, b}."""
        try:
            raw = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a low-order public key gives the all-zero secret, which X25519 refuses
            raise SecAggError(f"key agreement between devices {a} and {b} failed: {exc}") from None
        low, high = min(a, b), max(a, b)
        info = LABEL + f" {purpose} round={round_id} pair={low},{high}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(raw)


def _associated_data(round_id: int, sender: int, receiver: int) -> bytes:
    return LABEL + b" share" + struct.pack("<QII", round_id, sender, receiver)


def encrypt(
    key: bytes,
    plaintext: bytes,
    round_id: int,
    sender: int,
    receiver: int,
    entropy: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext), bound to (round, sender, receiver)."""
    nonce = entropy(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _associated_data(round_id, sender, receiver))


def decrypt(key: bytes, ciphertext: bytes, round_id: int, sender: int, receiver: int) -> bytes:
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(f"share from device {sender}: ciphertext of {len(ciphertext)} bytes is too short")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, _associated_data(round_id, sender, receiver))
    except InvalidTag:
        raise DecryptionError(f"share from device {sender} to {receiver} failed authentication") from None


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uint32 values expanded from a 32-byte seed (AES-256-CTR from counter 0)."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a PRG seed must be {KEY_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_BLOCK)).encryptor()
    stream = encryptor.update(bytes(4 * length))  # CTR is a stream mode: finalize() adds nothing
    return np.frombuffer(stream, dtype="<u4")


class _Scratch(threading.local):
    """Per-thread buffers for prg_into, reused: a fresh 250 kB input and output per expansion cost
    more in page faults than AES-CTR itself (a device expands k + 1 masks, the server as many)."""

    zeros: bytes = b""
    stream: bytearray = bytearray()


_scratch = _Scratch()


def prg_into(out: np.ndarray, seed: bytes, sign: int) -> None:
    """out += sign * PRG(seed), modulo 2^32 (in place)."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a PRG seed must be {KEY_BYTES} bytes, got {len(seed)}")
    size = 4 * out.size
    if len(_scratch.zeros) != size:
        _scratch.zeros, _scratch.stream = bytes(size), bytearray(size + 15)  # update_into wants a block spare
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_BLOCK)).encryptor()
    encryptor.update_into(_scratch.zeros, _scratch.stream)
    mask = np.frombuffer(_scratch.stream, dtype="<u4", count=out.size)
    if sign > 0:
        np.add(out, mask, out=out)
    else:
        np.subtract(out, mask, out=out)


def commit(seed: bytes, round_id: int, index: int) -> bytes:
    """SHA-256 commitment to a device's self-mask seed, so the server can check its reconstruction."""
    return hashlib.sha256(LABEL + b" seed-commitment" + struct.pack("<QI", round_id, index) + seed).digest()
