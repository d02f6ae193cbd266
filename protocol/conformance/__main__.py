"""python -m protocol.conformance --agent-cmd "CMD with {url} {key} {state} {data}" [--only NAME ...] [--list]"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from protocol.conformance.scenarios import SCENARIOS
from protocol.conformance.suite import run_suite


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protocol.conformance",
        description="Check a device agent against the pocketfed device protocol (docs/protocol.md) with a "
        "scripted coordinator. The agent command should do one task and exit, training on all of {data}.",
    )
    parser.add_argument(
        "--agent-cmd",
        help="the agent's command line; {url} {key} {state} {data} are replaced by the coordinator URL, the "
        "enrollment key, a fresh state directory and a .npz file of examples (x float32 [n,1,28,28], y int64 [n])",
    )
    parser.add_argument("--agent", default=None, help="the agent's name in the report (default: the command)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help="run only this scenario")
    parser.add_argument("--workdir", default=None, help="keep state dirs and agent logs here (default: a temp dir)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for cls in SCENARIOS:
            print(f"{cls.name:<22} {cls.checks}")
        return 0
    if not args.agent_cmd:
        parser.error("--agent-cmd is required")
    try:
        summary = run_suite(args.agent_cmd, agent=args.agent, only=args.only, workdir=args.workdir)
    except ValueError as exc:
        parser.error(str(exc))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
