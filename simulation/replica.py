"""The device entrypoint of docker-compose: one replica of a scaled service finds its own shard.

    python -m simulation.replica --coordinator http://coordinator:8000 --devices 20 \
        --partition dirichlet:0.3 --state-root /state

`docker compose up --scale device=20` starts identical containers; each needs a different,
stable device index in 0..N-1 (its data shard and its state directory). Compose gives a
replica no index it can read, so replicas *claim* one on the shared state volume:

- a slot is the file `claims/slot-NNNNN` holding the claimant's identity (the container
  hostname, or PF_REPLICA_ID when set); claims happen under an flock on `claims/lock`;
- a restarted container (same hostname) finds its slot again -> same shard, same token;
- a replica refreshes its slot's mtime every lease/3 seconds; a slot not refreshed for a
  whole lease (its container is gone) may be taken over by a new one;
- `--replica K` skips all this and uses index K.

The shard itself is `shards.device_indices(...)`, the same pure function pf-sim uses.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("pocketfed.replica")


def replica_identity() -> str:
    return os.environ.get("PF_REPLICA_ID") or socket.gethostname()


def slot_path(claims: Path, index: int) -> Path:
    return claims / f"slot-{index:05d}"


def claim_slot(claims: Path, n_slots: int, identity: str, lease: float, now: float | None = None) -> int:
    """The slot this identity holds, else the first free one, else the stalest expired one."""
    claims.mkdir(parents=True, exist_ok=True)
    now = time.time() if now is None else now
    with open(claims / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        paths = [slot_path(claims, i) for i in range(n_slots)]
        held = {i: p.read_text().strip() for i, p in enumerate(paths) if p.exists()}
        mine = [i for i, owner in held.items() if owner == identity]
        free = [i for i in range(n_slots) if i not in held]
        expired = sorted((paths[i].stat().st_mtime, i) for i in held if now - paths[i].stat().st_mtime > lease)
        if mine:
            index = mine[0]
        elif free:
            index = free[0]
        elif expired:
            index = expired[0][1]
            log.info("taking over slot %d from %s (lease expired)", index, held[index])
        else:
            raise RuntimeError(
                f"all {n_slots} device slots in {claims} are held by live replicas; "
                "scale to at most --devices replicas or raise --devices"
            )
        slot_path(claims, index).write_text(identity + "\n")
        os.utime(slot_path(claims, index))
        return index


def keep_lease(path: Path, lease: float, stop: threading.Event) -> None:
    while not stop.wait(lease / 3):
        try:
            os.utime(path)
        except OSError as exc:
            log.warning("cannot refresh %s: %s", path, exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulation.replica",
        description="Run one device of a scaled compose service on its own shard.",
    )
    p.add_argument("--coordinator", required=True, help="base URL, e.g. http://coordinator:8000")
    p.add_argument("--devices", type=int, required=True, help="number of shards N (the largest fleet size)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K | quantity:ALPHA")
    p.add_argument("--seed", type=int, default=0, help="partition seed (the same on every replica)")
    p.add_argument("--data", default=None, help="IDX dataset directory (default: the embedded subset)")
    p.add_argument("--samples-per-device", type=int, default=None)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--state-root", type=Path, required=True, help="shared volume: claims/ and device-NNNNN/")
    p.add_argument("--replica", default="auto", help="device index, or 'auto' to claim one (see module doc)")
    p.add_argument("--lease", type=float, default=120.0, help="seconds before a silent slot may be taken")
    p.add_argument("--enrollment-key", default=os.environ.get("PF_ENROLLMENT_KEY"), help="default: $PF_ENROLLMENT_KEY")
    p.add_argument("--rounds", type=int, default=None, help="stop after N rounds (default: run until stopped)")
    p.add_argument("--max-wait", type=float, default=30.0, help="longest pause between check-ins (s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.enrollment_key:
        sys.exit("replica: --enrollment-key or PF_ENROLLMENT_KEY is required")
    if args.devices < 1:
        sys.exit(f"replica: --devices must be >= 1, got {args.devices}")
    from device_agent.client import CoordinatorClient
    from device_agent.eligibility import AlwaysEligible
    from device_agent.runner import Agent, AgentConfig
    from device_agent.state import AgentState
    from simulation.shards import device_dataset, device_indices, labels_of, load_split

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `docker stop`: exit at once, state is atomic
    stop = threading.Event()
    if args.replica == "auto":
        identity = replica_identity()
        index = claim_slot(args.state_root / "claims", args.devices, identity, args.lease)
        threading.Thread(
            target=keep_lease,
            args=(slot_path(args.state_root / "claims", index), args.lease, stop),
            daemon=True,
        ).start()
    else:
        try:
            index, identity = int(args.replica), f"replica-{args.replica}"
        except ValueError:
            sys.exit(f"replica: --replica must be 'auto' or an integer, got {args.replica!r}")
    train = load_split(args.data, "train")
    parts = device_indices(labels_of(train), args.devices, args.partition, args.seed, args.samples_per_device)
    dataset = device_dataset(train, parts, index)
    log.info(
        "replica %s is device %d of %d: %d samples (%s)",
        identity,
        index,
        args.devices,
        dataset.size(),
        args.partition,
    )
    print(f"device-index {index}", flush=True)
    config = AgentConfig(
        coordinator=args.coordinator,
        enrollment_key=args.enrollment_key,
        name=f"replica-{index}",
        rounds=args.rounds,
        holdout=args.holdout,
        seed=args.seed * 100_003 + index,
        max_wait=args.max_wait,
        json_lines=True,
    )
    try:
        with CoordinatorClient(args.coordinator) as client:
            Agent(config, client, AgentState(args.state_root / f"device-{index:05d}"), dataset, AlwaysEligible()).run()
    except KeyboardInterrupt:
        return 130
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
