"""A realistic fleet for pf-sim (issue 17): when each device is online, how fast it trains, whether it
drops out mid-round, and what the fleet's personal models look like at the end.

Availability: `always`; `diurnal` (each device sits in a time zone and is online only in its
overnight charging window, about 22:00-07:00 local, so the online part of the fleet rolls around
the globe); or a CSV file `device,start_hour,end_hour` (UTC hours; a window may wrap midnight;
devices not listed are always online). A day is compressed into the run: each round advances the
simulated clock by `hours_per_round` hours.

Speed: device i trains `factor_i = exp(speed_spread * z_i)` times slower than the machine (z_i a
seeded standard normal, factors below 1 count as 1), enforced by a sleep before each training step.
Dropouts: a chosen device vanishes after its check-in with probability `dropout` (the app is
killed mid-training), so over-selection must replace it and deadlines settle the round.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHARGING_START, CHARGING_HOURS = 22.0, 9.0  # local time the phone is plugged in overnight, and for how long


@dataclass(frozen=True)
class Window:
    start: float  # UTC hour in [0, 24)
    hours: float  # length; may run past midnight

    def contains(self, hour: float) -> bool:
        return (hour - self.start) % 24.0 < self.hours


class Availability:
    """Which devices are online at a simulated UTC hour."""

    def __init__(self, spec: str, devices: int, seed: int):
        self.spec, self.devices = spec, devices
        self.windows: dict[int, Window] = {}
        if spec == "always":
            return
        if spec == "diurnal":
            rng = np.random.default_rng([seed, 17])
            zones = rng.integers(-12, 12, size=devices)  # UTC offsets
            jitter = rng.uniform(-1.0, 1.0, size=devices)  # people plug in at different times
            for i in range(devices):
                start = (CHARGING_START - zones[i] + jitter[i]) % 24.0
                self.windows[i] = Window(float(start), CHARGING_HOURS)
            return
        self.windows = read_windows(Path(spec), devices)

    def online(self, hour: float) -> list[int]:
        hour %= 24.0
        return [i for i in range(self.devices) if i not in self.windows or self.windows[i].contains(hour)]


def read_windows(path: Path, devices: int) -> dict[int, Window]:
    """device,start_hour,end_hour rows (a header line is allowed); clear errors name the line."""
    if not path.is_file():
        raise ValueError(f"--availability {path}: not 'always', 'diurnal' or a readable CSV file")
    windows: dict[int, Window] = {}
    with path.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or row[0].strip().startswith("#") or (number == 1 and not row[0].strip().isdigit()):
                continue
            try:
                device, start, end = int(row[0]), float(row[1]), float(row[2])
            except (ValueError, IndexError):
                raise ValueError(f"--availability {path}:{number}: expected device,start_hour,end_hour") from None
            if not 0 <= device < devices:
                raise ValueError(f"--availability {path}:{number}: device {device} is outside 0..{devices - 1}")
            if not (0 <= start < 24 and 0 <= end <= 24 and math.isfinite(start + end)):
                raise ValueError(f"--availability {path}:{number}: hours must be in [0, 24]")
            windows[device] = Window(start, (end - start) % 24.0 or 24.0)
    return windows


def speed_factors(devices: int, spread: float, seed: int) -> np.ndarray:
    """How many times slower than this machine each device trains (>= 1)."""
    z = np.random.default_rng([seed, 15]).standard_normal(devices)
    return np.maximum(1.0, np.exp(spread * z))


def personalized_count(personal_versions: dict[int, int | None], released: int) -> int:
    """Devices whose personal layers sit on the released version or the one before it."""
    return sum(1 for v in personal_versions.values() if v is not None and v >= released - 1)


def fleet_mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
