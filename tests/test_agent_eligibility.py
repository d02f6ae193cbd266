"""Eligibility probes read real-format signals: a fake sysfs tree, a route table, a Termux command."""

from __future__ import annotations

import json
import os
import stat

from device_agent.eligibility import (
    AllOf,
    AlwaysEligible,
    Cached,
    Probe,
    RouteNetworkProbe,
    SysfsPowerProbe,
    TermuxBatteryProbe,
    Verdict,
)


def supply(root, name, **files):
    d = root / name
    d.mkdir(parents=True)
    for key, value in files.items():
        (d / key).write_text(value + "\n")


def test_sysfs_power(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", status="Discharging")
    supply(tmp_path, "AC", type="Mains", online="0")
    verdict = SysfsPowerProbe(tmp_path).check()
    assert not verdict.ok and "BAT0 Discharging" in verdict.reason
    (tmp_path / "AC" / "online").write_text("1\n")
    assert SysfsPowerProbe(tmp_path).check().ok
    (tmp_path / "AC" / "online").write_text("0\n")
    (tmp_path / "BAT0" / "status").write_text("Charging\n")
    assert SysfsPowerProbe(tmp_path).check() == Verdict(True, "power: battery BAT0 charging")


def test_sysfs_without_battery_is_mains(tmp_path):
    assert SysfsPowerProbe(tmp_path / "absent").check().ok


ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


def test_route_probe_flags_cellular_default_route(tmp_path):
    route = tmp_path / "route"
    route.write_text(ROUTE_HEADER + "rmnet_data0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    verdict = RouteNetworkProbe(route).check()
    assert not verdict.ok and "rmnet_data0" in verdict.reason
    route.write_text(ROUTE_HEADER + "wlan0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert RouteNetworkProbe(route).check().ok


UNPLUGGED = {"percentage": 41, "plugged": "UNPLUGGED", "status": "DISCHARGING"}
PLUGGED = {"percentage": 41, "plugged": "PLUGGED_AC", "status": "CHARGING"}


def test_termux_battery_command(tmp_path):
    script = tmp_path / "termux-battery-status"
    script.write_text("#!/bin/sh\necho '" + json.dumps(UNPLUGGED) + "'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    verdict = TermuxBatteryProbe(str(script)).check()
    assert not verdict.ok and "41%" in verdict.reason
    script.write_text("#!/bin/sh\necho '" + json.dumps(PLUGGED) + "'\n")
    assert TermuxBatteryProbe(str(script)).check().ok
    assert TermuxBatteryProbe(os.fspath(tmp_path / "missing")).check().ok  # unreadable does not block


class Flip(Probe):
    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def check(self):
        self.calls += 1
        ok = self.answers.pop(0)
        return Verdict(ok, "flip ok" if ok else "flip says no")


def test_all_of_names_the_failing_condition_and_cached_rate_limits():
    assert AllOf([AlwaysEligible(), Flip([False])]).check() == Verdict(False, "flip says no")
    now = [0.0]
    flip = Flip([True, False])
    cached = Cached(flip, interval=5, clock=lambda: now[0])
    assert cached.check().ok and cached.check().ok and flip.calls == 1
    now[0] = 6
    assert not cached.check().ok and flip.calls == 2
