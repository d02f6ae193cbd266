"""Load: N concurrent simulated devices (async httpx) enroll, check in and upload real LeNet-sized
float32 deltas to one coordinator subprocess on loopback.

Reports uploads/s, p50/p99 latency per call, errors, and the coordinator's memory: VmRSS sampled
while updates arrive (it must stay flat: the aggregate streams, O(model size) whatever the number
of updates) and its peak VmHWM. `--py-spy FILE` also samples the coordinator with py-spy during
the upload phase and prints its hottest functions (the first bottleneck).

    python bench/load.py --devices 1000 --json     # last line: one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.cpu_split import split_ms  # noqa: E402
from engine.serialize.container import loads  # noqa: E402
from protocol.update import encode_update  # noqa: E402

KEY = "load-bench-enrollment-key-k7Qx9Lm2Pw4Z"  # a harness secret: long enough to be accepted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> float:
    """A /proc/<pid>/status memory field in MiB (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int, tid: int | None = None, user: bool = True) -> float:
    """User (unless `user` is False) + system CPU time of a process, or one of its threads (/proc)."""
    where = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = Path(where).read_text().rpartition(")")[2].split()
    return (int(fields[11]) * user + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"enroll": [], "checkin": [], "upload": []}
        self.errors: Counter[str] = Counter()
        self.accepted = 0
        self.checkins_in_upload_phase = 0


async def timed(stats: Stats, kind: str, send):
    """Latency of one call; a transport error is counted and retried (at most 3 tries), as agents do."""
    for _attempt in range(3):
        start = time.perf_counter()
        try:
            answer = await send()
        except httpx.TransportError as exc:
            stats.errors[f"{kind}: {type(exc).__name__} (retried)"] += 1
            continue
        stats.latency[kind].append(time.perf_counter() - start)
        return answer
    return None


class Phases:
    """Barriers between the phases, so the coordinator's CPU is measured per kind of request: every
    device enrolls, then checks in until it has a task (or was told to come back), then uploads."""

    def __init__(self, n: int) -> None:
        self.n, self.enrolled, self.checked = n, 0, 0
        self.checkin, self.upload = asyncio.Event(), asyncio.Event()
        self.checkins_after_start = 0  # check-ins sent during the upload phase (goal < devices)


async def device(
    i: int, client: httpx.AsyncClient, shapes: dict, stats: Stats, phases: Phases, deadline: float
) -> None:
    answer = await timed(
        stats, "enroll", lambda: client.post("/v1/devices", json={"enrollment_key": KEY, "name": f"d{i}"})
    )
    phases.enrolled += 1
    if answer is None or answer.status_code != 201:
        stats.errors["enroll: failed"] += 1
        phases.checked += 1
        return
    headers = {"Authorization": f"Bearer {answer.json()['token']}"}
    rng = np.random.default_rng(i)
    delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    await phases.checkin.wait()  # every device checks in at once, then uploads at once
    first = True
    while time.monotonic() < deadline:
        if phases.upload.is_set():
            phases.checkins_after_start += 1
        answer = await timed(
            stats, "checkin", lambda: client.post("/v1/checkin", json={"eligible": True}, headers=headers)
        )
        if answer is None or answer.status_code != 200:
            stats.errors[f"checkin: {getattr(answer, 'status_code', 'no answer')}"] += 1
            await asyncio.sleep(1)
            continue
        body = answer.json()
        if first:  # one answer each (a task, or "come back") before the uploads start
            first = False
            phases.checked += 1
        if body["status"] == "retry":
            await asyncio.sleep(min(body["retry_after"], 1.0))
            continue
        task = body["task"]
        data = encode_update(
            delta, sample_count=32, round_id=task["round_id"], base_version=task["base_version"], metrics={"loss": 1.0}
        )
        url = f"/v1/rounds/{task['round_id']}/updates"
        upload_headers = {
            **headers,
            "Idempotency-Key": f"d{i}-r{task['round_id']}",
            "Content-Type": "application/octet-stream",
        }
        await phases.upload.wait()
        answer = await timed(
            stats, "upload", lambda u=url, d=data, h=upload_headers: client.post(u, content=d, headers=h)
        )  # retried with the same key
        if answer is not None and answer.status_code == 202:
            stats.accepted += 1
            return
        stats.errors[f"upload: {getattr(answer, 'status_code', 'no answer')}"] += 1
    stats.errors["gave up at the time limit"] += 1
    if first:  # never answered: the check-in phase must not wait for it
        phases.checked += 1


async def run_devices(
    url: str, n: int, stats: Stats, time_limit: float, per_client: int, mark: Callable[[str], None]
) -> None:
    """`per_client` devices share one httpx client: httpcore scans its whole pool on every request,
    so one client of 1,000 connections would make the load generator, not the server, the bottleneck.
    `mark(phase)` is called as each phase starts ("enroll", "checkin", "upload") and ends ("end")."""
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    tls = httpx.create_ssl_context()  # built once: every client would otherwise load the CA bundle again
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=120, verify=tls))
            for _ in range(-(-n // per_client))
        ]
        client = clients[0]
        latest = (await client.get("/healthz")).json()
        token = (await client.post("/v1/devices", json={"enrollment_key": KEY})).json()["token"]
        model = await client.get(f"/v1/models/{latest['model_version']}", headers={"Authorization": f"Bearer {token}"})
        container = loads(model.content, kind="model")
        names = container.metadata.get("trainable") or list(container.tensors)
        shapes = {k: container.tensors[k].shape for k in names}
        phases = Phases(n)
        mark("enroll")
        tasks = [
            asyncio.create_task(
                device(i, clients[i // per_client], shapes, stats, phases, time.monotonic() + time_limit)
            )
            for i in range(n)
        ]
        while phases.enrolled < n:
            await asyncio.sleep(0.02)
        mark("checkin")
        phases.checkin.set()
        while phases.checked < n:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the last answers' last_seen writes (group commit) land in this phase
        mark("upload")
        phases.upload.set()
        await asyncio.gather(*tasks)
        mark("end")
        stats.checkins_in_upload_phase = phases.checkins_after_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--goal",
        type=int,
        default=None,
        help="updates per round (default: --devices, one round taking every upload at once)",
    )
    parser.add_argument("--model", default="lenet", help="coordinator --model (built-in name or file)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds before devices give up")
    parser.add_argument(
        "--devices-per-client", type=int, default=25, help="devices sharing one httpx client (connection pool)"
    )
    parser.add_argument("--py-spy", metavar="FILE", help="profile the coordinator with py-spy (raw format)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pf-load-"))
    port = free_port()
    goal = args.goal or args.devices
    cmd = [
        sys.executable,
        "-m",
        "coordinator",
        "--port",
        str(port),
        "--db",
        str(workdir / "c.db"),
        "--model",
        args.model,
        "--goal",
        str(goal),
        "--over-select",
        "1.0",
        "--deadline",
        "3600",
        "--enrollment-key",
        KEY,
        "--min-retry-after",
        "0",
        "--max-retry-after",
        "5",
        "--log-level",
        "warning",
        "--enroll-per-address",  # every device enrolls from this one loopback address
        "1000000",
    ]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    log = open(workdir / "log", "w")  # noqa: SIM115 (it lives as long as the coordinator)
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    spy = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit(f"coordinator exited: {(workdir / 'log').read_text()[-2000:]}")
            time.sleep(0.1)
        rss_idle = proc_status(server.pid, "VmRSS")
        stats, samples, done = Stats(), [], threading.Event()

        def sample_memory() -> None:
            while not done.is_set():
                samples.append((stats.accepted, proc_status(server.pid, "VmRSS")))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        marks: dict[str, tuple[float, ...]] = {}  # phase -> coordinator CPU-s, wall s, client CPU-s, its loop's

        def mark(phase: str) -> None:
            nonlocal spy
            if phase == "upload" and args.py_spy and shutil.which("py-spy"):
                spy = start_py_spy(server.pid, args.py_spy)  # the upload phase only
            if phase == "end" and spy is not None:
                spy.send_signal(2)
            cpu = cpu_seconds(server.pid), time.perf_counter(), time.process_time(), cpu_seconds(server.pid, server.pid)
            marks[phase] = (*cpu, cpu_seconds(server.pid, user=False))

        asyncio.run(run_devices(url, args.devices, stats, args.time_limit, args.devices_per_client, mark))
        done.set()
        sampler.join()
        if spy is not None:
            spy.wait(timeout=60)
        peak = proc_status(server.pid, "VmHWM")
        rounds = httpx.get(url + "/v1/rounds").json()
        scraped = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    by_fraction = {}
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        want = int(fraction * stats.accepted)
        by_fraction[f"{int(fraction * 100)}%"] = round(
            next((rss for n, rss in samples if n >= want), samples[-1][1]), 1
        )

    def cpu(start: str, end: str) -> float:
        return marks[end][0] - marks[start][0]

    enrolled, checkins = len(stats.latency["enroll"]), len(stats.latency["checkin"])
    t0, t1 = marks["checkin"][1], marks["end"][1]
    result = {
        "devices": args.devices,
        "goal": goal,
        "uploads_accepted": stats.accepted,
        "uploads_per_s": round(stats.accepted / (t1 - t0), 1),  # from the first check-in to the last upload
        "wall_s": round(t1 - t0, 2),
        **{f"{kind}_p50_ms": round(percentile(v, 50), 1) for kind, v in stats.latency.items()},
        **{f"{kind}_p99_ms": round(percentile(v, 99), 1) for kind, v in stats.latency.items()},
        "errors": sum(v for k, v in stats.errors.items() if "retried" not in k),
        "transport_retries": sum(v for k, v in stats.errors.items() if "retried" in k),
        "error_kinds": dict(stats.errors),
        "lost_uploads": args.devices - stats.accepted,
        "rounds_committed": sum(r["status"] == "committed" for r in rounds),
        "coordinator_rss_idle_mib": round(rss_idle, 1),
        "coordinator_rss_by_uploads_mib": by_fraction,
        "coordinator_peak_rss_mib": round(peak, 1),
        # CPU seconds per second of the check-in and upload phases (1.0 = one core busy): the bottleneck
        "coordinator_cpu_load": round(cpu("checkin", "end") / (t1 - t0), 2),
        "client_cpu_load": round((marks["end"][2] - marks["checkin"][2]) / (t1 - t0), 2),
        # the upload phase: every device is enrolled and has its task; only uploads (and, when the
        # goal is below the number of devices, the check-ins of those waiting for the next round)
        "coordinator_cpu_ms_per_upload": round(1000 * cpu("upload", "end") / max(stats.accepted, 1), 2),
        # of which the event loop's thread (HTTP, middleware, routing, auth); the rest is the threads
        # (the request's hashing, decoding and validation; the group-commit writer)
        "coordinator_loop_cpu_ms_per_upload": round(
            1000 * (marks["end"][3] - marks["upload"][3]) / max(stats.accepted, 1), 2
        ),
        "coordinator_sys_cpu_ms_per_upload": round(
            1000 * (marks["end"][4] - marks["upload"][4]) / max(stats.accepted, 1), 2
        ),
        "upload_phase_checkins": stats.checkins_in_upload_phase,
        "uploads_per_group_commit": round(
            counter(scraped, "pf_upload_commit_updates_total") / max(counter(scraped, "pf_upload_commits_total"), 1), 1
        ),
        "coordinator_cpu_ms_per_enroll": round(1000 * cpu("enroll", "checkin") / max(enrolled, 1), 2),
        "coordinator_cpu_ms_per_checkin": round(
            1000 * cpu("checkin", "upload") / max(checkins - stats.checkins_in_upload_phase, 1), 2
        ),
        # everything (enrollment, check-ins, uploads, round commits) over the uploads: the old figure
        "coordinator_cpu_ms_all_calls_per_upload": round(1000 * cpu("enroll", "end") / max(stats.accepted, 1), 2),
    }
    if args.py_spy and Path(args.py_spy).exists():
        result["hottest"] = hottest(Path(args.py_spy))
        loop_ms = result["coordinator_loop_cpu_ms_per_upload"]
        threads_ms = result["coordinator_cpu_ms_per_upload"] - loop_ms
        result["upload_cpu_ms_split"] = split_ms(Path(args.py_spy), loop_ms, threads_ms)
    if not args.json:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    print(json.dumps(result))


def counter(scraped: str, name: str) -> float:
    """A counter's value in a Prometheus text scrape (0 when absent)."""
    for line in scraped.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def start_py_spy(pid: int, out: str) -> subprocess.Popen:
    """py-spy sampling `pid` without pausing it (--nonblocking), once it is attached."""
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--format", "raw", "-o", out, "--rate", "500", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attaching takes a moment; the coordinator is idle meanwhile
    return spy


def hottest(raw: Path, top: int = 8) -> list[str]:
    """Self-time of the busiest frames in a py-spy raw (collapsed stacks) profile, idle frames dropped."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        if (
            any(
                idle in stack
                for idle in ("select (selectors", "_worker (concurrent", "wait (threading", "_run_once", "run_forever")
            )
            and "submit" not in stack
        ):
            continue
        counts[leaf] += int(n)
    total = sum(counts.values()) or 1
    return [f"{100 * n / total:.0f}% {frame}" for frame, n in counts.most_common(top)]


if __name__ == "__main__":
    main()
