"""Every coordinator option in one pydantic-settings model: defaults here, `PF_*` environment
variables over them, command-line flags (generated from these fields, __main__.py) over those.
In the environment and on the command line, "none" or "null" (and an empty variable) clear an
optional setting.

Round options (the `RoundSettings` part) can also be changed at run time through
`PATCH /v1/admin/settings`; such changes apply from the next round on, on every replica, and last
until a coordinator starts with other round options than the ones they were made to (they are kept
in the database: service/cluster.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.types import EnvNoneType

from coordinator.strategies import STRATEGIES
from protocol.messages import Encoding


class RoundSettings(BaseModel):
    """What one round asks of devices and how the server folds their updates in."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    goal: int = Field(10, ge=1, le=100_000, description="updates K that complete a round")
    over_select: float = Field(1.3, ge=1.0, le=10.0, description="assign up to ceil(K * this) devices")
    deadline: float = Field(600.0, gt=0, le=7 * 86400, description="seconds a round stays open")
    min_fraction: float = Field(0.8, gt=0, le=1.0, description="fraction of K needed to commit at deadline")
    min_devices: int = Field(
        3,
        ge=1,
        le=100_000,
        description="distinct devices a round needs to commit (fewer would let the others' updates be "
        "subtracted out of the new model)",
    )
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(0.05, gt=0, le=100.0, description="device learning rate")
    momentum: float = Field(0.0, ge=0, lt=1.0, description="device SGD momentum")
    strategy: str = Field("fedavg", description="aggregation strategy: " + ", ".join(STRATEGIES))
    server_lr: float = Field(1.0, gt=0, le=100.0, description="server learning rate (eta)")
    server_momentum: float = Field(0.9, ge=0, lt=1.0, description="FedAvgM momentum")
    beta1: float = Field(0.9, ge=0, lt=1.0, description="FedAdam first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1.0, description="FedAdam second-moment decay")
    tau: float = Field(1e-3, gt=0, description="FedAdam adaptivity (epsilon)")
    fedprox_mu: float = Field(0.01, ge=0, description="FedProx proximal weight sent to devices")
    feddyn_alpha: float = Field(0.01, gt=0, le=10.0, description="FedDyn regularization alpha sent to devices")
    participation: float = Field(
        0.1, gt=0, le=1.0, description="FedDyn: the fraction of all devices one round trains (goal / population)"
    )
    encoding: Encoding = "float32"
    topk_fraction: float | None = Field(None, gt=0, le=1.0, description="top-k sparsification; None = dense")
    clip_norm: float | None = Field(None, gt=0, description="device-side L2 clipping; None = none")
    noise_multiplier: float = Field(0.0, ge=0)
    max_update_norm: float = Field(1e4, gt=0, description="server refuses deltas with a larger L2 norm")
    max_sample_count: int = Field(1_000_000, ge=1, description="server refuses larger sample counts")
    # hostile devices (coordinator/strategies/median.py, trimmed_mean.py, krum.py)
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: fraction cut from each end")
    krum_f: int = Field(2, ge=0, le=100_000, description="krum/multikrum: attackers tolerated")
    krum_m: int = Field(5, ge=1, le=100_000, description="multikrum: updates averaged")
    norm_bound: float | None = Field(
        None, gt=0, description="server clips each delta to this L2 norm before aggregation; None = no clipping"
    )
    # the default bound on one device's influence (strategies/influence.py)
    influence_bound: bool = Field(
        True, description="clip deltas and cap weights relative to the last round's honest medians"
    )
    influence_norm_multiple: float = Field(3.0, ge=1.0, le=1000, description="norm bound: this x the median norm")
    influence_count_multiple: float = Field(
        3.0, ge=1.0, le=1e6, description="weight cap: this x the median sample count"
    )
    influence_model_fraction: float = Field(
        0.2, gt=0, le=1.0, description="norm bound with no reference round yet: this x the model's L2 norm"
    )
    # client-level differential privacy on the server (strategies/dp.py, service/privacy.py)
    dp_noise_multiplier: float = Field(0.0, ge=0, le=1000, description="DP-FedAvg noise z; 0 = DP off")
    dp_clip_norm: float = Field(0.1, gt=0, description="DP clip C (the initial C with adaptive clipping)")
    dp_adaptive_clip: bool = Field(False, description="adapt C to a quantile of update norms (Andrew et al.)")
    dp_target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive clipping: target quantile")
    dp_clip_lr: float = Field(0.2, gt=0, le=10, description="adaptive clipping: geometric learning rate")
    dp_count_stddev: float | None = Field(
        None, gt=0, description="noise on the clipped-count; None = max(goal / 20, z)"
    )
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    dp_population: int | None = Field(None, ge=1, description="devices sampled from; None = enrolled")
    dp_epsilon_budget: float | None = Field(None, gt=0, description="privacy budget; None = unlimited")
    dp_on_budget: Literal["stop", "warn"] = Field(
        "stop", description="when a round would exceed the budget: stop opening rounds, or warn and go on"
    )
    dp_sampling: Literal["poisson", "unamplified"] = Field(
        "poisson",
        description="poisson: each eligible check-in is admitted with probability q, so the accountant's "
        "amplification by sampling holds; unamplified: first come, first served, charged without amplification (q = 1)",
    )
    # secure aggregation (protocol/secagg, service/secagg.py): the server learns only the cohort's sum
    secure_aggregation: bool = Field(
        False, description="SecAgg+: devices send masked updates, the server unmasks only their sum"
    )
    secagg_dropout_tolerance: float = Field(
        1 / 3, ge=0, lt=0.5, description="fraction of a secure-aggregation cohort that may drop out"
    )
    secagg_phase_timeout: float = Field(
        60.0, gt=0, le=86400, description="seconds a secure-aggregation phase waits for stragglers"
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        if name not in STRATEGIES:  # the registry, so a new strategy class needs no change here
            raise ValueError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")
        return name

    @model_validator(mode="after")
    def _goal_reaches_min_devices(self) -> RoundSettings:
        if self.goal < self.min_devices:
            raise ValueError(
                f"goal {self.goal} is below min_devices {self.min_devices}: such a round could never commit "
                "(lower min_devices explicitly for tests and demos; a round of 1-2 devices exposes their updates)"
            )
        return self

    @model_validator(mode="after")
    def _dp_needs_a_mean(self) -> RoundSettings:
        if self.dp_noise_multiplier > 0 and not STRATEGIES[self.strategy].streaming:
            raise ValueError(
                f"dp_noise_multiplier needs a mean-based strategy; {self.strategy!r} is not "
                "(DP noise is calibrated to the mean of clipped updates)"
            )
        return self

    @model_validator(mode="after")
    def _device_state_needs_plain_uploads(self) -> RoundSettings:
        if getattr(STRATEGIES[self.strategy], "device_side", False) and self.secure_aggregation:
            raise ValueError(  # the agents' secure-aggregation path keeps no FedDyn state
                f"strategy {self.strategy!r} keeps per-device state that secure aggregation rounds do not update"
            )
        return self

    @model_validator(mode="after")
    def _secagg_needs_a_sum(self) -> RoundSettings:
        if not self.secure_aggregation:
            return self
        if not STRATEGIES[self.strategy].streaming:
            raise ValueError(
                f"secure_aggregation cannot combine with strategy {self.strategy!r}: it needs every device's "
                "update, and secure aggregation reveals only their sum (use a mean-based strategy: "
                + ", ".join(n for n, s in STRATEGIES.items() if s.streaming)
                + ")"
            )
        if self.dp_adaptive_clip:
            raise ValueError("secure_aggregation cannot combine with dp_adaptive_clip (it needs each update's norm)")
        if self.goal < 4:
            raise ValueError(f"secure_aggregation needs a goal of at least 4 devices per round, got {self.goal}")
        return self

    @property
    def device_clip_norm(self) -> float | None:
        """Secure aggregation: the L2 clip each device applies before masking (the server cannot clip a
        masked update): the DP clip, else the norm bound, else the task's clip."""
        if self.dp_enabled:
            return self.dp_clip_norm
        return self.norm_bound if self.norm_bound is not None else self.clip_norm

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier > 0


MIN_SECRET_LENGTH = 16


def new_secret(nbytes: int = 24) -> str:
    """A random URL-safe secret for people to pass on (keys, codes): never starting with "-", which a
    command line would read as an option (`pf-agent --enrollment-key -x...`)."""
    while (secret := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return secret


GUESSABLE = ("change-me", "changeme", "password", "secret", "admin", "123456", "qwerty")
ENV_PREFIX = "PF_"
NONE_WORDS = ("", "none", "null")
_environ: ContextVar[Mapping[str, str] | None] = ContextVar("pf_environ", default=None)


class _PfEnvironment(EnvSettingsSource):
    """PF_* variables (from os.environ, or the mapping settings_from_env was given), where
    "none", "null" and "" (any case) mean None."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _environ.get()
        environ = os.environ if environ is None else environ
        return {k.lower(): EnvNoneType(v) if v.lower() in NONE_WORDS else v for k, v in environ.items()}


class Settings(BaseSettings, RoundSettings):
    """Process-level options plus the round defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_parse_none_str="none",  # what turns EnvNoneType into None (see _PfEnvironment)
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: str = Field(
        "pocketfed.db",
        description="SQLite file (model versions live beside it), or postgresql://user@host:port/dbname",
    )
    model: str = Field("lenet", description="built-in architecture name or a pocketfed model file")
    model_seed: int = 0
    eval_data: str | None = Field(None, description="held-out dataset for server-side evaluation")
    personalize_tasks: bool = Field(
        True,
        description="offer devices that declare support a personalize-only task for each new version they lack "
        "(no global training; they upload accuracies only)",
    )
    personal_epochs: int = Field(
        5, ge=1, le=100, description="passes over the local data a personalize task asks of the personal layers"
    )
    metrics_task_seconds: float = Field(
        600.0, gt=0, le=86400, description="how long a device has to report an evaluate or personalize task"
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest upload or model file body")
    max_json_body_bytes: int = Field(
        64 * 1024, ge=1024, le=64 * 1024 * 1024, description="largest body of every other (JSON) route"
    )
    body_grace_seconds: float = Field(
        10.0, gt=0, le=3600, description="a body may take this long before its rate counts"
    )
    min_body_rate: float = Field(
        4096.0, gt=0, description="bytes/s a request body must average after the grace period (408 otherwise)"
    )
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024, description="request line and headers (431)")
    header_timeout: float = Field(
        10.0, gt=0, le=600, description="seconds to send a request's headers, and idle keep-alive"
    )
    max_update_header_bytes: int = Field(
        1024 * 1024, ge=4096, le=64 * 1024 * 1024, description="JSON header of an uploaded update container"
    )
    max_concurrent_uploads: int = Field(
        16,
        ge=1,
        le=10_000,
        description="uploads read and validated at once; the rest wait unread, so memory is bounded, not per device",
    )
    enrollment_key: str | None = Field(None, description="None: a random key is generated and logged")
    admin_token: str | None = Field(None, description="None: the admin API is disabled")
    device_token_idle_days: float = Field(
        90.0, gt=0, le=36500, description="a device token stops working after this many days without a check-in"
    )
    insecure_dev: bool = Field(False, description="local demos only: allow short or guessable secrets")
    enroll_per_address: int = Field(
        60, ge=1, le=1_000_000, description="enrollments per client address per minute (429 beyond)"
    )
    enroll_failures_per_address: int = Field(
        10, ge=1, le=1_000_000, description="wrong keys or codes per client address per minute (429 beyond)"
    )
    enroll_failures_total: int = Field(
        100, ge=1, le=1_000_000, description="wrong keys or codes per minute from all addresses (429 beyond)"
    )
    tick_interval: float = Field(1.0, gt=0, description="seconds between background deadline checks")
    min_retry_after: float = Field(5.0, ge=0, description="shortest retry-after told to devices")
    max_retry_after: float = Field(600.0, gt=0, description="longest retry-after told to devices")
    log_level: str = "info"
    ssl_certfile: str | None = Field(None, description="serve HTTPS with this PEM certificate (chain)")
    ssl_keyfile: str | None = Field(None, description="the certificate's PEM private key")
    # replicas on one PostgreSQL database (service/cluster.py)
    lease_seconds: float = Field(
        10.0,
        ge=1.0,
        le=3600,
        description="PostgreSQL replicas: the background-work lease lasts this long unless renewed; "
        "when its holder dies another replica takes over after it",
    )
    # safe releases (service/releases.py)
    release_tolerance: float = Field(
        0.02,
        ge=0,
        le=1,
        description="hold back a candidate whose accuracy (held-out, or federated in its canary) is below "
        "the released version's by more than this",
    )
    canary_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of devices (by id hash) that get a candidate first, in a canary round; 0 = no canary",
    )
    max_populations: int = Field(
        16,
        ge=0,
        le=1000,
        description="named populations an operator may create besides the default (each runs its own services)",
    )
    db_pool_size: int = Field(
        4, ge=1, le=64, description="PostgreSQL: pooled read connections per replica (up to twice this under load)"
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *_sources: Any, **_: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _PfEnvironment(settings_cls)  # arguments over PF_* variables; no .env files

    def weak_secrets(self) -> list[str]:
        """What is wrong with the configured secrets (empty: fine); refused at start unless insecure_dev."""
        problems = []
        for name in ("enrollment_key", "admin_token"):
            value = getattr(self, name)
            if value is not None and (
                len(value) < MIN_SECRET_LENGTH
                or len(set(value)) < 8
                or any(word in value.lower() for word in GUESSABLE)
            ):
                problems.append(
                    f"{name}: too short or guessable (use at least {MIN_SECRET_LENGTH} random characters, "
                    "e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
                )
        return problems

    def round_settings(self) -> RoundSettings:
        return RoundSettings(**{name: getattr(self, name) for name in RoundSettings.model_fields})


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `PF_<FIELD>` variables (os.environ, or `environ`), then explicit overrides
    (the command line: None means 'not given', the text "none" clears an optional setting)."""
    given = {
        name: None if isinstance(value, str) and value.lower() in NONE_WORDS[1:] else value
        for name, value in overrides.items()
        if value is not None
    }
    token = _environ.set(environ)
    try:
        return Settings(**given)
    finally:
        _environ.reset(token)
