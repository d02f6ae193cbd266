"""bench/load.py end to end at a small size: it drives a real coordinator subprocess and its JSON
line reports what the closing note quotes (no speed is asserted here; that is the benchmark's job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_bench_small_run_accepts_every_upload():
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            "--devices",
            "24",
            "--goal",
            "10",
            "--devices-per-client",
            "5",
            "--time-limit",
            "60",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # goal 10 with 24 devices: two rounds commit, the last 4 uploads are accepted into the third
    assert (result["uploads_accepted"], result["rounds_committed"]) == (24, 2)
    assert result["errors"] == result["lost_uploads"] == 0
    for key in (
        "uploads_per_s",
        "upload_p50_ms",
        "upload_p99_ms",
        "coordinator_peak_rss_mib",
        "coordinator_cpu_ms_per_upload",
        "coordinator_loop_cpu_ms_per_upload",
        "coordinator_cpu_ms_per_enroll",
        "coordinator_cpu_ms_per_checkin",
        "coordinator_cpu_ms_all_calls_per_upload",
        "uploads_per_group_commit",
        "coordinator_rss_by_uploads_mib",
    ):
        assert key in result, key
    # the upload phase is part of the whole run: its CPU cannot exceed everything's
    assert 0 < result["coordinator_cpu_ms_per_upload"] <= result["coordinator_cpu_ms_all_calls_per_upload"]
    assert 1 <= result["uploads_per_group_commit"] <= 24
    assert result["upload_p50_ms"] <= result["upload_p99_ms"]
