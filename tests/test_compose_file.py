"""docker-compose.yml, docker/haproxy.cfg and the Dockerfile against the real CLIs (there is no
Docker engine here), the device replicas' slot claiming, and the compose topology -- PostgreSQL,
coordinator replicas behind a load balancer, device replicas -- run as plain processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

yaml = pytest.importorskip("yaml")

from coordinator.__main__ import build_parser as coordinator_parser  # noqa: E402
from coordinator.audit import audit  # noqa: E402
from coordinator.settings import Settings, env_name, settings_from_env  # noqa: E402
from simulation.balancer import Balancer  # noqa: E402
from simulation.processes import CoordinatorProcess  # noqa: E402
from simulation.replica import build_parser as replica_parser  # noqa: E402
from simulation.replica import claim_slot  # noqa: E402

pytest_plugins = ["postgres_helpers"]  # pg_url: a throwaway PostgreSQL database

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
HAPROXY = (REPO / "docker" / "haproxy.cfg").read_text()
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}")  # ${VAR:?message}: required


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


def haproxy(keyword: str) -> list[str]:
    """The words of every docker/haproxy.cfg line starting with `keyword`."""
    return [line.split() for line in HAPROXY.splitlines() if line.split()[:1] == [keyword]]


def test_services_and_volumes():
    assert set(SERVICES) == {"postgres", "coordinator", "lb", "device"}
    assert set(COMPOSE["volumes"]) >= {"postgres-data", "device-state"}
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            name = volume.split(":")[0]
            assert name in COMPOSE["volumes"] or (REPO / name).is_file(), volume
    for scaled in ("coordinator", "device"):  # no fixed host port or name: --scale works
        assert "ports" not in SERVICES[scaled] and "container_name" not in SERVICES[scaled]
    assert SERVICES["coordinator"]["deploy"]["replicas"] >= 2
    assert SERVICES["coordinator"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["lb"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert "lb" in SERVICES["device"]["depends_on"]


def test_postgres_is_the_official_image_with_a_volume_and_a_healthcheck():
    pg = SERVICES["postgres"]
    assert pg["image"].split(":")[0] == "postgres"
    assert mounts("postgres")["postgres-data"] == "/var/lib/postgresql/data"
    check = " ".join(pg["healthcheck"]["test"])
    env = environment("postgres")
    assert "pg_isready" in check and f"-U {env['POSTGRES_USER']}" in check and f"-d {env['POSTGRES_DB']}" in check


def test_coordinator_command_flags_exist_and_agree_with_the_database_lb_and_healthcheck():
    argv = command("coordinator")
    assert argv[0] == "pf-coordinator" and console_script("pf-coordinator") == "coordinator.__main__:main"
    args = coordinator_parser().parse_args(argv[1:])  # an unknown flag would exit here
    assert args.host == "0.0.0.0" and args.db is None  # the database comes from PF_DB
    assert SERVICES["coordinator"]["expose"] == [args.port]
    check = " ".join(SERVICES["coordinator"]["healthcheck"]["test"])
    assert f"127.0.0.1:{args.port}/healthz" in check
    db = sa.make_url(environment("coordinator", {"PF_DB_PASSWORD": "pw"})["PF_DB"])
    pg = environment("postgres", {"PF_DB_PASSWORD": "pw"})
    assert (db.get_backend_name(), db.host, db.port) == ("postgresql", "postgres", 5432)
    assert (db.username, db.password, db.database) == (pg["POSTGRES_USER"], "pw", pg["POSTGRES_DB"])


def test_haproxy_balances_over_the_coordinator_replicas():
    """The frontend is the port the lb publishes; the backend resolves the `coordinator` service
    through Docker's DNS (so scaling needs no change here) and health-checks the coordinator's /healthz."""
    coordinator_port = command("coordinator")[command("coordinator").index("--port") + 1]
    (bind,) = haproxy("bind")
    published = SERVICES["lb"]["ports"][0]
    assert bind[1] == ":" + published.rsplit(":", 1)[1] and SERVICES["lb"]["image"].split(":")[0] == "haproxy"
    config_mount = SERVICES["lb"]["volumes"][0].split(":")
    assert (REPO / config_mount[0]).resolve() == REPO / "docker" / "haproxy.cfg"
    assert config_mount[1] == "/usr/local/etc/haproxy/haproxy.cfg"  # where the official image reads it
    (template,) = haproxy("server-template")
    assert template[3] == f"coordinator:{coordinator_port}" and int(template[2]) >= 3
    assert "check" in template and template[template.index("resolvers") + 1] == "docker"
    assert haproxy("nameserver") == [["nameserver", "dns", "127.0.0.11:53"]]  # Docker's embedded DNS
    assert ["option", "httpchk", "GET", "/healthz"] in haproxy("option")
    assert ["balance", "roundrobin"] in haproxy("balance")
    assert haproxy("retry-on") == [["retry-on", "conn-failure"]]  # never resend a request a replica may have run


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy is not installed (apt-get install haproxy)")
def test_haproxy_accepts_its_configuration():
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(REPO / "docker" / "haproxy.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_coordinator_environment_names_are_settings_and_validate():
    raw = SERVICES["coordinator"]["environment"]["PF_ENROLLMENT_KEY"]
    assert raw.startswith("${PF_ENROLLMENT_KEY:?"), "no default key: compose refuses to start without one"
    env = environment("coordinator", {"PF_ENROLLMENT_KEY": "compose-test-key-k7Qx9Lm2Pw4Z"})
    known = {env_name(name) for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    settings = settings_from_env(env)  # every value passes the same validation as a flag would
    assert (
        settings.goal == 10
        and settings.enrollment_key == "compose-test-key-k7Qx9Lm2Pw4Z"
        and settings.db.startswith("postgresql://")
    )
    eval_data = Path(settings.eval_data)
    assert eval_data.is_relative_to("/app")
    assert (REPO / eval_data.relative_to("/app") / "t10k-labels-idx1-ubyte.gz").exists()


def test_device_command_flags_exist_and_point_at_the_load_balancer():
    argv = command("device", {"PF_FLEET_SIZE": "7"})
    assert argv[:3] == ["python", "-m", "simulation.replica"]
    args = replica_parser().parse_args(argv[3:])
    assert args.devices == 7 and args.replica == "auto"
    lb_port = SERVICES["lb"]["ports"][0].rsplit(":", 1)[1]
    assert args.coordinator == f"http://lb:{lb_port}"
    assert str(args.state_root) == mounts("device")["device-state"]
    assert set(environment("device")) == {"PF_ENROLLMENT_KEY"}
    assert environment("device")["PF_ENROLLMENT_KEY"] == environment("coordinator")["PF_ENROLLMENT_KEY"]


def test_dockerfile_installs_the_extras_and_runs_the_coordinator():
    """The image alone runs one coordinator on SQLite in /data; compose runs the same command with
    PF_DB pointing at PostgreSQL instead."""
    text = (REPO / "Dockerfile").read_text()
    assert ".[coordinator,agent]" in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd == command("coordinator") + ["--db", "/data/pocketfed.db"]
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


def test_compose_topology_as_processes(tmp_path, pg_url, monkeypatch):
    """PostgreSQL (the local server, a fresh database), two coordinator replicas started with the
    compose command and environment, the load balancer in front of them (simulation/balancer.py
    playing haproxy), and three device replicas pointed at it, each deriving its shard from
    PF_REPLICA_ID: round 1 commits with all three updates, and both replicas served devices."""
    secret = {"PF_ENROLLMENT_KEY": "compose-test-key-k7Qx9Lm2Pw4Z"}  # compose requires one
    env = {
        **environment("coordinator", secret),
        "PF_DB": pg_url,  # postgres:5432 in compose
        "PF_GOAL": "3",
        "PF_OVER_SELECT": "1.0",
        "PF_EVAL_DATA": str(REPO / "engine/data/embedded"),
        "PF_MAX_RETRY_AFTER": "1",
        "PF_LOG_LEVEL": "warning",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the coordinators' environment (CoordinatorProcess passes ours on)
    argv = command("coordinator")
    assert argv[1:] == ["--host", "0.0.0.0", "--port", "8000"]  # CoordinatorProcess: loopback, a free port
    coordinators = []
    for i in range(2):
        (tmp_path / f"c{i}").mkdir()
        coordinators.append(CoordinatorProcess(tmp_path / f"c{i}", {}))
    replicas = []
    with contextlib.ExitStack() as stack:
        for c in coordinators:
            c.start(timeout=120)
            stack.callback(c.stop)
        balancer = stack.enter_context(Balancer([("127.0.0.1", c.port) for c in coordinators]))
        device_argv = [
            {"python": sys.executable, "http://lb:8000": balancer.url, "/state": str(tmp_path / "state")}.get(a, a)
            for a in command("device", {"PF_FLEET_SIZE": "5"})
        ] + ["--rounds", "1", "--max-wait", "1"]
        for i in range(3):
            replica_env = {
                **os.environ,
                **environment("device", secret),
                "PYTHONPATH": str(REPO),
                "PF_REPLICA_ID": f"pocketfed-device-{i + 1}",
                "OPENBLAS_NUM_THREADS": "1",
            }
            replicas.append(
                subprocess.Popen(
                    device_argv, env=replica_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        try:
            outputs = [r.communicate(timeout=240) for r in replicas]
        finally:
            for r in replicas:
                if r.poll() is None:
                    r.kill()
        for r, (_, err) in zip(replicas, outputs, strict=True):
            assert r.returncode == 0, err[-2000:]
        indices = sorted(int(out.split("device-index ")[1].split()[0]) for out, _ in outputs)
        assert indices == [0, 1, 2]  # distinct shards of the 5
        assert {json.loads(out.splitlines()[-1])["round"] for out, _ in outputs} == {1}
        for c in coordinators:  # either replica serves the same books
            round_1 = httpx.get(c.url + "/v1/rounds/1", timeout=10).json()
            assert round_1["status"] == "committed" and round_1["received"] == 3
        assert all(balancer.counters[f"127.0.0.1:{c.port}"] > 0 for c in coordinators), balancer.counters
    claimed = {p.read_text().strip() for p in (tmp_path / "state" / "claims").glob("slot-*")}
    assert claimed == {f"pocketfed-device-{i}" for i in (1, 2, 3)}
    report = audit(pg_url)
    assert report.ok and report.in_committed_rounds == 3, report.problems
