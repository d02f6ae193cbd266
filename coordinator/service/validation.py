"""Strict checks on an uploaded update before it may touch a round's aggregate."""

from __future__ import annotations

import math

import numpy as np

from coordinator.errors import Refused
from engine.serialize.container import ContainerError
from protocol.deltas import global_l2_norm
from protocol.update import MAX_HEADER_BYTES, Update, decode_update


def check_update(
    body: bytes,
    *,
    round_id: int,
    base_version: int,
    expected: dict[str, tuple[int, ...]],
    max_norm: float,
    max_sample_count: int,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[Update, float]:
    """Decode `body` against the base model's shapes; return (update, its L2 norm) or raise 422."""
    if not body:
        raise Refused(422, "body: empty; expected an update container (application/octet-stream)", "bad_update")
    try:
        update = decode_update(body, expected=expected, max_header_bytes=max_header_bytes)
    except ContainerError as exc:
        raise Refused(422, f"update: {exc}", "bad_update") from None
    except (ValueError, RecursionError) as exc:  # json's own limits (huge integers, deep nesting)
        raise Refused(422, f"update: header is not acceptable JSON: {exc}", "bad_update") from None
    if update.round_id != round_id:
        raise Refused(
            422, f"update.round_id {update.round_id} does not match the URL's round {round_id}", "wrong_round"
        )
    if update.base_version != base_version:
        raise Refused(
            422,
            f"update.base_version {update.base_version} does not match round {round_id}'s base version {base_version}",
            "wrong_base_version",
        )
    if update.sample_count > max_sample_count:
        raise Refused(
            422, f"update.sample_count {update.sample_count} exceeds the limit {max_sample_count}", "sample_count"
        )
    norm = global_l2_norm(update.delta)
    if not math.isfinite(norm):  # decode_update checks this too; the aggregate depends on it. A float64
        # sum of squares of finite float16/float32 values is finite, so one pass checks both
        for name, value in update.delta.items():
            if not np.all(np.isfinite(value)):
                raise Refused(422, f"update tensor {name!r}: contains NaN or Inf", "non_finite")
        raise Refused(422, "update: the L2 norm of the delta is not finite", "non_finite")
    if norm > max_norm:
        raise Refused(422, f"update: L2 norm {norm:.6g} of the delta exceeds the bound {max_norm:g}", "norm")
    return update, norm
