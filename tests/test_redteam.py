"""The red team's attacks (simulation/redteam.py, also bench/redteam.py) against a real coordinator
process started with default settings (only strong random secrets given): every one must hold."""

from __future__ import annotations

import secrets

import pytest

from simulation.processes import CoordinatorProcess
from simulation.redteam import ATTACKS, Target, run


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    key, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    coordinator = CoordinatorProcess(tmp_path_factory.mktemp("redteam"), {"enrollment_key": key, "admin_token": admin})
    coordinator.start()
    yield Target(coordinator.url, key, admin)
    coordinator.stop()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_held(target, attack):
    record = run(attack, target)
    assert record["held"], record["detail"]


def test_the_takeover_attack_wins_without_the_influence_bound(tmp_path):
    """The model_takeover attack is a real test: with the default bound switched off it succeeds."""
    key, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    options = {"enrollment_key": key, "admin_token": admin, "influence_bound": "false"}
    coordinator = CoordinatorProcess(tmp_path, options).start()
    try:
        record = run("model_takeover", Target(coordinator.url, key, admin))
    finally:
        coordinator.stop()
    assert not record["held"], record["detail"]
