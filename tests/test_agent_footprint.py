"""The agent must fit on a phone: numpy, the engine and httpx - never the server's packages."""

from __future__ import annotations

import json
import subprocess
import sys

from test_agent_harness import REPO, env

SERVER_PACKAGES = ["fastapi", "uvicorn", "pydantic", "starlette", "torch", "sqlalchemy", "coordinator"]


def test_agent_imports_no_server_packages():
    code = ("import sys, json\n"
            "import device_agent, device_agent.__main__, device_agent.runner, device_agent.client\n"
            "import device_agent.personal, device_agent.state, device_agent.eligibility\n"
            "import engine.trainer, engine.serialize.update, engine.serialize.compression\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                         check=True).stdout
    loaded = set(json.loads(out))
    assert {"numpy", "httpx", "engine", "device_agent"} <= loaded  # the check really ran
    assert not loaded & set(SERVER_PACKAGES), f"the agent pulled in {sorted(loaded & set(SERVER_PACKAGES))}"


def test_no_server_imports_in_the_source():
    for path in (REPO / "device_agent").rglob("*.py"):
        text = path.read_text()
        for package in SERVER_PACKAGES:
            assert f"import {package}" not in text and f"from {package}" not in text, (path, package)
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
