"""pf-sim's realistic fleet (issue 17): who is online when, slow devices, dropouts, and every device
personalized -- the availability model unit by unit, then real runs (coordinator and agent processes)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from test_sim_run import REPO, env, pf_sim

from simulation.config import SimConfig
from simulation.fleet import Availability, Window, personalized_count, read_windows, speed_factors


def test_diurnal_devices_are_online_only_in_their_overnight_window_around_the_globe():
    fleet = Availability("diurnal", 240, seed=0)
    share = [len(fleet.online(h)) / 240 for h in np.arange(0, 24, 0.5)]
    assert 0.3 < np.mean(share) < 0.45  # 9 hours of 24
    assert min(share) > 0.15  # time zones spread the fleet: never everyone asleep at once
    for device in (0, 7, 100):
        hours = [h for h in np.arange(0, 24, 0.25) if device in fleet.online(h)]
        assert 8.5 <= len(hours) / 4 <= 9.25  # one charging window a day
    assert Availability("always", 5, seed=0).online(13.0) == [0, 1, 2, 3, 4]


def test_windows_wrap_midnight():
    assert Window(22.0, 9.0).contains(23.5) and Window(22.0, 9.0).contains(6.9)
    assert not Window(22.0, 9.0).contains(7.1) and not Window(22.0, 9.0).contains(21.9)


def test_an_availability_file_is_read_and_its_errors_name_the_line(tmp_path):
    path = tmp_path / "windows.csv"
    path.write_text("device,start_hour,end_hour\n0,22,6\n1,8,17\n")
    fleet = Availability(str(path), 3, seed=0)
    assert fleet.online(23) == [0, 2] and fleet.online(9) == [1, 2]  # device 2 is not listed: always online
    path.write_text("0,22,6\n1,eight,17\n")
    with pytest.raises(ValueError, match="windows.csv:2"):
        read_windows(path, 3)
    path.write_text("7,1,2\n")
    with pytest.raises(ValueError, match="device 7 is outside"):
        read_windows(path, 3)
    with pytest.raises(ValueError, match="--availability"):
        SimConfig(availability=str(tmp_path / "missing.csv")).check()


def test_speed_factors_and_personalized_count():
    assert np.all(speed_factors(50, 0.0, seed=1) == 1.0)
    slow = speed_factors(500, 1.0, seed=1)
    assert slow.min() == 1.0 and 0.4 < np.mean(slow > 1.0) < 0.6 and slow.max() > 5
    assert personalized_count({0: 6, 1: 5, 2: 4, 3: None}, released=6) == 2


@pytest.mark.parametrize(
    "changes, message",
    [({"dropout": 1.0}, "--dropout"), ({"speed_spread": -1}, "--speed-spread"), ({"hours_per_round": 0}, "--hours")],
)
def test_bad_fleet_options_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(**changes).check()


def run_sim(tmp_path, *args: str) -> list[dict]:
    proc = subprocess.run(
        pf_sim(*args, "--json", "--no-progress", "--workdir", str(tmp_path / "work")),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_device_is_personalized_not_only_the_trained_ones(tmp_path):
    lines = run_sim(tmp_path, "--devices", "8", "--per-round", "2", "--rounds", "2", "--partition", "shards:2")
    rounds, summary = lines[:-1], lines[-1]
    assert all(r["personalized"] == 8 for r in rounds)  # online devices personalize on each new version
    # 2 rounds x 2 devices trained 4 device-rounds at most: the other devices got there by personalize tasks
    assert summary["personalized_devices"] == 8
    assert summary["released_version"] == rounds[-1]["version"]
    assert summary["personal_accuracy_fleet"] > summary["global_accuracy_fleet"] + 0.2  # 2-class devices
    assert all(r["bytes_down_personalize"] > 0 for r in rounds)


def test_a_realistic_fleet_rolls_through_time_zones_loses_devices_and_still_commits(tmp_path):
    lines = run_sim(
        tmp_path,
        *("--devices", "16", "--per-round", "3", "--rounds", "3", "--partition", "shards:2"),
        *("--availability", "diurnal", "--hours-per-round", "8", "--dropout", "0.4", "--speed-spread", "0.5"),
    )
    rounds, summary = lines[:-1], lines[-1]
    assert len(rounds) == 3 and all(r["devices"] >= 3 for r in rounds)  # over-selection replaced the dropouts
    assert all(3 <= r["online"] < 16 for r in rounds)  # only part of the fleet is ever online
    assert len({r["hour"] for r in rounds}) == 3  # the clock moved around the day
    assert sum(r["dropped"] for r in rounds) >= 1
    assert all(r["personalized"] <= r["online"] for r in rounds)
    # devices offline in the last two windows keep an older personal model (or none)
    assert 0 < summary["personalized_devices"] < 16
    assert summary["config"]["availability"] == "diurnal" and summary["config"]["dropout"] == 0.4
