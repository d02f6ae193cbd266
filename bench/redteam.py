"""Red team: a coordinator started with default settings, attacked as a hostile device and a
stranger on the network would (issue 12; the attacks are simulation/redteam.py).

    python bench/redteam.py --json     # a line per attack, last line {"attacks", "held", "failed"}

Only the secrets are given (strong random ones: the coordinator refuses weak ones); every limit is
the default. Exit status 1 if any attack was not held.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.processes import CoordinatorProcess  # noqa: E402
from simulation.redteam import ATTACKS, Target, run, summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="run these attacks only")
    args = parser.parse_args(argv)
    key, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    records = []
    with tempfile.TemporaryDirectory(prefix="pf-redteam-") as workdir:
        coordinator = CoordinatorProcess(Path(workdir), {"enrollment_key": key, "admin_token": admin}).start()
        try:
            target = Target(coordinator.url, key, admin)
            for name in args.only or ATTACKS:
                record = run(name, target)
                records.append(record)
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    print(f"{'held  ' if record['held'] else 'FAILED'} {name}: {record['detail']}", flush=True)
        finally:
            coordinator.stop()
    result = summary(records)
    print(json.dumps(result))
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
