"""The SecAgg+ neighbour graph and the choice of its degree k and threshold t.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead") replace
SecAgg's complete graph by a k-regular one: a device exchanges keys, shares and pairwise masks
with its k neighbours only, so the round costs O(n k) instead of O(n^2). We use their Harary graph
with randomly relabelled nodes: devices are placed on a ring in the order of
SHA-256(graph_seed || round || index), a permutation anyone can recompute from the public per-round
seed, and each is joined to the k/2 nearest on either side (k even; k = n - 1 is the complete graph).

Threshold t = floor(k/2) + 1, a strict majority of the neighbours: every neighbour reveals at most
one of the two shares of a device (its self-mask seed, or its mask key), so no server, honest or
not, can collect t of each.

Degree k: the smallest even k for which the round survives up to D = floor(delta * n) dropouts
with probability >= 1 - 1e-6, when the dropouts fall independently of the graph. A device needs t
of its k neighbours alive, i.e. at most k - t of them dropped; the number dropped is
Hypergeometric(n - 1, D, k), and a union bound over the n devices gives

    fail(k) <= n * P[Hypergeometric(n - 1, D, k) > k - t].

k grows like log n: for delta = 1/3, n = 20 -> 14, 100 -> 68, 1000 -> 236 (at n <= 100 the bound
even forces k - t >= D, so any D dropouts are survived). When no even k < n - 1 reaches the target,
the complete graph is used, where any D <= k - t dropouts are survived exactly.

Is k = 68 of 99 at n = 100 too conservative? No (checked 2026-11-30 against Bell et al. and Flower's
SecAgg+). Security fixes t: if c of a device's neighbours collude with the server (each hands over
both of its shares) and the server asks the honest ones for seed shares or key shares as it likes,
it must not reach t of both: 2t > k + c. Our threat model has no colluding devices (c = 0), so
t = floor(k/2) + 1 is the least safe threshold; a corrupted fraction gamma > 0 would need
t > (k + c_max)/2 with c_max a tail bound of Hypergeometric(n - 1, gamma n, k), and so a larger k (not
configurable yet). Robustness then needs the dropped neighbours below k - t = k/2 - 1: with a third
of the cohort dropped, each device expects k/3 of its neighbours gone and may lose k/2 - 1, a margin
of only k/6, and the union bound (tight for rare events) reaches 1e-6 at k = 68 (k = 66 gives
2e-6). The O(log n) saving shows at larger n or a smaller tolerance; k for n = 50 / 100 / 200 / 1000:

    delta = 1/3: 34 / 68 / 112 / 236      delta = 0.2: 22 / 38 / 52 / 76      delta = 0.1: 12 / 22 / 28 / 36

Flower's SecAgg+ takes k (num_shares) and t (reconstruction_threshold) from the user and checks only
t < k: it promises neither property; Bell et al. derive both from (n, gamma, delta) as here.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from math import comb

FAILURE_TARGET = 1e-6


def threshold_for(k: int) -> int:
    return k // 2 + 1


@lru_cache(maxsize=512)
def dropout_failure_bound(n: int, k: int, t: int, dropouts: int) -> float:
    """Union bound on P(some device keeps fewer than t live neighbours) for `dropouts` random dropouts."""
    others, tolerated = n - 1, k - t
    if dropouts <= tolerated:
        return 0.0
    bad = sum(comb(dropouts, x) * comb(others - dropouts, k - x) for x in range(tolerated + 1, min(k, dropouts) + 1))
    return min(1.0, n * bad / comb(others, k))


def derive_degree(n: int, dropouts: int, target: float = FAILURE_TARGET) -> int:
    """The smallest valid degree (even, or n - 1) whose failure bound is <= target."""
    for k in range(2, n - 1, 2):
        if dropout_failure_bound(n, k, threshold_for(k), dropouts) <= target:
            return k
    return n - 1


def check_degree(n: int, k: int) -> None:
    if not (k == n - 1 or (k % 2 == 0 and 2 <= k <= n - 2)):
        raise ValueError(f"neighbours k={k} must be n - 1 = {n - 1} (complete graph) or even in [2, {n - 2}]")


def ring_order(n: int, round_id: int, seed: bytes) -> list[int]:
    """Device indices 1..n in ring order (the public random relabelling)."""
    prefix = b"pocketfed-secagg-v1 graph" + round_id.to_bytes(8, "big") + seed

    def key(index: int) -> bytes:
        return hashlib.sha256(prefix + index.to_bytes(4, "big")).digest()

    return sorted(range(1, n + 1), key=key)


def neighbours(n: int, k: int, round_id: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """index -> sorted neighbour indices of the Harary graph H(k, n) on the relabelled ring."""
    check_degree(n, k)
    if k == n - 1:
        return {i: tuple(j for j in range(1, n + 1) if j != i) for i in range(1, n + 1)}
    ring = ring_order(n, round_id, seed)
    half = k // 2
    out = {}
    for pos, index in enumerate(ring):
        near = {ring[(pos + step) % n] for step in range(-half, half + 1) if step}
        out[index] = tuple(sorted(near))
    return out


def components(nodes: set[int], graph: dict[int, tuple[int, ...]]) -> list[set[int]]:
    """Connected components of the subgraph induced by `nodes`."""
    left, parts = set(nodes), []
    while left:
        start = left.pop()
        part, stack = {start}, [start]
        while stack:
            for other in graph[stack.pop()]:
                if other in left:
                    left.remove(other)
                    part.add(other)
                    stack.append(other)
        parts.append(part)
    return parts
