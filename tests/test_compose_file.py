"""docker-compose.yml and the Dockerfile against the real CLIs (there is no Docker engine here),
the replicas' slot claiming, and the compose topology run as plain processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

yaml = pytest.importorskip("yaml")

from coordinator.__main__ import build_parser as coordinator_parser  # noqa: E402
from coordinator.settings import Settings, env_name, settings_from_env  # noqa: E402
from simulation.processes import free_port  # noqa: E402
from simulation.replica import build_parser as replica_parser  # noqa: E402
from simulation.replica import claim_slot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} substitution (the subset the file uses)."""
    environ = environ or {}
    return VARIABLE.sub(lambda m: environ.get(m.group(1), m.group(2) or ""), str(value))


def command(service: str, environ: dict[str, str] | None = None) -> list[str]:
    raw = SERVICES[service]["command"]
    return [interpolate(a, environ) for a in (shlex.split(raw) if isinstance(raw, str) else raw)]


def environment(service: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    return {k: interpolate(v, environ) for k, v in SERVICES[service]["environment"].items()}


def mounts(service: str) -> dict[str, str]:
    """volume name -> mount point inside the container."""
    return dict(v.split(":", 1) for v in SERVICES[service]["volumes"])


def console_script(name: str) -> str:
    match = re.search(rf'^{re.escape(name)} = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return match.group(1) if match else ""


# ---------------------------------------------------------------------- the file agrees with the CLIs


def test_services_and_volumes():
    assert set(SERVICES) == {"coordinator", "device"}
    assert set(COMPOSE["volumes"]) >= {"coordinator-db", "device-state"}
    for service in SERVICES.values():
        for volume in service["volumes"]:
            assert volume.split(":")[0] in COMPOSE["volumes"]
    assert SERVICES["device"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert "ports" not in SERVICES["device"] and "container_name" not in SERVICES["device"]  # scalable


def test_coordinator_command_flags_exist_and_agree_with_port_volume_and_healthcheck():
    argv = command("coordinator")
    assert argv[0] == "pf-coordinator" and console_script("pf-coordinator") == "coordinator.__main__:main"
    args = coordinator_parser().parse_args(argv[1:])  # an unknown flag would exit here
    assert args.host == "0.0.0.0"
    container_port = SERVICES["coordinator"]["ports"][0].rsplit(":", 1)[1]
    assert args.port == container_port
    assert Path(args.db).parent.as_posix() == mounts("coordinator")["coordinator-db"]
    check = " ".join(SERVICES["coordinator"]["healthcheck"]["test"])
    assert f"127.0.0.1:{args.port}/healthz" in check


def test_coordinator_environment_names_are_settings_and_validate():
    env = environment("coordinator")
    known = {env_name(name) for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    settings = settings_from_env(env)  # every value passes the same validation as a flag would
    assert settings.goal == 10 and settings.enrollment_key == "change-me"
    eval_data = Path(settings.eval_data)
    assert eval_data.is_relative_to("/app")
    assert (REPO / eval_data.relative_to("/app") / "t10k-labels-idx1-ubyte.gz").exists()


def test_device_command_flags_exist_and_point_at_the_coordinator():
    argv = command("device", {"PF_FLEET_SIZE": "7"})
    assert argv[:3] == ["python", "-m", "simulation.replica"]
    args = replica_parser().parse_args(argv[3:])
    assert args.devices == 7 and args.replica == "auto"
    coordinator_port = command("coordinator")[command("coordinator").index("--port") + 1]
    assert args.coordinator == f"http://coordinator:{coordinator_port}"
    assert str(args.state_root) == mounts("device")["device-state"]
    assert set(environment("device")) == {"PF_ENROLLMENT_KEY"}
    assert environment("device")["PF_ENROLLMENT_KEY"] == environment("coordinator")["PF_ENROLLMENT_KEY"]


def test_dockerfile_installs_the_extras_and_runs_the_coordinator():
    text = (REPO / "Dockerfile").read_text()
    assert ".[coordinator,agent]" in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd == command("coordinator")
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / path).exists(), path


# ---------------------------------------------------------------------- slot claiming


def test_replicas_claim_distinct_stable_slots(tmp_path):
    claims = tmp_path / "claims"
    got = [claim_slot(claims, 4, f"host-{i}", lease=60) for i in range(4)]
    assert got == [0, 1, 2, 3]
    assert claim_slot(claims, 4, "host-2", lease=60) == 2  # a restarted container gets its slot back
    with pytest.raises(RuntimeError, match="all 4 device slots"):
        claim_slot(claims, 4, "host-9", lease=60)
    later = time.time() + 120  # host-1's lease ran out (the others were refreshed)
    for i in (0, 2, 3):
        os.utime(claims / f"slot-0000{i}", (later, later))
    assert claim_slot(claims, 4, "host-9", lease=60, now=later) == 1
    assert (claims / "slot-00001").read_text().strip() == "host-9"


# ---------------------------------------------------------------------- the topology, as processes


def test_compose_topology_as_processes(tmp_path):
    """The coordinator and three device replicas, started with the compose commands and environment
    (paths and the port mapped to this machine), each replica deriving its shard from PF_REPLICA_ID."""
    port = free_port()
    coord_argv = [sys.executable, "-m", "coordinator"] + [
        {"8000": str(port), "0.0.0.0": "127.0.0.1", "/data/pocketfed.db": str(tmp_path / "pocketfed.db")}.get(a, a)
        for a in command("coordinator")[1:]
    ]
    coord_env = {
        **os.environ,
        **environment("coordinator"),
        "PYTHONPATH": str(REPO),
        "PF_GOAL": "3",
        "PF_OVER_SELECT": "1.0",
        "PF_EVAL_DATA": str(REPO / "engine/data/embedded"),
        "PF_MAX_RETRY_AFTER": "1",
        "PF_LOG_LEVEL": "warning",
        "OPENBLAS_NUM_THREADS": "1",
    }
    log = open(tmp_path / "coordinator.log", "w")  # noqa: SIM115
    coordinator = subprocess.Popen(coord_argv, env=coord_env, stdout=log, stderr=subprocess.STDOUT)
    replicas = []
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        device_argv = [
            {"python": sys.executable, "http://coordinator:8000": url, "/state": str(tmp_path / "state")}.get(a, a)
            for a in command("device", {"PF_FLEET_SIZE": "5"})
        ] + ["--rounds", "1", "--max-wait", "1"]
        for i in range(3):
            replica_env = {
                **os.environ,
                **environment("device"),
                "PYTHONPATH": str(REPO),
                "PF_REPLICA_ID": f"pocketfed-device-{i + 1}",
                "OPENBLAS_NUM_THREADS": "1",
            }
            replicas.append(
                subprocess.Popen(
                    device_argv, env=replica_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outputs = [r.communicate(timeout=180) for r in replicas]
        for r, (_, err) in zip(replicas, outputs):
            assert r.returncode == 0, err[-2000:]
        indices = sorted(int(out.split("device-index ")[1].split()[0]) for out, _ in outputs)
        assert indices == [0, 1, 2]  # distinct shards of the 5
        records = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
        assert {r["round"] for r in records} == {1}
        round_1 = httpx.get(url + "/v1/rounds/1", timeout=10).json()
        assert round_1["status"] == "committed" and round_1["received"] == 3
        claimed = {p.read_text().strip() for p in (tmp_path / "state" / "claims").glob("slot-*")}
        assert claimed == {f"pocketfed-device-{i}" for i in (1, 2, 3)}
    finally:
        for proc in [*replicas, coordinator]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        log.close()
