"""Device learning-rate schedules over rounds: the lr a round's task gives its devices.

On a pathological non-IID split the global model oscillates late in training: each round's devices
drift towards their own two classes. Shrinking the local step over the rounds (as the FedDyn and
SCAFFOLD papers' experiments do with a per-round decay) damps that drift once the model is close.

    constant: lr
    cosine:   lr * (final + (1 - final) * (1 + cos(pi * (round - 1) / rounds)) / 2)

`round` counts from 1; round 1 trains at `lr`, the last round just above `lr * final`.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, round_id: int, rounds: int, schedule: str = "constant", final: float = 0.0) -> float:
    """The device learning rate for round `round_id` of `rounds`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 1 <= round_id <= rounds or not 0 <= final <= 1:
        raise ValueError(f"need 1 <= round <= rounds and 0 <= final <= 1, got {round_id}, {rounds}, {final}")
    if schedule == "constant":
        return float(lr)
    return float(lr) * (final + (1 - final) * (1 + math.cos(math.pi * (round_id - 1) / rounds)) / 2)
