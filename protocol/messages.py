"""The JSON messages of the device protocol, as plain dataclasses.

The coordinator builds them and serves them (its pydantic schemas embed these very classes, so
the OpenAPI document and the device agent read one definition); the agent parses them with
`from_dict`, which needs nothing beyond the standard library. A parser is strict about the
fields it knows (types, ranges) and ignores fields it does not, so a newer server can add
a field without breaking older devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Encoding = Literal["float32", "float16", "int8", "int4", "int4-bitmap"]
ENCODINGS: tuple[str, ...] = ("float32", "float16", "int8", "int4", "int4-bitmap")
TaskKind = Literal["train", "evaluate", "personalize"]
TASK_KINDS: tuple[str, ...] = ("train", "evaluate", "personalize")
# The kinds that train nothing global: the device uploads only metrics (POST /v1/federated-metrics). A server
# sends them only to devices that listed them in the check-in's `task_kinds` (older agents never see one).
METRICS_ONLY_KINDS: tuple[str, ...] = ("evaluate", "personalize")


class ProtocolError(ValueError):
    """A message from the other side does not follow the protocol; the text names the field."""


def _number(data: dict, name: str, *, optional: bool = False, integer: bool = False, minimum: float | None = None):
    value = data.get(name)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"{name}: missing")
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ProtocolError(f"{name}: {value!r} is not a finite {'integer' if integer else 'number'}")
    if minimum is not None and value < minimum:
        raise ProtocolError(f"{name}: {value!r} is below {minimum}")
    return int(value) if integer else float(value)


def _object(data: object, what: str) -> dict:
    if not isinstance(data, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Task:
    """What a round asks of one device: train `epochs` over its data from `base_version`, then
    send the delta (clipped, noised, sparsified and encoded as told) before `deadline`.

    `kind` (absent: "train") may instead ask for metrics only: "evaluate" measures `base_version`
    and the personal model on top of it on the held-out data; "personalize" first adopts
    `base_version` and fine-tunes the personal layers on it (`epochs` passes). Neither uploads a delta."""

    round_id: int
    base_version: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    deadline: float  # unix seconds; an update after it is refused
    fedprox_mu: float = 0.0  # FedProx proximal weight (0: plain local SGD)
    feddyn_alpha: float = 0.0  # FedDyn: train on L - <g, w> + alpha/2 ||w - base||^2, keep g (0: off)
    clip_norm: float | None = None  # device-side L2 clip of the delta
    noise_multiplier: float = 0.0  # Gaussian noise std = this * clip_norm (or this, unclipped)
    encoding: Encoding = "float32"
    topk_fraction: float | None = None  # send only this fraction of each tensor (error feedback keeps the rest)
    secure_aggregation: bool = False  # send the delta masked, through /v1/rounds/{id}/secagg (not /updates)
    kind: TaskKind = "train"

    @property
    def trains_global(self) -> bool:
        return self.kind == "train"

    @classmethod
    def from_dict(cls, data: object) -> Task:
        d = _object(data, "task")
        kind = d.get("kind", "train")
        if kind not in TASK_KINDS:
            raise ProtocolError(f"kind: {kind!r} is not one of {', '.join(TASK_KINDS)}")
        encoding = d.get("encoding", "float32")
        if encoding not in ENCODINGS:
            raise ProtocolError(f"encoding: {encoding!r} is not one of {', '.join(ENCODINGS)}")
        topk = _number(d, "topk_fraction", optional=True, minimum=0.0)
        if topk is not None and not 0.0 < topk <= 1.0:
            raise ProtocolError(f"topk_fraction: {topk!r} is not in (0, 1]")
        clip = _number(d, "clip_norm", optional=True, minimum=0.0)
        return cls(
            round_id=_number(d, "round_id", integer=True, minimum=0),
            base_version=_number(d, "base_version", integer=True, minimum=0),
            epochs=_number(d, "epochs", integer=True, minimum=1),
            batch_size=_number(d, "batch_size", integer=True, minimum=1),
            lr=_number(d, "lr", minimum=0.0),
            momentum=_number(d, "momentum", optional=True, minimum=0.0) or 0.0,
            deadline=_number(d, "deadline"),
            fedprox_mu=_number(d, "fedprox_mu", optional=True, minimum=0.0) or 0.0,
            feddyn_alpha=_number(d, "feddyn_alpha", optional=True, minimum=0.0) or 0.0,
            clip_norm=clip or None,
            noise_multiplier=_number(d, "noise_multiplier", optional=True, minimum=0.0) or 0.0,
            encoding=encoding,
            topk_fraction=topk,
            secure_aggregation=_flag(d, "secure_aggregation"),
            kind=kind,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.secure_aggregation:  # plain rounds' tasks stay as they were on the wire
            del out["secure_aggregation"]
        if not self.feddyn_alpha:
            del out["feddyn_alpha"]
        return out


def _flag(d: dict[str, Any], name: str) -> bool:
    value = d.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{name}: {value!r} is not true or false")
    return value


@dataclass(frozen=True)
class CheckinAnswer:
    """POST /v1/checkin's answer: a task, or when to come back (pace steering)."""

    status: Literal["task", "retry"]
    task: Task | None = None
    retry_after: int | None = None  # seconds; also sent as the Retry-After header
    reason: str | None = None

    @classmethod
    def from_dict(cls, data: object) -> CheckinAnswer:
        d = _object(data, "check-in answer")
        status = d.get("status")
        if status == "task":
            return cls("task", task=Task.from_dict(d.get("task")))
        if status == "retry":
            reason = d.get("reason")
            return cls(
                "retry",
                retry_after=_number(d, "retry_after", integer=True, minimum=0),
                reason=reason if isinstance(reason, str) else None,
            )
        raise ProtocolError(f"status: {status!r} is neither 'task' nor 'retry'")

    def to_dict(self) -> dict[str, Any]:
        """The wire form: a retry answer carries no null fields."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["task"] = self.task.to_dict() if self.task else None
        return {k: v for k, v in out.items() if v is not None} if self.status == "retry" else out


@dataclass(frozen=True)
class UploadReceipt:
    """The 202 for an accepted update (replayed as-is for a retry with the same Idempotency-Key)."""

    accepted: bool
    round_id: int
    received: int  # updates the round holds, this one included
    goal: int

    @classmethod
    def from_dict(cls, data: object) -> UploadReceipt:
        d = _object(data, "upload answer")
        if d.get("accepted") is not True:
            raise ProtocolError(f"accepted: {d.get('accepted')!r} is not true")
        return cls(
            accepted=True,
            round_id=_number(d, "round_id", integer=True, minimum=0),
            received=_number(d, "received", integer=True, minimum=0),
            goal=_number(d, "goal", integer=True, minimum=0),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FederatedMetrics:
    """POST /v1/federated-metrics: what an evaluate or personalize task measured on the device's held-out data
    (accuracies only, and how many held-out examples they cover: never the data)."""

    version: int  # the base version measured
    kind: Literal["evaluate", "personalize"]
    global_accuracy: float  # the base model as served
    personal_accuracy: float  # the base model with the device's personal layers
    samples: int  # held-out examples behind the two accuracies
    global_loss: float | None = None
    personal_loss: float | None = None

    @classmethod
    def from_dict(cls, data: object) -> FederatedMetrics:
        d = _object(data, "metrics")
        kind = d.get("kind")
        if kind not in METRICS_ONLY_KINDS:
            raise ProtocolError(f"kind: {kind!r} is not one of {', '.join(METRICS_ONLY_KINDS)}")
        out = cls(
            version=_number(d, "version", integer=True, minimum=0),
            kind=kind,
            global_accuracy=_number(d, "global_accuracy", minimum=0.0),
            personal_accuracy=_number(d, "personal_accuracy", minimum=0.0),
            samples=_number(d, "samples", integer=True, minimum=1),
            global_loss=_number(d, "global_loss", optional=True, minimum=0.0),
            personal_loss=_number(d, "personal_loss", optional=True, minimum=0.0),
        )
        for name in ("global_accuracy", "personal_accuracy"):
            if getattr(out, name) > 1.0:
                raise ProtocolError(f"{name}: {getattr(out, name)!r} is above 1")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
