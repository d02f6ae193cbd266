"""pf-agent: the device agent's command line.

pf-agent run --coordinator URL --data PATH --state-dir DIR --enrollment-key-file F [--rounds N] [--once]
             [--ignore-conditions] [--json] [--personal-layers fc2] [--holdout 0.2] [--seed S]
pf-agent predict --state-dir DIR --input FILE(.npy/.npz/.png)
"""

from __future__ import annotations

import os

# One BLAS thread unless the user says otherwise: a phone stays responsive, and many agents on
# one machine (the simulation) don't oversubscribe its cores. Must precede numpy's import.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import numpy as np  # noqa: E402

from device_agent.client import CoordinatorClient, RejectedError, RetryPolicy  # noqa: E402
from device_agent.eligibility import AlwaysEligible, default_probe  # noqa: E402
from device_agent.state import AgentState  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pf-agent", description="pocketfed device agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="take part in federated rounds")
    run.add_argument("--coordinator", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--data", required=True, help="local data: IDX dir, .npz, .csv or image folder")
    run.add_argument("--state-dir", required=True, type=Path)
    run.add_argument(
        "--enrollment-key",
        help="enrollment key or one-time code (visible to other local users in the process list: "
        "prefer --enrollment-key-file or PF_ENROLLMENT_KEY)",
    )
    run.add_argument("--enrollment-key-file", type=Path, help="read the enrollment key or code from this file")
    run.add_argument(
        "--insecure", action="store_true", help="allow plain http:// to a coordinator that is not on this machine"
    )
    run.add_argument("--name", default=None, help="device name shown on the dashboard")
    run.add_argument("--rounds", type=int, default=None, help="stop after N rounds (default: run until stopped)")
    run.add_argument("--once", action="store_true", help="do a single task, then exit")
    run.add_argument(
        "--ignore-conditions", action="store_true", help="train even when not charging/idle/unmetered (simulation)"
    )
    run.add_argument("--json", action="store_true", help="print one JSON line per round on stdout")
    run.add_argument("--personal-layers", default="", help="comma-separated layer names (default: the head)")
    run.add_argument("--personal-epochs", type=int, default=1)
    run.add_argument("--holdout", type=float, default=0.2, help="fraction of local data held out for evaluation")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    run.add_argument("--retries", type=int, default=6, help="tries per request on network errors, 5xx, 408, 429, 503")
    run.add_argument(
        "--max-wait",
        type=float,
        default=30.0,
        help="our own idle interval (s, plus jitter): while not eligible, after a network failure that outlasted "
        "the retries, after a task for a finished round; never shortens a wait the server asks for",
    )
    run.add_argument(
        "--refresh-interval",
        type=float,
        default=3600.0,
        help="seconds between looks for a newer base model while not training (a conditional GET; 0: never); "
        "a newer one is adopted and the personal layers fine-tuned on it",
    )
    run.add_argument(
        "--rotate-token-days",
        type=float,
        default=30.0,
        help="trade the device token for a new one after this many days (0: never; the coordinator expires a "
        "token after --device-token-idle-days without a check-in)",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    predict = sub.add_parser("predict", help="classify with the personal model")
    predict.add_argument("--state-dir", required=True, type=Path)
    predict.add_argument("--input", required=True, type=Path, help=".npy, .npz (array 'x') or .png")
    return parser


def check_transport(url: str, insecure: bool) -> None:
    """Tokens and updates travel in the clear over http://: only to this machine unless --insecure."""
    parsed = urlsplit(url)
    if parsed.scheme == "https" or (parsed.scheme == "http" and (insecure or is_loopback(parsed.hostname or ""))):
        return
    if parsed.scheme not in ("http", "https"):
        raise SystemExit(f"pf-agent: --coordinator {url!r}: expected an http:// or https:// URL")
    raise SystemExit(
        f"pf-agent: --coordinator {url!r}: plain http:// to another machine sends the device token and "
        "updates in the clear; use https:// (or --insecure on a trusted network)"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_enrollment_key(flag: str | None, path: Path | None, environ: Mapping[str, str]) -> str:
    """--enrollment-key, else the file, else PF_ENROLLMENT_KEY."""
    if flag:
        return flag
    if path is not None:
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise SystemExit(f"pf-agent: --enrollment-key-file: {exc}") from None
        if not key:
            raise SystemExit(f"pf-agent: --enrollment-key-file {path}: the file is empty")
        return key
    key = environ.get("PF_ENROLLMENT_KEY", "").strip()
    if not key:
        raise SystemExit(
            "pf-agent: no enrollment key: give --enrollment-key-file, PF_ENROLLMENT_KEY or --enrollment-key"
        )
    return key


def cmd_run(args: argparse.Namespace) -> int:
    from device_agent.runner import Agent, AgentConfig
    from engine.data import DataError, open_dataset

    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("pf-agent: --rounds must be >= 1")
    if not 0.0 <= args.holdout < 1.0:
        raise SystemExit("pf-agent: --holdout must be in [0, 1)")
    check_transport(args.coordinator, args.insecure)
    enrollment_key = resolve_enrollment_key(args.enrollment_key, args.enrollment_key_file, os.environ)
    try:
        dataset = open_dataset(args.data)
    except (DataError, ImportError) as exc:
        raise SystemExit(f"pf-agent: cannot read --data: {exc}") from None
    config = AgentConfig(
        coordinator=args.coordinator,
        enrollment_key=enrollment_key,
        name=args.name,
        rounds=args.rounds,
        once=args.once,
        holdout=args.holdout,
        personal_layers=[s for s in args.personal_layers.split(",") if s],
        personal_epochs=args.personal_epochs,
        seed=args.seed,
        max_wait=args.max_wait,
        refresh_interval=args.refresh_interval,
        rotate_token_days=args.rotate_token_days,
        json_lines=args.json,
    )
    probe = AlwaysEligible() if args.ignore_conditions else default_probe()
    retry = RetryPolicy(attempts=args.retries)
    client = CoordinatorClient(args.coordinator, timeout=args.timeout, retry=retry)
    with client:
        agent = Agent(config, client, AgentState(args.state_dir), dataset, probe)
        try:
            agent.run()
        except RejectedError as exc:
            logging.getLogger("pocketfed.agent").error("%s", exc)
            return 2
    return 0


def load_input(path: Path, hw: tuple[int, int], prep: Any) -> np.ndarray:
    """A batch of model inputs from .npy/.npz (already preprocessed) or a .png (scaled to [0, 1],
    then preprocessed as the model records)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = "x" if "x" in archive.files else archive.files[0]
            return archive[key].astype(np.float32)
    if suffix == ".png":
        try:
            from PIL import Image
        except ImportError:
            raise SystemExit("pf-agent: reading .png needs Pillow: pip install 'pocketfed[images]'") from None
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L").resize((hw[1], hw[0])), dtype=np.float32) / 255.0
        return prep.apply(pixels[None, None])
    raise SystemExit(f"pf-agent: --input {path}: expected .npy, .npz or .png, got {suffix or 'no suffix'!r}")


def cmd_predict(args: argparse.Namespace) -> int:
    from device_agent.personal import load_personal_model
    from engine.data import preprocessing_for
    from engine.trainer import Trainer

    try:
        model = load_personal_model(AgentState(args.state_dir))
    except FileNotFoundError as exc:
        raise SystemExit(f"pf-agent: {exc}") from None
    input_shape = tuple(model.input.shape)[1:]
    x = load_input(args.input, input_shape[-2:], preprocessing_for(model))
    if x.ndim == len(input_shape):
        x = x[None]  # one item -> a batch of one
    if tuple(x.shape[1:]) != input_shape:
        raise SystemExit(f"pf-agent: --input has items of shape {tuple(x.shape[1:])}, the model expects {input_shape}")
    probs = Trainer(model).predict(x)
    for row in probs:
        print(json.dumps({"class": int(np.argmax(row)), "probabilities": [round(float(p), 5) for p in row]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return cmd_run(args) if args.command == "run" else cmd_predict(args)


if __name__ == "__main__":
    sys.exit(main())
