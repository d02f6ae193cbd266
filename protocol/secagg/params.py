"""One round's secure-aggregation parameters: what the server publishes to every device at setup.

`SecAggConfig.create` derives what is not given (k, t, the graph seed, the per-device noise) and
every constructor checks the invariants the protocol relies on, with errors naming the parameter:

- t > k / 2 (no party can hold t shares of both secrets of one device; see graph.py),
- the dropout tolerance is met: D = floor(delta * n) dropouts leave each device t live neighbours
  (exactly on the complete graph; with failure probability `dropout_failure` otherwise),
- no overflow: n * levels / 2 + noise margin <= 2^31 - 1 (see quantize.py and noise.py),
- DP noise needs a clip norm and max_weight 1 (weights would leak through the sum and unbound
  the sensitivity).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from protocol.secagg import graph, noise
from protocol.secagg.quantize import SIGNED_LIMIT, Quantizer
from protocol.secagg.wire import SecAggError, obj

VERSION = 1
MAX_COHORT = 100_000
MAX_VECTOR = 1 << 27  # as the update format's MAX_ELEMENTS


@dataclass(frozen=True)
class SecAggConfig:
    round_id: int
    cohort_size: int  # n: devices are numbered 1..n (the coordinator keeps index <-> device id)
    vector_length: int  # d: model parameters; the masked vector has d + 1 entries
    neighbours: int  # k
    threshold: int  # t
    graph_seed: bytes  # 32 public random bytes: the neighbour graph's relabelling
    dropout_tolerance: float = 1 / 3  # delta: the round survives floor(delta * n) dropouts in total
    clipping_range: float = 8.0
    quantization_levels: int = 2**22
    max_weight: int = 1000
    rounding: str = "stochastic"
    clip_norm: float | None = None  # device-side L2 clip of the delta before masking
    noise_multiplier: float = 0.0  # z of the central Skellam noise (sqrt(mu) = z * Delta2); needs clip_norm
    quantizer: Quantizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise SecAggError(f"secure aggregation config: {message}")

        for name, low, high in (
            ("round_id", 0, 2**63 - 1),
            ("cohort_size", 4, MAX_COHORT),
            ("vector_length", 1, MAX_VECTOR),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                fail(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("dropout_tolerance", "clipping_range", "noise_multiplier", "clip_norm"):
            value = getattr(self, name)
            if not (value is None and name == "clip_norm") and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                fail(f"{name} must be a number, got {value!r}")
        n, k, t = self.cohort_size, self.neighbours, self.threshold
        try:
            graph.check_degree(n, k)
        except (ValueError, TypeError) as exc:
            fail(str(exc))
        if isinstance(t, bool) or not isinstance(t, int) or not k // 2 < t <= k:
            fail(f"threshold t={t!r} must be a strict majority of k={k} neighbours: in [{k // 2 + 1}, {k}]")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != 32:
            fail("graph_seed must be 32 bytes")
        if not 0 <= self.dropout_tolerance < 0.5:
            fail(f"dropout_tolerance must be in [0, 0.5), got {self.dropout_tolerance!r}")
        if k == n - 1 and self.max_dropouts > k - t:
            fail(
                f"a cohort of {n} cannot survive {self.max_dropouts} dropouts: with all {k} others as neighbours "
                f"and threshold {t}, at most {k - t} may drop; enlarge the cohort or lower dropout_tolerance"
            )
        try:
            quantizer = Quantizer(self.clipping_range, self.quantization_levels, self.max_weight, self.rounding)
            object.__setattr__(self, "quantizer", quantizer)
        except SecAggError as exc:
            fail(str(exc))
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            fail(f"clip_norm must be a positive number or None, got {self.clip_norm!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            fail(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.noise_multiplier > 0 and (self.clip_norm is None or self.max_weight != 1):
            fail("DP noise needs clip_norm set and max_weight 1 (every device counts once)")
        if n * self.max_weight > SIGNED_LIMIT:
            fail(f"{n} devices x max_weight {self.max_weight} overflows the weight entry")
        margin = self.overflow_margin
        if n * self.quantizer.entry_bound + margin > SIGNED_LIMIT:
            fail(
                f"{n} devices x {self.quantizer.entry_bound} per entry + noise margin {margin:.3g} "
                "can exceed 2^31 - 1: "
                f"at most {self.quantizer.max_cohort(margin)} devices fit these quantization levels"
            )

    # ------------------------------------------------------------ derived

    @property
    def max_dropouts(self) -> int:
        return math.floor(self.dropout_tolerance * self.cohort_size + 1e-9)

    @property
    def min_survivors(self) -> int:
        """Fewer devices than this at any phase and the round is abandoned."""
        return self.cohort_size - self.max_dropouts

    @property
    def dropout_failure(self) -> float:
        """Bound on P(random dropouts within tolerance still stall the round); 0 when impossible."""
        return graph.dropout_failure_bound(self.cohort_size, self.neighbours, self.threshold, self.max_dropouts)

    @cached_property
    def graph(self) -> dict[int, tuple[int, ...]]:
        return graph.neighbours(self.cohort_size, self.neighbours, self.round_id, self.graph_seed)

    @property
    def sensitivities(self) -> tuple[float, float]:
        """(Delta1, Delta2) of one device's quantized values; needs clip_norm."""
        if self.clip_norm is None:
            raise SecAggError("sensitivity is defined only with clip_norm set")
        return noise.sensitivities(self.clip_norm, self.quantizer.scale, self.vector_length)

    @property
    def central_variance(self) -> float:
        """mu: the Skellam variance the sum of min_survivors devices carries (quantized units)."""
        if self.noise_multiplier == 0:
            return 0.0
        return noise.central_variance(self.noise_multiplier, self.clip_norm, self.quantizer.scale, self.vector_length)

    @property
    def device_noise_variance(self) -> float:
        return self.central_variance / self.min_survivors

    @property
    def overflow_margin(self) -> float:
        """Noise headroom so the sum of all n devices' noise overflows with probability <= 1e-12."""
        return noise.overflow_margin(self.device_noise_variance * self.cohort_size, self.vector_length)

    def equivalent_noise_multiplier(self) -> float:
        """What the accountant charges (GaussianDpEvent(z)); see noise.equivalent_noise_multiplier."""
        if self.noise_multiplier == 0:
            return 0.0
        l1, l2 = self.sensitivities
        return noise.equivalent_noise_multiplier(self.central_variance, l1, l2)

    def central_noise_std(self, survivors: int) -> float:
        """Std of the noise on the de-quantized sum of deltas when `survivors` devices are summed."""
        return math.sqrt(survivors * self.device_noise_variance) / self.quantizer.scale

    # ------------------------------------------------------------ building and wire form

    @classmethod
    def create(
        cls,
        round_id: int,
        cohort_size: int,
        vector_length: int,
        *,
        dropout_tolerance: float = 1 / 3,
        neighbours: int | None = None,
        threshold: int | None = None,
        graph_seed: bytes | None = None,
        **options: Any,
    ) -> SecAggConfig:
        """A config with k, t and the graph seed derived when not given (see graph.py)."""
        dropouts = math.floor(dropout_tolerance * cohort_size + 1e-9) if isinstance(cohort_size, int) else 0
        if neighbours is None and isinstance(cohort_size, int) and cohort_size >= 2:
            neighbours = graph.derive_degree(cohort_size, dropouts)
        k = neighbours if neighbours is not None else 0
        return cls(
            round_id=round_id,
            cohort_size=cohort_size,
            vector_length=vector_length,
            neighbours=k,
            threshold=threshold if threshold is not None else graph.threshold_for(k),
            graph_seed=graph_seed if graph_seed is not None else os.urandom(32),
            dropout_tolerance=dropout_tolerance,
            **options,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"type": "secagg_config", "version": VERSION, **asdict(self)}
        del out["quantizer"]
        out["graph_seed"] = self.graph_seed.hex()
        return out

    @classmethod
    def from_dict(cls, data: object) -> SecAggConfig:
        d = obj(data, "secagg_config")
        if d.get("type") != "secagg_config" or d.get("version") != VERSION:
            raise SecAggError(f"secagg_config: expected type secagg_config version {VERSION}")
        missing = [name for name in _REQUIRED if name not in d]
        if missing:
            raise SecAggError(f"secagg_config: missing {', '.join(missing)}")
        values = {name: d[name] for name in cls.__dataclass_fields__ if name != "quantizer" and name in d}
        try:
            values["graph_seed"] = bytes.fromhex(values["graph_seed"])
        except (TypeError, ValueError):
            raise SecAggError("secagg_config: graph_seed must be 64 hex digits") from None
        try:
            return cls(**values)
        except TypeError as exc:  # a string where a number belongs, and the like
            raise SecAggError(f"secure aggregation config: {exc}") from None


_REQUIRED = ("round_id", "cohort_size", "vector_length", "neighbours", "threshold", "graph_seed")
