"""bench/scaleout.py end to end at a small size: two PostgreSQL replicas behind the balancer, one
SIGKILLed and restarted mid-run, and the JSON line the closing note quotes (no speed is asserted:
that is the benchmark's job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["postgres_helpers"]  # pg_databases: skips (or fails under CI=1) without a server


def test_scaleout_bench_small_run_loses_nothing(pg_databases):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scaleout.py"), "--replicas", "2", "--devices", "12"]
        + ["--seconds", "6", "--checkin-seconds", "1", "--skip-baselines", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("replicas", "devices", "acknowledged", "lost", "double_counted", "killed", "uploads_per_s"):
        assert key in result, key
    assert "single_replica_uploads_per_s" in result and "sqlite_uploads_per_s" in result
    assert (result["replicas"], result["devices"], result["killed"]) == (2, 12, 1)
    assert result["acknowledged"] > 0 and result["lost"] == result["double_counted"] == 0
    phase = result["phases"]["replicas"]
    assert phase["audit_ok"] and phase["rounds_committed"] >= 1, phase
