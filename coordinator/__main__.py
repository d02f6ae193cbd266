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
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}  # --flag alone means true
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            help=f"{field.description or ''} (default {field.default!r}; env {env_name(name)})",
            **switch,
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

    from coordinator.api import create_app
    from coordinator.store import describe

    try:
        app = create_app(settings)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        sys.exit(f"pf-coordinator: cannot start (database {describe(settings.db)}): {exc}")
    # h11, not httptools, even when installed: h11 caps a request's headers (a 1 MB header gets a 4xx,
    # tests/test_hostile_input.py), httptools has no such limit.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False, http="h11"
    )


if __name__ == "__main__":
    main()
