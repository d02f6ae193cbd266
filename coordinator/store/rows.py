"""Typed rows: what the store hands out instead of dicts. A round's JSON config is parsed once here,
into RoundSettings, and the parsed settings are shared by every row with the same config text
(treat them as read-only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from coordinator.settings import RoundSettings

_parsed: dict[str, RoundSettings] = {}


def parse_config(text: str) -> RoundSettings:
    """A round's stored config; fields a newer version dropped are ignored, missing ones take defaults."""
    settings = _parsed.get(text)
    if settings is None:
        values = json.loads(text)
        settings = RoundSettings(**{k: v for k, v in values.items() if k in RoundSettings.model_fields})
        if len(_parsed) >= 64:
            _parsed.clear()
        _parsed[text] = settings
    return settings


@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: str
    name: str | None
    created_at: float
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class ModelVersionRow:
    version: int
    sha256: str
    filename: str
    architecture: str
    size_bytes: int
    num_parameters: int
    created_at: str
    round_id: int | None
    accuracy: float | None
    eval_loss: float | None
    eval_n: int | None


@dataclass(frozen=True, slots=True)
class RoundRow:
    id: int
    base_version: int
    status: str  # open | committed | abandoned
    config: RoundSettings
    goal: int
    max_assignments: int
    min_updates: int
    opened_at: float
    deadline: float
    closed_at: float | None
    reason: str | None
    received: int
    total_weight: float
    result_version: int | None
    dp_clip: float | None
    dp_q: float | None
    dp_noise: float | None
    epsilon: float | None
    canary: int = 0  # 1: a canary round, on a candidate, for the canary devices only
    aggregate: bytes | None = None  # read only when asked for (the writer, a commit, the audit)

    @classmethod
    def from_row(cls, row: Any) -> RoundRow:
        return cls(row[0], row[1], row[2], parse_config(row[3]), *row[4:])

    @property
    def is_open(self) -> bool:
        return self.status == "open"


@dataclass(frozen=True, slots=True)
class NewRound:
    """What opening a round writes; the store assigns the id."""

    base_version: int
    config: RoundSettings
    goal: int
    max_assignments: int
    min_updates: int
    opened_at: float
    deadline: float
    dp_clip: float | None = None
    dp_q: float | None = None
    dp_noise: float | None = None
    canary: bool = False


@dataclass(frozen=True, slots=True)
class UpdateRow:
    round_id: int
    device_id: str
    idempotency_key: str
    sample_count: int
    norm: float
    encoding: str
    metrics: dict[str, float]
    received_at: float
    response: dict[str, Any]  # the 202 body, replayed for the same Idempotency-Key
    delta: bytes | None = None  # only for non-streaming strategies, and only when asked for
    replica: str | None = None  # the coordinator replica that acknowledged it

    @classmethod
    def from_row(cls, row: Any) -> UpdateRow:
        """From (round_id, ..., response, replica), without the delta."""
        return cls(*row[:6], json.loads(row[6]), row[7], json.loads(row[8]), replica=row[9])


@dataclass(frozen=True, slots=True)
class PartialRow:
    """One replica's share of an open round: what it acknowledged, and their running sum."""

    round_id: int
    replica: str
    received: int
    total_weight: float
    aggregate: bytes | None = None  # read only when asked for; NULL once the round closed


@dataclass(frozen=True, slots=True)
class SecAggRow:
    """A secure-aggregation round's durable state (service/secagg.py)."""

    round_id: int
    phase: str
    members: list[str]  # device ids; a device's protocol index is its position + 1
    phase_started: float
    revision: int
    state: bytes | None  # None when not read (see has_state) or when there is no session yet
    state_revision: int  # the revision `state` was written at; messages after it are in secagg_messages
    reason: str | None
    has_state: bool = False

    @classmethod
    def from_row(cls, row: Any) -> SecAggRow:
        """From (round_id, phase, members, phase_started, revision, state or None, state_revision, reason,
        has_state)."""
        return cls(row[0], row[1], json.loads(row[2]), row[3], row[4], _bytes(row[5]), row[6], row[7], bool(row[8]))


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class ReleaseRow:
    """One change of the released version (or a decision on a candidate), with who and why."""

    id: int
    version: int
    action: str
    actor: str
    reason: str
    at: float
