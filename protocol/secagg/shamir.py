"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

A secret s (read as a 256-bit integer) is f(0) of a random polynomial f of degree t - 1; holder x
gets f(x). Any t shares give f back by interpolation; t - 1 reveal nothing about s. The prime is
the smallest above 2^256, so every 32-byte secret is a field element and a share fits in 33 bytes.

Holders are device indices (1..n, distinct and non-zero). `reconstruct` refuses duplicates that
disagree and, given more than t shares, checks that they all lie on one polynomial of degree < t,
so a corrupted share is named instead of silently giving a wrong secret.

Interpolation uses Newton's divided differences; the divisors are differences of small holder
indices, whose inverses come from one table per field (inv[i] = -(p // i) * inv[p % i]), so a
reconstruction costs O(t^2) multiplications and no modular exponentiation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from protocol.secagg.wire import SecAggError

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33
MAX_HOLDER = 1 << 20
_inverses: list[int] = [0, 1]


class ShamirError(SecAggError):
    """Shares are missing, duplicated with different values, or inconsistent."""


def _inverse(d: int) -> int:
    """1 / d mod PRIME for a small non-zero d (negative allowed)."""
    a = abs(d)
    while len(_inverses) <= a:
        i = len(_inverses)
        _inverses.append((PRIME - PRIME // i) * _inverses[PRIME % i] % PRIME)
    inv = _inverses[a]
    return inv if d > 0 else PRIME - inv


def _check_holders(holders: Iterable[int]) -> list[int]:
    holders = list(holders)
    for x in holders:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_HOLDER:
            raise ShamirError(f"holder {x!r} is not an integer in [1, {MAX_HOLDER}]")
    if len(set(holders)) != len(holders):
        raise ShamirError("a holder appears twice")
    return holders


def split(
    secret: bytes, threshold: int, holders: Iterable[int], entropy: Callable[[int], bytes] = os.urandom
) -> dict[int, bytes]:
    """holder -> 33-byte share; any `threshold` of them recover `secret`."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    holders = _check_holders(holders)
    if not 1 <= threshold <= len(holders):
        raise ShamirError(f"threshold {threshold} must be in [1, {len(holders)}] (the number of holders)")
    # 48 random bytes per coefficient: reducing mod p leaves a bias below 2^-128
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [int.from_bytes(entropy(48), "big") % PRIME for _ in range(threshold - 1)]
    # Horner's rule without reducing at each step: holders are < 2^21, so t steps grow y by < 21 t bits
    # (a few hundred), and one reduction per share is much cheaper than t of them
    shares = {}
    top = coefficients[::-1]
    for x in holders:
        y = 0
        for c in top:
            y = y * x + c
        shares[x] = (y % PRIME).to_bytes(SHARE_BYTES, "big")
    return shares


def _collect(shares: Iterable[tuple[int, bytes]]) -> dict[int, int]:
    points: dict[int, int] = {}
    for x, raw in shares:
        _check_holders([x])
        if not isinstance(raw, bytes | bytearray) or len(raw) != SHARE_BYTES:
            raise ShamirError(f"share of holder {x}: expected {SHARE_BYTES} bytes")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise ShamirError(f"share of holder {x} is not a field element")
        if points.setdefault(x, y) != y:
            raise ShamirError(f"holder {x} gave two different shares")
    return points


def reconstruct(shares: Iterable[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from (holder, share) pairs: at least `threshold`, all on one polynomial."""
    points = _collect(shares)
    if len(points) < threshold:
        raise ShamirError(f"{len(points)} distinct shares, {threshold} needed")
    xs = sorted(points)
    base, extra = xs[:threshold], xs[threshold:]
    # Newton form: coef[i] = f[x_0, ..., x_i]
    coef = [points[x] for x in base]
    for level in range(1, threshold):
        for i in range(threshold - 1, level - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) * _inverse(base[i] - base[i - level]) % PRIME

    def evaluate(at: int) -> int:
        y = 0
        for i in range(threshold - 1, -1, -1):
            y = (y * (at - base[i]) + coef[i]) % PRIME
        return y

    for x in extra:
        if evaluate(x) != points[x]:
            raise ShamirError(f"share of holder {x} does not lie on the polynomial of the other shares")
    secret = evaluate(0)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("the shares interpolate to a value that is not a 32-byte secret: some share is wrong")
    return secret.to_bytes(SECRET_BYTES, "big")
