"""A secure-aggregation round's parameters (service/secagg.py runs the rounds): the SecAggConfig a
round's settings give, the noise the accountant charges for it, and the phases' tables."""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator.settings import RoundSettings
from coordinator.store import RoundRow, SecAggRow

PROTOCOL_PHASES = ("advertise", "share_keys", "masked_input", "unmask")
MIN_COHORT = 4
DEFAULT_MAX_WEIGHT = 1000  # sample counts are capped here before masking (Flower's default)
JOINING, DONE, ABANDONED = "joining", "done", "abandoned"
POLL_SECONDS = 0.25  # what devices are told to wait between looks while others answer
# message kind (URL) -> (the phase that takes it, the ServerSession method)
RECEIVERS = {
    "advertise": ("advertise", "receive_advertise"),
    "shares": ("share_keys", "receive_shares"),
    "masked_input": ("masked_input", "receive_masked"),
    "unmask": ("unmask", "receive_unmask"),
}
CLOSERS = {
    "advertise": "close_advertise",
    "share_keys": "close_share_keys",
    "masked_input": "close_masked_input",
    "unmask": "finish",
}


def require_cryptography() -> None:
    """Fail at startup (or on a settings change) when secure aggregation is on and `cryptography` is missing."""
    try:
        import protocol.secagg  # noqa: F401
    except ImportError as exc:
        need = "secure_aggregation needs the cryptography package: pip install 'pocketfed[secagg]'"
        raise ValueError(f"{need} ({exc})") from None


def secagg_config(cfg: RoundSettings, round_id: int, cohort: int, vector_length: int, graph_seed: bytes | None = None):
    """The round's SecAggConfig: device-side clip, distributed DP noise (max_weight 1) when DP is on."""
    from protocol.secagg import SecAggConfig

    dp = cfg.dp_enabled
    return SecAggConfig.create(
        round_id,
        cohort,
        vector_length,
        dropout_tolerance=cfg.secagg_dropout_tolerance,
        graph_seed=graph_seed,
        clip_norm=cfg.device_clip_norm,
        noise_multiplier=cfg.dp_noise_multiplier if dp else 0.0,
        max_weight=1 if dp else min(DEFAULT_MAX_WEIGHT, cfg.max_sample_count),
        rounding="stochastic" if dp else "deterministic",  # without DP noise: a seeded run is reproducible
    )


def charged_noise_multiplier(cfg: RoundSettings, vector_length: int) -> float:
    """The Gaussian z the accountant charges for a round's distributed Skellam noise (noise.py)."""
    return secagg_config(cfg, 0, max(cfg.goal, MIN_COHORT), vector_length, bytes(32)).equivalent_noise_multiplier()


def wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def snapshot(row: SecAggRow, session) -> dict[str, Any]:
    """The session's state as of the row's revision (the messages up to it are folded in)."""
    return {"state": session.to_bytes(), "state_revision": row.revision}


def closes_at(r: RoundRow, row: SecAggRow) -> float:
    """When the current phase closes without its stragglers. The cohort waits for `goal` devices until
    there is just time left for the four phases before the deadline; a phase waits its timeout."""
    timeout = r.config.secagg_phase_timeout
    if row.phase == JOINING:
        return max(row.phase_started + timeout, r.deadline - len(PROTOCOL_PHASES) * timeout)
    return row.phase_started + timeout


def expected_from(session) -> set[int]:
    """Devices the session's current phase takes a message from."""
    return {
        "advertise": set(range(1, session.config.cohort_size + 1)),
        "share_keys": set(session.keys),
        "masked_input": set(session.commitments),
        "unmask": set(session.masked),
    }.get(session.phase, set())
