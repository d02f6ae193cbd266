"""The agent must fit on a phone: numpy, the engine and httpx - never the server's packages."""

from __future__ import annotations

import json
import subprocess
import sys

from test_agent_harness import REPO, env
from test_agent_runner import FakeCoordinator, make_agent, task

import engine.trainer
from engine.runtime import CompiledFunction

SERVER_PACKAGES = ["fastapi", "uvicorn", "pydantic", "starlette", "torch", "sqlalchemy", "coordinator"]


def test_agent_imports_no_server_packages():
    code = (
        "import sys, json\n"
        "import device_agent, device_agent.__main__, device_agent.runner, device_agent.client\n"
        "import device_agent.personal, device_agent.state, device_agent.eligibility\n"
        "import engine.trainer, protocol.update, protocol.deltas\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert {"numpy", "httpx", "engine", "device_agent"} <= loaded  # the check really ran
    assert not loaded & set(SERVER_PACKAGES), f"the agent pulled in {sorted(loaded & set(SERVER_PACKAGES))}"


def test_no_server_imports_in_the_source():
    for path in (REPO / "device_agent").rglob("*.py"):
        text = path.read_text()
        for package in SERVER_PACKAGES:
            assert f"import {package}" not in text and f"from {package}" not in text, (path, package)
        assert "import pickle" not in text and "allow_pickle=True" not in text, path


def test_a_round_keeps_no_planned_memory_and_never_stacks_two_trainers(tmp_path, monkeypatch):
    """Each planned batch size holds an arena and workspaces (engine/runtime.py). A round must
    evaluate in training-sized batches, release the global trainer before the personal one
    is built, and leave no plans behind: this is what took the round's peak RSS from 136 to
    86 MiB in bench/agent_round.py."""
    trainers, live_plans_at_creation, planned = [], [], []

    class Recorded(engine.trainer.Trainer):
        def __init__(self, *args, **kwargs):
            live_plans_at_creation.append(sum(len(t.train_fn.plans) + len(t.eval_fn.plans) for t in trainers))
            super().__init__(*args, **kwargs)
            trainers.append(self)

    remember = CompiledFunction._remember

    def record_plan(self, signature, step):
        planned.append((self.program.training, signature[0][0][0]))  # (training?, batch size)
        remember(self, signature, step)

    monkeypatch.setattr(engine.trainer, "Trainer", Recorded)
    monkeypatch.setattr(CompiledFunction, "_remember", record_plan)
    agent = make_agent(tmp_path, FakeCoordinator(task(1, batch_size=16)), once=True, holdout=0.5)
    assert agent.holdout_set.size() > 32  # more than any training batch: one evaluation batch would show
    [record] = agent.run()

    assert "personal_acc" in record and len(trainers) == 2  # the global round and the personal layers
    assert live_plans_at_creation == [0, 0]  # the global trainer's memory was gone before the personal one
    assert {training for training, _ in planned} == {True, False}  # both kinds of function really planned
    assert [t.batch_size for t in trainers] == [16, 32]  # the task's, the personal model's
    assert max(batch for _, batch in planned) <= 32  # evaluation too runs in training-sized batches
    assert all(t.train_fn.plans == [] and t.eval_fn.plans == [] for t in trainers)
