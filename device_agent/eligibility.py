"""May this device train right now? Charging, idle and on an unmetered network - the
conditions production federated learning uses so that training never costs the user
battery, responsiveness or data plan (Bonawitz et al. 2019).

Each condition is one small probe with `check() -> Verdict`. The signals are read
where the platform has them:

- power: Linux/Android sysfs /sys/class/power_supply/*/{type,online,status}, or the
  Termux:API `termux-battery-status` command when it is on PATH;
- idle: the 1-minute load average per core (a phone in a pocket is close to 0);
- network: the interface of the default route in /proc/net/route; cellular interfaces
  (rmnet*, ccmni*, wwan*, pdp*, ...) count as metered.

A signal that cannot be read does not block training (a laptop without a battery is on
mains power). `AlwaysEligible` is for simulations (`--ignore-conditions`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class Probe(ABC):
    """One condition; subclasses implement check()."""

    @abstractmethod
    def check(self) -> Verdict:
        """Whether the condition holds now, and why (for the log)."""


class AlwaysEligible(Probe):
    def check(self) -> Verdict:
        return Verdict(True, "conditions ignored")


class SysfsPowerProbe(Probe):
    """Charging if a mains/USB supply is online or a battery reports Charging/Full."""

    def __init__(self, root: str | os.PathLike = "/sys/class/power_supply"):
        self.root = Path(root)

    def check(self) -> Verdict:
        supplies = sorted(self.root.glob("*")) if self.root.is_dir() else []
        batteries = []
        for supply in supplies:
            kind = _read(supply / "type")
            if kind in ("Mains", "USB", "USB_C", "USB_PD", "Wireless") and _read(supply / "online") == "1":
                return Verdict(True, f"power: {supply.name} online")
            if kind == "Battery":
                batteries.append((supply.name, _read(supply / "status")))
        for name, status in batteries:
            if status in ("Charging", "Full"):
                return Verdict(True, f"power: battery {name} {status.lower()}")
        if batteries:
            return Verdict(False, f"power: on battery ({', '.join(f'{n} {s}' for n, s in batteries)})")
        return Verdict(True, "power: no battery found, assuming mains")


class TermuxBatteryProbe(Probe):
    """Android via Termux:API: `termux-battery-status` prints JSON with "plugged" and "status"."""

    def __init__(self, command: str = "termux-battery-status", timeout: float = 10.0):
        self.command, self.timeout = command, timeout

    def check(self) -> Verdict:
        try:
            out = subprocess.run([self.command], capture_output=True, timeout=self.timeout, check=True).stdout
            status = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return Verdict(True, f"power: {self.command} unreadable ({type(exc).__name__}), not blocking")
        plugged = str(status.get("plugged", "")).upper()
        charging = str(status.get("status", "")).upper() in ("CHARGING", "FULL")
        if (plugged and plugged != "UNPLUGGED") or charging:
            return Verdict(True, f"power: {plugged.lower() or 'charging'}")
        return Verdict(False, f"power: unplugged, battery {status.get('percentage', '?')}%")


class LoadIdleProbe(Probe):
    """Idle when the 1-minute load average per core is below `max_load_per_core`."""

    def __init__(self, max_load_per_core: float = 0.5):
        self.max_load = max_load_per_core

    def check(self) -> Verdict:
        try:
            load = os.getloadavg()[0] / (os.cpu_count() or 1)
        except OSError:
            return Verdict(True, "idle: load average unavailable, not blocking")
        if load > self.max_load:
            return Verdict(False, f"idle: busy (load {load:.2f} per core > {self.max_load})")
        return Verdict(True, f"idle: load {load:.2f} per core")


METERED_PREFIXES = ("rmnet", "ccmni", "wwan", "pdp", "ppp", "usb", "rndis", "qmi", "v4-rmnet")


class RouteNetworkProbe(Probe):
    """Unmetered unless the default route goes through a cellular (or tethered) interface."""

    def __init__(self, route_file: str | os.PathLike = "/proc/net/route"):
        self.route_file = Path(route_file)

    def check(self) -> Verdict:
        try:
            lines = self.route_file.read_text().splitlines()[1:]
        except OSError:
            return Verdict(True, "network: route table unreadable, not blocking")
        defaults = [f[0] for f in (line.split() for line in lines) if len(f) > 1 and f[1] == "00000000"]
        if not defaults:
            return Verdict(True, "network: no default route seen (local only), not blocking")
        metered = [i for i in defaults if i.startswith(METERED_PREFIXES)]
        if metered and len(metered) == len(defaults):
            return Verdict(False, f"network: metered interface {metered[0]}")
        return Verdict(True, f"network: unmetered via {defaults[0]}")


class AllOf(Probe):
    """Eligible when every probe is; the verdict names the first condition that fails."""

    def __init__(self, probes: Sequence[Probe]):
        self.probes = list(probes)

    def check(self) -> Verdict:
        reasons = []
        for probe in self.probes:
            verdict = probe.check()
            if not verdict.ok:
                return verdict
            reasons.append(verdict.reason)
        return Verdict(True, "; ".join(reasons))


class Cached(Probe):
    """Re-checks at most every `interval` seconds (training asks before every step)."""

    def __init__(self, probe: Probe, interval: float = 5.0, clock=time.monotonic):
        self.probe, self.interval, self.clock = probe, interval, clock
        self._last: tuple[float, Verdict] | None = None

    def check(self) -> Verdict:
        now = self.clock()
        if self._last is None or now - self._last[0] >= self.interval:
            self._last = (now, self.probe.check())
        return self._last[1]


def default_probe() -> Probe:
    """The platform's real signals: Termux when present, else sysfs; plus idle and network."""
    power = TermuxBatteryProbe() if shutil.which("termux-battery-status") else SysfsPowerProbe()
    return Cached(AllOf([power, LoadIdleProbe(), RouteNetworkProbe()]))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
