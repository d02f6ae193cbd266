"""Scale-out: coordinator replicas on PostgreSQL behind a load balancer, under a device load, with one
replica SIGKILLed mid-run and restarted; then the books are audited.

    python bench/scaleout.py --json          # last line: {"replicas", "devices", "acknowledged", "lost",
                                             #   "double_counted", "killed", "uploads_per_s",
                                             #   "single_replica_uploads_per_s", "sqlite_uploads_per_s", ...}

Three phases on the same load, each on a fresh database: one coordinator on SQLite (the embedded
default, no balancer), one PostgreSQL replica behind the balancer, then `--replicas` PostgreSQL
replicas behind it, where the replica holding the background lease is SIGKILLed at 40% of the
phase and started again at 55%. Devices (async httpx, `--devices` of them) loop: check in, upload
a LeNet-sized float32 delta when given a task (retrying a failed upload with the same
Idempotency-Key, as agents do), come back when told. Rounds take `--goal` updates.

`lost`: uploads a device saw acknowledged (202) that are not among the database's accepted updates
of a committed or open round; `double_counted`: the audit's count (coordinator/audit.py: a repeated
key or (round, device), an aggregate or partial counting more than its rows). Exit status 1 if
either is not 0 or the audit found anything.

Needs the PostgreSQL server at --pg (default 127.0.0.1:5432, user postgres); a database
pf_bench_<random> is created and dropped per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from coordinator.audit import audit  # noqa: E402
from engine.models import build_model_bytes  # noqa: E402
from engine.serialize.container import loads  # noqa: E402
from protocol.update import encode_update  # noqa: E402
from simulation.balancer import BalancerProcess  # noqa: E402
from simulation.processes import CoordinatorProcess  # noqa: E402

KEY = "scaleout-bench-k7Qx9Lm2Pw4Z-harness"  # a harness credential: long and varied enough to be accepted
KINDS = ("coordinator", "postgres", "client")  # whose CPU is counted


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_pids(db: str) -> list[int]:
    """The PostgreSQL server processes serving this database's connections (other databases on the
    same server, and the server's shared background work, are not counted)."""
    return [pid for (pid,) in sa_rows(db, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]


class Load:
    """Devices checking in and uploading until told to stop; what was acknowledged, by key."""

    def __init__(self, url: str, devices: int, shapes: dict, per_client: int):
        self.url, self.n, self.shapes, self.per_client = url, devices, shapes, per_client
        self.acked: dict[str, dict] = {}
        self.latency: list[float] = []
        self.retries: Counter[str] = Counter()
        self.refused: Counter[int] = Counter()
        self.enrolled = self.checkins = self.round_checkins = 0

    async def call(self, send):
        """A request, retried (same body, same key) through transport errors and 5xx, as agents do."""
        for _ in range(60):
            try:
                answer = await send()
            except httpx.TransportError as exc:
                self.retries[type(exc).__name__] += 1
            else:
                if answer.status_code < 500:
                    return answer
                self.retries[f"http_{answer.status_code}"] += 1
            await asyncio.sleep(0.1)
        return None

    async def device(self, i: int, client: httpx.AsyncClient) -> None:
        enrolled = await self.call(lambda: client.post("/v1/devices", json={"enrollment_key": KEY}))
        headers = {"Authorization": f"Bearer {enrolled.json()['token']}"}
        self.enrolled += 1
        rng = np.random.default_rng(i)
        delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in self.shapes.items()}
        checkin = lambda: client.post("/v1/checkin", json={"eligible": True}, headers=headers)  # noqa: E731
        held = None  # round 1's only place, taken during the check-in burst
        await self.burst.wait()
        while not self.burst_over.is_set() and held is None:  # as fast as answers come
            answer = await self.call(checkin)
            self.checkins += 1
            if answer is not None and answer.json()["status"] == "task":
                held = answer.json()["task"]
        await self.started.wait()
        while not self.stop.is_set():
            if held is None:
                answer = await self.call(checkin)
                self.round_checkins += 1
                body = answer.json() if answer is not None else {"status": "retry", "retry_after": 1}
                if body["status"] != "task":  # pace steering: come back when told (at most 1 s here)
                    await asyncio.sleep(min(body["retry_after"], 1.0))
                    continue
                held = body["task"]
            t0 = time.perf_counter()
            key, answer = await self.upload(i, headers, delta, held, client)
            held = None
            if answer is not None and answer.status_code == 202:
                self.latency.append(time.perf_counter() - t0)
                self.acked[key] = answer.json()
            elif answer is not None:
                self.refused[answer.status_code] += 1

    async def upload(self, i: int, headers: dict, delta: dict, task: dict, client: httpx.AsyncClient):
        """(its Idempotency-Key, the answer) of one device's update for its task."""
        round_id, base = task["round_id"], task["base_version"]
        data = encode_update(delta, sample_count=1 + i % 50, round_id=round_id, base_version=base)
        key = f"d{i}-r{round_id}"
        headers = {**headers, "Idempotency-Key": key, "Content-Type": "application/octet-stream"}
        return key, await self.call(
            lambda: client.post(f"/v1/rounds/{round_id}/updates", content=data, headers=headers)
        )

    async def run(self, burst: float, seconds: float, between, at: list, cpu) -> dict:
        """Enroll every device; a check-in burst of `burst` seconds (round 1 has one place, so nearly
        every check-in is told to come back); `between()`; then `seconds` of rounds, with `at`'s
        actions at fractions of them. `cpu()` is sampled at each boundary."""
        self.burst, self.burst_over, self.started, self.stop = (asyncio.Event() for _ in range(4))
        limits = httpx.Limits(max_connections=self.per_client, max_keepalive_connections=self.per_client)
        n_clients = -(-self.n // self.per_client)
        clients = [httpx.AsyncClient(base_url=self.url, limits=limits, timeout=60) for _ in range(n_clients)]
        tasks = [asyncio.create_task(self.device(i, clients[i // self.per_client])) for i in range(self.n)]
        while self.enrolled < self.n and not any(t.done() for t in tasks):  # a device that failed ends early
            await asyncio.sleep(0.05)
        marks = {"burst": (time.perf_counter(), await asyncio.to_thread(cpu))}
        self.burst.set()
        await asyncio.sleep(burst)
        self.burst_over.set()
        marks["burst_end"] = (time.perf_counter(), await asyncio.to_thread(cpu))
        checkins = self.checkins
        await asyncio.to_thread(between)
        marks["rounds"] = (time.perf_counter(), await asyncio.to_thread(cpu))
        t0 = marks["rounds"][0]
        self.started.set()
        for when, action in at:  # events at fractions of the phase (the kill, the restart)
            await asyncio.sleep(max(0.0, t0 + when * seconds - time.perf_counter()))
            await asyncio.to_thread(action)
        await asyncio.sleep(max(0.0, t0 + seconds - time.perf_counter()))
        acked, round_checkins = len(self.acked), self.round_checkins
        marks["end"] = (time.perf_counter(), await asyncio.to_thread(cpu))
        self.stop.set()
        await asyncio.wait(tasks, timeout=120)  # uploads in flight finish (and count) before the audit
        for client in clients:
            await client.aclose()
        return {"marks": marks, "checkins": checkins, "acked_in_time": acked, "round_checkins": round_checkins}


def run_phase(args, name: str, db: str, replicas: int, workdir: Path, kill: bool) -> dict:
    """Start the coordinators (and a balancer for PostgreSQL), drive the load, audit."""
    options = {
        "db": db,
        "model": "lenet",
        "enrollment_key": KEY,
        "admin_token": KEY,
        "enroll_per_address": 1_000_000,  # every device enrolls from this one loopback address
        "min_devices": 1,  # the first round has one device (a load test, not a privacy one)
        "goal": 1,  # round 1, during the check-in burst; then args.goal (PATCH /v1/admin/settings)
        "over_select": 1.0,
        "deadline": 600,
        "min_retry_after": 0,
        "max_retry_after": 1,
        "tick_interval": 0.5,
        "lease_seconds": 3,
        "log_level": "warning",
    }
    postgres = db.startswith("postgresql")
    procs = []
    for i in range(replicas):
        (workdir / f"{name}-{i}").mkdir()
        procs.append(CoordinatorProcess(workdir / f"{name}-{i}", options))
    balancer, killed = None, []

    def cpu() -> dict[str, dict[int, float]]:
        """CPU seconds so far of each coordinator, each of this database's backends, and this process."""
        return {
            "coordinator": {p.proc.pid: cpu_seconds(p.proc.pid) for p in procs if p.running},
            "postgres": {pid: cpu_seconds(pid) for pid in backend_pids(db)} if postgres else {},
            "client": {0: time.process_time()},
        }

    def goal() -> None:
        answer = httpx.patch(
            url + "/v1/admin/settings", json={"goal": args.goal}, headers={"Authorization": f"Bearer {KEY}"}
        )
        answer.raise_for_status()

    def kill_leader() -> None:
        holder = sa_scalar(db, "SELECT holder FROM leases WHERE name = 'background'") or ""
        victim = next((p for p in procs if f"-{p.proc.pid}-" in holder), procs[-1])
        victim.proc.kill()
        victim.proc.wait()
        killed.append(f"replica {procs.index(victim)} (pid {victim.proc.pid}{', lease holder' if holder else ''})")

    def restart() -> None:
        for proc in procs:
            if not proc.running:
                proc.stop()
                proc.start(timeout=120)

    try:
        for proc in procs:
            proc.start(timeout=120)
        if postgres:
            balancer = BalancerProcess([("127.0.0.1", p.port) for p in procs]).start()
        url = balancer.url if balancer else procs[0].url
        model = loads(build_model_bytes("lenet"), kind="model")
        names = model.metadata.get("trainable") or list(model.tensors)
        load = Load(url, args.devices, {k: model.tensors[k].shape for k in names}, args.devices_per_client)
        events = [(0.4, kill_leader), (0.55, restart)] if kill else []
        run = asyncio.run(load.run(args.checkin_seconds, args.seconds, goal, events, cpu))
    finally:
        counters = balancer.stop() if balancer is not None else {}
        for proc in procs:
            proc.stop()
    marks = run["marks"]

    def spent(kind: str, since: str, until: str) -> float:
        before, after = marks[since][1][kind], marks[until][1][kind]
        return sum(value - before.get(pid, 0.0) for pid, value in after.items())

    def load_of(kind: str, since: str, until: str) -> float:
        return round(spent(kind, since, until) / (marks[until][0] - marks[since][0]), 2)

    report = audit(db)
    lost = sorted(set(load.acked) - counted_keys(db))
    acked, checkins = len(load.acked), run["checkins"]
    result = {
        "acknowledged": acked,
        "lost": len(lost) + report.lost,
        "double_counted": report.double_counted,
        "uploads_per_s": round(run["acked_in_time"] / (marks["end"][0] - marks["rounds"][0]), 1),
        "audit_ok": report.ok,
        "audit_problems": report.problems[:5],
        "rounds_committed": report.committed_rounds,
        "upload_p50_ms": round(float(np.percentile(load.latency, 50)) * 1000, 1) if load.latency else None,
        "upload_p99_ms": round(float(np.percentile(load.latency, 99)) * 1000, 1) if load.latency else None,
        "transport_retries": dict(load.retries),
        "refused": {str(k): v for k, v in load.refused.items()},
        "killed": killed,
        # the check-in burst: every device asks as fast as it is answered and is told to come back
        "checkins_per_s": round(checkins / (marks["burst_end"][0] - marks["burst"][0]), 1),
        "coordinator_cpu_ms_per_checkin": round(1000 * spent("coordinator", "burst", "burst_end") / checkins, 3),
        # CPU seconds per second (1.0 = one core busy): who was short of CPU
        "checkin_cpu_load": {
            kind: load_of(kind, "burst", "burst_end") for kind in ("coordinator", "postgres", "client")
        },
        "upload_cpu_load": {kind: load_of(kind, "rounds", "end") for kind in ("coordinator", "postgres", "client")},
        # the rounds (uploads and the check-ins between them): CPU per acknowledged upload, and without
        # those check-ins (each costed as one of the burst's)
        "checkins_per_upload": round(run["round_checkins"] / max(run["acked_in_time"], 1), 2),
        "coordinator_cpu_ms_per_upload": round(1000 * spent("coordinator", "rounds", "end") / max(acked, 1), 2),
    }
    per_checkin = spent("coordinator", "burst", "burst_end") / checkins
    alone = spent("coordinator", "rounds", "end") - run["round_checkins"] * per_checkin
    result["coordinator_cpu_ms_per_upload_alone"] = round(1000 * alone / max(run["acked_in_time"], 1), 2)
    if postgres:
        result["postgres_backend_cpu_ms_per_checkin"] = round(
            1000 * spent("postgres", "burst", "burst_end") / checkins, 3
        )
        result["postgres_backend_cpu_ms_per_upload"] = round(
            1000 * spent("postgres", "rounds", "end") / max(acked, 1), 2
        )
        pg_alone = (
            spent("postgres", "rounds", "end")
            - run["round_checkins"] * spent("postgres", "burst", "burst_end") / checkins
        )
        result["postgres_backend_cpu_ms_per_upload_alone"] = round(1000 * pg_alone / max(run["acked_in_time"], 1), 2)
        by_replica = sa_rows(db, "SELECT COUNT(*) FROM updates GROUP BY replica")
        result["acknowledged_by_replica"] = sorted(n for (n,) in by_replica)
        result["balancer"] = counters
    return result


def sa_rows(url: str, sql: str) -> list[tuple]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


def sa_scalar(url: str, sql: str):
    rows = sa_rows(url, sql)
    return rows[0][0] if rows else None


def counted_keys(db: str) -> set[str]:
    """Idempotency keys of accepted updates in committed or open rounds (an abandoned round's are lost)."""
    sql = "SELECT u.idempotency_key FROM updates u JOIN rounds r ON r.id = u.round_id WHERE r.status <> 'abandoned'"
    if db.startswith("postgresql"):
        return {k for (k,) in sa_rows(db, sql)}
    import sqlite3

    with sqlite3.connect(db) as conn:
        return {k for (k,) in conn.execute(sql)}


class Databases:
    def __init__(self, server: str):
        self.server = server
        self.admin = sa.create_engine(f"postgresql+psycopg://{server}/postgres", isolation_level="AUTOCOMMIT")

    def __enter__(self) -> Databases:
        self.names: list[str] = []
        return self

    def create(self) -> str:
        name = f"pf_bench_{secrets.token_hex(5)}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        self.names.append(name)
        return f"postgresql://{self.server}/{name}"

    def __exit__(self, *exc) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.admin.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--devices", type=int, default=120)
    p.add_argument("--goal", type=int, default=None, help="updates per round (default: half the devices)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase's rounds of uploads")
    p.add_argument("--checkin-seconds", type=float, default=5.0, help="length of each phase's check-in burst")
    p.add_argument("--devices-per-client", type=int, default=10, help="devices sharing one connection pool")
    p.add_argument("--pg", default="postgres@127.0.0.1:5432", help="PostgreSQL server: user@host:port")
    p.add_argument("--skip-baselines", action="store_true", help="only the replicated phase")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.goal = args.goal or max(1, args.devices // 2)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    workdir = Path(tempfile.mkdtemp(prefix="pf-scaleout-"))
    phases = {}
    with Databases(args.pg) as databases:
        if not args.skip_baselines:
            say("phase 1/3: one coordinator on SQLite")
            phases["sqlite"] = run_phase(args, "sqlite", str(workdir / "sqlite.db"), 1, workdir, kill=False)
            say(f"  {phases['sqlite']['uploads_per_s']} uploads/s")
            say("phase 2/3: one PostgreSQL replica behind the balancer")
            phases["single"] = run_phase(args, "single", databases.create(), 1, workdir, kill=False)
            say(f"  {phases['single']['uploads_per_s']} uploads/s")
        say(f"phase 3/3: {args.replicas} PostgreSQL replicas behind the balancer, one SIGKILLed and restarted")
        phases["replicas"] = main_phase = run_phase(
            args, "replicas", databases.create(), args.replicas, workdir, kill=True
        )
        say(f"  {main_phase['uploads_per_s']} uploads/s, killed {main_phase['killed']}")
    shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "replicas": args.replicas,
        "devices": args.devices,
        "acknowledged": main_phase["acknowledged"],
        "lost": main_phase["lost"],
        "double_counted": main_phase["double_counted"],
        "killed": len(main_phase["killed"]),
        "uploads_per_s": main_phase["uploads_per_s"],
        "single_replica_uploads_per_s": phases.get("single", {}).get("uploads_per_s"),
        "sqlite_uploads_per_s": phases.get("sqlite", {}).get("uploads_per_s"),
        "goal": args.goal,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "phases": phases,
    }
    print(json.dumps(result), flush=True)
    bad = any(phase["lost"] or phase["double_counted"] or not phase["audit_ok"] for phase in phases.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
