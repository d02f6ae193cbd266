"""What a device's bytes reveal under secure aggregation: the masked vector is uniform in Z_(2^32)
(a test that the plain quantized delta fails), nothing else it sends is large enough to carry the
delta, and `cryptography` stays out of the modules a device without secure aggregation imports."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
from secagg_helpers import entropy, lenet_deltas

from protocol.secagg import SecAggConfig, run_round
from protocol.secagg.quantize import to_field
from protocol.secagg.wire import unpack_frame

ALPHA = 1e-6  # false-alarm rate of each uniformity test


def chi_square_bytes(data: bytes) -> tuple[float, float]:
    """(statistic, critical value at ALPHA) of the byte histogram against uniform over 256 values."""
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
    expected = len(data) / 256
    statistic = float(np.sum((counts - expected) ** 2) / expected)
    df, z = 255, 4.753  # z: upper 1e-6 quantile of N(0, 1); Wilson-Hilferty for the chi-square quantile
    return statistic, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def kolmogorov_smirnov_uint32(values: np.ndarray) -> tuple[float, float]:
    """(D, critical value at ALPHA) of uint32 values / 2^32 against U(0, 1)."""
    u = np.sort(values.astype(np.float64) / 2**32)
    n = u.size
    grid = np.arange(1, n + 1) / n
    statistic = float(max(np.max(grid - u), np.max(u - (grid - 1 / n))))
    return statistic, math.sqrt(math.log(2 / ALPHA) / (2 * n))


def test_the_masked_vector_is_uniform_and_the_quantized_delta_is_not():
    n = 5
    config = SecAggConfig.create(11, n, 61706)
    deltas = lenet_deltas(60)
    inputs = {i: (deltas[i - 1], 600) for i in range(1, n + 1)}
    result, trace = run_round(config, inputs, entropy=entropy(11), seed=11)
    assert result.survivors == (1, 2, 3, 4, 5)
    for i in range(1, n + 1):
        frame = next(raw for raw in trace.sent[i] if raw.startswith(b"PFSECAGG"))
        body = bytes(unpack_frame(frame, "masked_input")[1])
        masked = np.frombuffer(body, "<u4")
        chi2, chi2_limit = chi_square_bytes(body)
        ks, ks_limit = kolmogorov_smirnov_uint32(masked)
        assert chi2 < chi2_limit and ks < ks_limit, (i, chi2, chi2_limit, ks, ks_limit)
        # the same tests on what the device would send without masks
        plain = to_field(config.quantizer.encode(deltas[i - 1], 600, np.random.default_rng(0))[0])
        plain_chi2, _ = chi_square_bytes(plain.astype("<u4").tobytes())
        plain_ks, _ = kolmogorov_smirnov_uint32(plain)
        assert plain_chi2 > 100 * chi2_limit and plain_ks > 10 * ks_limit
        assert np.count_nonzero(masked == plain) <= 2  # chance alone: 61,707 / 2^32


def test_nothing_else_a_device_sends_can_carry_its_delta():
    n = 20
    config = SecAggConfig.create(12, n, 61706)
    deltas = lenet_deltas(60)
    inputs = {i: (deltas[i - 1], 600) for i in range(1, n + 1)}
    _, trace = run_round(config, inputs, entropy=entropy(12), seed=12)
    for i in range(1, n + 1):
        sent = trace.sent[i]
        frames = [raw for raw in sent if raw.startswith(b"PFSECAGG")]
        assert len(frames) == 1 and len(sent) == 4  # advertise, shares, the masked frame, unmask
        others = sum(len(raw) for raw in sent if not raw.startswith(b"PFSECAGG"))
        assert others < deltas[i - 1].nbytes / 10  # keys, sealed shares and revealed shares only
        plain = to_field(config.quantizer.encode(deltas[i - 1], 600, np.random.default_rng(0))[0]).astype("<u4")
        for raw in sent:  # no window of the delta, as float32 or as quantized integers, appears anywhere
            assert deltas[i - 1][1000:1016].tobytes() not in raw
            assert plain[1000:1016].tobytes() not in raw


def test_protocol_modules_do_not_import_cryptography():
    code = (
        "import sys, protocol, protocol.messages, protocol.update, protocol.deltas\n"
        "assert 'cryptography' not in sys.modules, 'cryptography was imported'\n"
        "import protocol.secagg\n"
        "assert 'cryptography' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
