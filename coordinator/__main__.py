"""`pf-coordinator` / `python -m coordinator`: parse options and serve the app with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys

from pydantic import ValidationError

from coordinator.settings import Settings, env_name, settings_from_env

FLAGS = [
    "host",
    "port",
    "db",
    "model",
    "model_seed",
    "eval_data",
    "goal",
    "over_select",
    "deadline",
    "min_fraction",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "strategy",
    "server_lr",
    "server_momentum",
    "beta1",
    "beta2",
    "tau",
    "fedprox_mu",
    "encoding",
    "topk_fraction",
    "clip_norm",
    "noise_multiplier",
    "max_update_norm",
    "max_sample_count",
    "trim_beta",
    "krum_f",
    "krum_m",
    "norm_bound",
    "dp_noise_multiplier",
    "dp_clip_norm",
    "dp_adaptive_clip",
    "dp_target_quantile",
    "dp_clip_lr",
    "dp_count_stddev",
    "dp_delta",
    "dp_population",
    "dp_epsilon_budget",
    "dp_on_budget",
    "max_body_bytes",
    "max_concurrent_uploads",
    "enrollment_key",
    "admin_token",
    "tick_interval",
    "min_retry_after",
    "max_retry_after",
    "log_level",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pf-coordinator",
        description="Run the pocketfed coordinator. Every option can also be set as PF_<OPTION> in the environment.",
    )
    for name in FLAGS:
        field = Settings.model_fields[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{field.description or ''} (default {field.default!r}; env {env_name(name)})",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_env(**vars(args))
    except ValidationError as exc:
        sys.exit(f"pf-coordinator: bad option: {exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvicorn

    from coordinator.app import create_app

    try:
        app = create_app(settings)
    except (OSError, ValueError, sqlite3.Error) as exc:
        sys.exit(f"pf-coordinator: cannot start (database {settings.db}): {exc}")
    # h11, not httptools, even when installed: h11 caps a request's headers (a 1 MB header gets a 4xx,
    # tests/test_hostile_input.py), httptools has no such limit.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False, http="h11"
    )


if __name__ == "__main__":
    main()
