"""`pf-coordinator` / `python -m coordinator`: parse options and serve the app with uvicorn.

Every flag is generated from a Settings field (`--enrollment-key` from `enrollment_key`); values
stay text here and are validated by Settings, exactly as the same value in PF_<FIELD> would be.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from coordinator.settings import Settings, env_name, settings_from_env


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pf-coordinator",
        description="Run the pocketfed coordinator. Every option can also be set as PF_<OPTION> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}  # `--flag` alone: true
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            **switch,
            help=f"{field.description or ''} (default {field.default!r}; env {env_name(name)})",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_env(**vars(args))
    except ValidationError as exc:
        sys.exit(f"pf-coordinator: bad option: {exc}")
    weak = settings.weak_secrets()
    if weak and not settings.insecure_dev:
        sys.exit("pf-coordinator: refusing to start with weak secrets (--insecure-dev allows them): " + "; ".join(weak))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvicorn

    from coordinator.api import create_app
    from coordinator.serving import server_config
    from coordinator.store import describe

    try:
        app = create_app(settings)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        sys.exit(f"pf-coordinator: cannot start (database {describe(settings.db)}): {exc}")
    uvicorn.Server(server_config(app, settings)).run()


if __name__ == "__main__":
    main()
