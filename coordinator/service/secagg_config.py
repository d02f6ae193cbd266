"""A secure-aggregation round's parameters (service/secagg.py runs the rounds): the SecAggConfig a
round's settings give, the noise the accountant charges for it, and the phases' tables."""

from __future__ import annotations

from coordinator.settings import RoundSettings

PROTOCOL_PHASES = ("advertise", "share_keys", "masked_input", "unmask")
MIN_COHORT = 4
DEFAULT_MAX_WEIGHT = 1000  # sample counts are capped here before masking (Flower's default)
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
