"""Request and response bodies of the HTTP API (they also document it in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.settings import RoundSettings
from protocol.messages import Encoding, Task


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollRequest(Strict):
    enrollment_key: str = Field(..., min_length=1, max_length=512)
    name: str | None = Field(None, max_length=200)


class EnrollResponse(BaseModel):
    device_id: str
    token: str = Field(..., description="bearer token; shown once, stored only as a hash")


class DeviceInfo(BaseModel):
    device_id: str
    name: str | None
    created_at: float
    rounds_assigned: int
    updates_accepted: int


class ModelVersionInfo(BaseModel):
    version: int
    sha256: str
    architecture: str
    size_bytes: int
    num_parameters: int
    created_at: str


class FederatedEvaluation(BaseModel):
    """How a version did on the devices' own held-out data (evaluate and personalize tasks)."""

    devices: int = Field(..., description="devices that reported")
    samples: int = Field(..., description="held-out examples behind the means")
    global_accuracy: float = Field(..., description="sample-weighted mean accuracy of the version as served")
    personal_accuracy: float = Field(..., description="the same with each device's personal layers")
    personalization_lift: float = Field(..., description="personal_accuracy - global_accuracy")

    @classmethod
    def of(cls, m) -> FederatedEvaluation | None:
        if m is None:
            return None
        return cls(
            devices=m.devices,
            samples=m.samples,
            global_accuracy=m.global_accuracy,
            personal_accuracy=m.personal_accuracy,
            personalization_lift=m.lift,
        )


class MetricsReport(Strict):
    """POST /v1/federated-metrics: what an evaluate or personalize task measured (protocol FederatedMetrics)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: int = Field(..., ge=0, le=2**62)
    kind: Literal["evaluate", "personalize"]
    global_accuracy: float = Field(..., ge=0, le=1)
    personal_accuracy: float = Field(..., ge=0, le=1)
    samples: int = Field(..., ge=1, le=10**9)
    global_loss: float | None = Field(None, ge=0, le=1e9)
    personal_loss: float | None = Field(None, ge=0, le=1e9)


class ModelVersionListing(ModelVersionInfo):
    """One entry of GET /v1/models: the version's file plus how it scored on the server's held-out set."""

    round_id: int | None = Field(None, description="the round that produced it; null for a published model")
    accuracy: float | None = Field(
        None,
        description="server-side evaluation; null until evaluated or when the coordinator runs without --eval-data",
    )
    loss: float | None = Field(None, description="server-side evaluation loss (null as for accuracy)")
    eval_samples: int | None = Field(None, description="examples the evaluation used")
    release: str | None = Field(
        None,
        description="released | pinned | canary | candidate (awaiting the gate) | held (held back) | "
        "superseded | rolled back (released once, then an older one again) | retired (released once, replaced since)",
    )
    federated: FederatedEvaluation | None = Field(None, description="devices' own evaluation; null until reported")


class CheckinRequest(Strict):
    eligible: bool = True
    num_samples: int | None = Field(None, ge=0, le=10**9)
    task_kinds: list[Literal["train", "evaluate", "personalize"]] = Field(
        default_factory=list,
        max_length=8,
        description="task kinds the device can do besides training (absent: train only)",
    )


class CheckinResponse(BaseModel):
    status: Literal["task", "retry"]
    task: Task | None = None
    retry_after: int | None = Field(None, description="seconds to wait before checking in again")
    reason: str | None = None


class SecAggStatus(BaseModel):
    """GET/POST /v1/rounds/{id}/secagg...: where the device's secure-aggregation round stands."""

    round_id: int
    phase: Literal["joining", "advertise", "share_keys", "masked_input", "unmask", "done", "abandoned"]
    joined: bool
    index: int | None = Field(None, description="this device's protocol index 1..n once the cohort is fixed")
    cohort_size: int
    config: dict | None = Field(None, description="the round's secagg_config (protocol/secagg/params.py)")
    layout: list[tuple[str, list[int]]] | None = Field(None, description="tensor names and shapes, in vector order")
    message: dict | None = Field(None, description="the server message due to this device in this phase")
    expected: bool = Field(False, description="this phase takes a message from this device")
    waiting: bool = Field(False, description="the server still waits for this device's message")
    reason: str | None = None
    retry_after: float


class SecAggAccepted(BaseModel):
    accepted: bool = Field(..., description="false: the same message was accepted before (a replay)")
    phase: str
    status: SecAggStatus | None = Field(
        None, description="with ?wait=: the device's status once there is news (as GET .../secagg?since=&wait=)"
    )


class UploadAccepted(BaseModel):
    accepted: bool
    round_id: int
    received: int
    goal: int


class RoundSummary(BaseModel):
    id: int
    status: Literal["open", "committed", "abandoned"]
    base_version: int
    goal: int
    max_assignments: int
    min_updates: int
    assigned: int
    received: int
    total_samples: float
    opened_at: float
    deadline: float
    closed_at: float | None
    reason: str | None
    result_version: int | None
    strategy: str
    epsilon: float | None = Field(None, description="DP: epsilon spent after this round (at dp_delta)")
    dp_delta: float | None = None
    dp_clip_norm: float | None = Field(None, description="DP: the clip C this round used")
    dp_sampling_rate: float | None = Field(None, description="DP: q = goal / population (1: no amplification)")
    dp_sampling: str | None = Field(
        None, description="DP: poisson (admitted with probability q) or unamplified (first come; q = 1)"
    )
    secure_aggregation: bool = Field(False, description="the server saw only the cohort's masked sum")
    secagg_phase: str | None = Field(None, description="secure aggregation: joining, advertise, ..., done, abandoned")
    secagg_cohort: int | None = Field(None, description="secure aggregation: devices in the cohort")
    federated: FederatedEvaluation | None = Field(
        None, description="devices' own evaluation of the version this round produced (null until reported)"
    )

    dp_sampling_rate: float | None = Field(None, description="DP: q = goal / population")
    canary: bool = Field(False, description="a canary round: on a candidate, for the canary devices only")


class Participant(BaseModel):
    device_id: str
    sample_count: int
    norm: float
    encoding: str
    received_at: float
    metrics: dict[str, float]


class RoundDetail(RoundSummary):
    config: RoundSettings
    metrics: dict[str, float] = Field(..., description="sample-weighted mean of the devices' metrics")
    participants: list[Participant] | None = Field(
        None, description="per-device detail, with the admin token only (public: aggregates, None here)"
    )


class PublishResponse(BaseModel):
    version: int
    sha256: str


class PauseState(BaseModel):
    paused: bool


class SettingsPatch(Strict):
    """Any subset of the round settings; validated like the command-line options."""

    goal: int | None = None
    over_select: float | None = None
    deadline: float | None = None
    min_fraction: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    strategy: str | None = None
    server_lr: float | None = None
    server_momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    fedprox_mu: float | None = None
    feddyn_alpha: float | None = None
    participation: float | None = None
    encoding: Encoding | None = None
    topk_fraction: float | None = None
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    max_update_norm: float | None = None
    max_sample_count: int | None = None
    trim_beta: float | None = None
    krum_f: int | None = None
    krum_m: int | None = None
    norm_bound: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clip_norm: float | None = None
    dp_adaptive_clip: bool | None = None
    dp_target_quantile: float | None = None
    dp_clip_lr: float | None = None
    dp_count_stddev: float | None = None
    dp_delta: float | None = None
    dp_population: int | None = None
    dp_epsilon_budget: float | None = None
    dp_on_budget: Literal["stop", "warn"] | None = None
    dp_sampling: Literal["poisson", "unamplified"] | None = None
    secure_aggregation: bool | None = None
    secagg_dropout_tolerance: float | None = None
    secagg_phase_timeout: float | None = None


class Health(BaseModel):
    status: str
    model_version: int
    round_id: int | None
    paused: bool


class ReleaseChange(Strict):
    """An operator's release change; `reason` is required and recorded with `by` in the release audit."""

    version: int = Field(..., ge=0, le=2**62)
    reason: str = Field(..., min_length=1, max_length=500)
    by: str = Field("admin", min_length=1, max_length=100, description="who makes the change (for the audit)")


class Unpin(Strict):
    reason: str = Field(..., min_length=1, max_length=500)
    by: str = Field("admin", min_length=1, max_length=100)


class ReleaseStateInfo(BaseModel):
    released: int = Field(..., description="the version devices get as their base (GET /v1/models/latest)")
    canary: int | None = Field(None, description="the candidate the canary devices get first, if any")
    pinned: bool = Field(False, description="candidates wait while the operator pins the released version")


class ReleaseEvent(BaseModel):
    id: int
    version: int
    action: str = Field(..., description="released | canary | promoted | held | superseded | pinned | rollback | ...")
    actor: str = Field(..., description='who: "release-gate", "system" or the operator')
    reason: str
    at: float


class Releases(ReleaseStateInfo):
    events: list[ReleaseEvent] = Field(..., description="the release audit, newest first")


class PopulationInfo(BaseModel):
    name: str
    architecture: str
    created_at: float | None = Field(None, description="null for the default population")
    created_by: str | None = None
    released_version: int
    devices: int = Field(..., description="devices enrolled")
    api: str = Field(..., description="the population's API prefix")


class PopulationCreated(BaseModel):
    name: str
    enrollment_key: str = Field(..., description="shown once; stored only as its sha256")
    version: int
    sha256: str
    api: str


class EnrollmentCodesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, le=10_000, description="how many one-time codes")
    ttl_seconds: float = Field(7 * 86400, gt=0, le=365 * 86400, description="seconds until unused codes expire")


class EnrollmentCodes(BaseModel):
    codes: list[str] = Field(..., description="each enrolls one device once (as enrollment_key); shown only now")
    expires_at: float
