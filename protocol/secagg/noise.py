"""Distributed differential privacy for secure-aggregation rounds: the Skellam mechanism.

Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning" (NeurIPS). Skellam(mu) = Poisson(mu/2) - Poisson(mu/2) is integer-valued with variance
mu, and a sum of independent Skellams is Skellam with the summed variance. So if every device adds
Skellam(mu / m) to its quantized values, the unmasked sum of any m or more devices carries at
least Skellam(mu): the central noise the accountant charges, although no single party ever
added it. Devices calibrate to m = the fewest survivors the round accepts (`min_survivors`), so
dropouts can only add noise. (Devices that collude with the server can subtract their own
share: the guarantee counts honest survivors.)

Sensitivity in the quantized domain: a device's values are its delta clipped to L2 norm C, scaled
by S and rounded (each coordinate moves by less than one step), so one device changes the sum by
Delta2 <= S*C + sqrt(d) in L2 and Delta1 <= sqrt(d) * Delta2 in L1. The weight entry carries no
noise: DP rounds use max_weight 1, so it only counts survivors, which the server knows anyway.

Accounting (Theorem 3.5 of the paper, for integer orders alpha > 1):

    eps(alpha) <= alpha Delta2^2 / (2 mu) + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2),
                                                3 Delta1 / (2 mu))

The first term is the Gaussian mechanism's with std sqrt(mu) over sensitivity Delta2; the min is a
discretization surcharge. `equivalent_noise_multiplier` gives the z whose Gaussian RDP alpha/(2 z^2)
is >= that bound at every order alpha >= 1 (the min is bounded by its value at alpha = 1), so
charging GaussianDpEvent(z) at integer orders >= 2 is an upper bound on the Skellam's cost. With
Poisson subsampling, charging PoissonSampledDpEvent(q, GaussianDpEvent(z)) is the approximation the
paper's experiments make (the leading terms coincide); it is not a proved bound.

In de-quantized units the central noise std on the sum of deltas is sqrt(survivors * mu_device)/S.
"""

from __future__ import annotations

import math

import numpy as np


def sensitivities(clip_norm: float, scale: float, dim: int) -> tuple[float, float]:
    """(Delta1, Delta2) of one device's quantized, L2-clipped values (see module doc)."""
    l2 = scale * clip_norm + math.sqrt(dim)
    return math.sqrt(dim) * l2, l2


def central_variance(noise_multiplier: float, clip_norm: float, scale: float, dim: int) -> float:
    """mu such that sqrt(mu) = z * Delta2: the Skellam counterpart of Gaussian noise z * C."""
    _, l2 = sensitivities(clip_norm, scale, dim)
    return (noise_multiplier * l2) ** 2


def equivalent_noise_multiplier(variance: float, l1: float, l2: float) -> float:
    """The z whose Gaussian RDP alpha / (2 z^2) dominates the Skellam(variance) bound at every order >= 1."""
    if variance <= 0:
        return 0.0
    mu = variance
    surcharge = min(3.0 * l1 / mu, (2.0 * l2**2 + max(0.0, 6.0 * l1 - l2**2)) / (2.0 * mu**2))
    return 1.0 / math.sqrt(l2**2 / mu + surcharge)


def sample_skellam(rng: np.random.Generator, variance: float, size: int) -> np.ndarray:
    """int64 Skellam(variance) noise: the difference of two Poisson(variance / 2)."""
    if variance <= 0:
        return np.zeros(size, np.int64)
    half = variance / 2.0
    return rng.poisson(half, size).astype(np.int64) - rng.poisson(half, size).astype(np.int64)


def skellam_tail(variance: float, t: float) -> float:
    """Chernoff bound on P(|Skellam(variance)| >= t): 2 exp(mu (cosh s - 1) - s t), s = asinh(t / mu).

    (cosh s - 1 is computed as 2 sinh(s/2)^2, which stays exact for the tiny s of large variances.)"""
    if t <= 0:
        return 1.0
    if variance <= 0:
        return 0.0
    s = math.asinh(t / variance)
    return min(1.0, 2.0 * math.exp(variance * 2.0 * math.sinh(s / 2.0) ** 2 - s * t))


def overflow_margin(variance: float, dim: int, failure: float = 1e-12) -> float:
    """The t with P(any of dim coordinates of Skellam(variance) exceeds t) <= failure (union bound)."""
    if variance <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while dim * skellam_tail(variance, high) > failure:
        low, high = high, high * 2.0
    for _ in range(60):
        mid = (low + high) / 2.0
        low, high = (mid, high) if dim * skellam_tail(variance, mid) > failure else (low, mid)
    return high
