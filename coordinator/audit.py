"""An after-the-fact audit of a coordinator's books, from its database and model files alone.

    python -m coordinator.audit --db run/coordinator.db [--models DIR] [--uploads DIR] [--json]
    python -m coordinator.audit --db postgresql://user@host/dbname ...

It reads the database through the store (read-only: no migration, no write), so it works on
SQLite and PostgreSQL alike (model files then come from the database's blobs), and it checks
replicas' partial aggregates: an open round's stored sum is its partials' sum, and each replica's
partial counts exactly the updates that replica acknowledged. It answers a sceptical operator's
questions after crashes, restarts and network faults:

- **nothing lost**: every update the coordinator acknowledged (an accepted `updates` row, and
  with `--uploads` every upload a witness saw answered 2xx) is counted in exactly one committed
  round or in the open round's running aggregate - not in an abandoned round, not missing;
- **nothing double-counted**: one row per (round, device) and per Idempotency-Key, each round's
  stored aggregate counts exactly its rows, and no update body was accepted twice;
- **every committed version is right**: its file is the registered one (sha256) and its weights
  equal base + server_lr * the sample-weighted mean of exactly its round's updates.

The coordinator keeps no per-update deltas for streaming strategies (only each round's running
sum), so the independent recomputation needs the update bodies from elsewhere: `--uploads` is a
directory written by the fault proxy (simulation/faultproxy.py), which saved every
upload it relayed whole. Without it, versions are checked against the stored running sums only.
The recomputation covers FedAvg/FedProx rounds without server-side clipping or DP (the strategies
whose step is stateless); other rounds are reported as `versions_skipped`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from coordinator.audit_replicas import check_partials, with_partials
from coordinator.audit_witness import Witness
from coordinator.service.modelfile import expected_shapes
from coordinator.store import BlobStore, ModelFiles, ModelVersionRow, RoundRow, Store, UpdateRow, blob_store_for
from coordinator.strategies.influence import InfluenceLimits, bounded_by_default, round_limits
from engine.serialize.container import ContainerError, loads
from protocol.deltas import clip_by_l2
from protocol.update import decode_update

RECOMPUTABLE = {"fedavg", "fedprox"}


@dataclass
class AuditReport:
    acknowledged: int = 0  # accepted update rows: the coordinator's own acknowledgements
    wire_acknowledged: int = 0  # distinct uploads the witness saw answered 2xx
    ack_replays: int = 0  # further 2xx answers to an already acknowledged upload (idempotent replays)
    undelivered_acks: int = 0  # 2xx answers the device never received whole
    in_committed_rounds: int = 0
    in_open_round: int = 0
    lost: int = 0
    double_counted: int = 0
    committed_rounds: int = 0
    versions_checked: int = 0  # committed versions compared with base + aggregate
    versions_recomputed: int = 0  # ... of which from the witnessed update bodies
    versions_exact: int = 0  # ... bit for bit
    versions_skipped: int = 0
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.lost == 0 and self.double_counted == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _weights(models: BlobStore, row: ModelVersionRow, report: AuditReport) -> dict[str, np.ndarray] | None:
    """A registered version's tensors, after checking its file against the registry's sha256."""
    try:
        data = models.read(row.filename)
    except OSError as exc:
        report.problems.append(f"model v{row.version}: file {row.filename} is missing ({exc})")
        return None
    if hashlib.sha256(data).hexdigest() != row.sha256:
        report.problems.append(f"model v{row.version}: {row.filename} does not match its registered sha256")
        return None
    return loads(data, kind="model").tensors


def _recompute(
    rows: list[UpdateRow],
    witness: Witness,
    report: AuditReport,
    round_id: int,
    limits: InfluenceLimits | None = None,
) -> tuple[dict[str, np.ndarray], float] | None:
    """Sum of weight * delta (float64, in acceptance order) from the witnessed bodies: the weight is
    the sample count, and under the round's influence limits the delta clipped, the weight capped."""
    sums: dict[str, np.ndarray] = {}
    total = 0.0
    for row in rows:
        body = witness.body(row.idempotency_key)
        if body is None:
            report.problems.append(
                f"round {round_id}: no (or no single) witnessed body for the update of "
                f"device {row.device_id[:8]} (key {row.idempotency_key[:12]})"
            )
            return None
        update = decode_update(body)
        if (update.round_id, update.sample_count) != (round_id, row.sample_count):
            report.problems.append(
                f"round {round_id}: the witnessed body of key {row.idempotency_key[:12]} "
                f"says round {update.round_id}, {update.sample_count} samples; the database "
                f"says round {round_id}, {row.sample_count}"
            )
            return None
        delta, weight = update.delta, float(row.sample_count)
        if limits is not None:
            delta, weight = clip_by_l2(delta, limits.norm_bound)[0], min(weight, limits.weight_cap)
        for name, value in delta.items():
            term = np.asarray(value, np.float64) * weight
            sums[name] = sums[name] + term if name in sums else term
        total += weight
    return sums, total


def _compare(label: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray], report: AuditReport) -> bool:
    """True when `got` equals `want` up to summation order: one float32 ulp for model weights, a relative
    1e-12 for float64 sums. A missing or doubled update moves values by its whole delta, far more."""
    worst, within = 0.0, True
    for name, value in want.items():
        if name not in got or got[name].shape != value.shape:
            report.problems.append(f"{label}: tensor {name!r} missing or of another shape")
            return False
        diff = np.abs(got[name].astype(np.float64) - value.astype(np.float64))
        if value.dtype == np.float32:
            allowed = np.spacing(np.abs(value)).astype(np.float64)
        else:
            allowed = 1e-12 * np.maximum(np.abs(value), 1e-12)
        worst = max(worst, float(np.max(diff, initial=0.0)))
        within = within and bool(np.all(diff <= allowed))
    report.max_abs_diff = max(report.max_abs_diff, worst)
    if not within:
        report.problems.append(f"{label}: differs by up to {worst:.3g}")
    return within


def audit(db: str | Path, models: str | Path | None = None, uploads: str | Path | None = None) -> AuditReport:
    """Check the books; every finding goes into the report (nothing raises for a bad state)."""
    witness = Witness(uploads) if uploads else None
    report = AuditReport()
    store = Store(str(db), readonly=True)
    try:
        _audit(store, ModelFiles(models) if models else blob_store_for(str(db), store), witness, report)
    finally:
        store.close()
    return report


def _audit(store: Store, models: BlobStore, witness: Witness | None, report: AuditReport) -> None:
    rounds = {r.id: with_partials(store, r, report.problems) if r.is_open else r for r in store.rounds()}
    versions = {v.version: v for v in store.versions()}
    rows, devices = store.updates_in_acceptance_order(), store.device_tokens()
    report.acknowledged = len(rows)
    by_round: dict[int, list[UpdateRow]] = {}
    excess: dict[int, int] = {}  # round -> updates its aggregate counts beyond its rows
    for row in rows:
        by_round.setdefault(row.round_id, []).append(row)
    _check_rows(rows, rounds, devices, witness, report)
    for round_id, r in rounds.items():
        mine = by_round.get(round_id, [])
        if r.status == "committed":
            report.committed_rounds += 1
            report.in_committed_rounds += len(mine)
        elif r.status == "open":
            report.in_open_round += len(mine)
        if r.status == "open" and round_id != max(i for i, x in rounds.items() if x.status == "open"):
            report.problems.append(f"round {round_id}: open, but a later round is open too")
        if r.status in ("committed", "open"):
            _check_round(r, mine, rounds, by_round, versions, models, witness, report, excess)
    report.problems += check_partials(store.partials(), rows)
    missing: Counter[int] = Counter()
    if witness is not None:
        missing = _check_witness(rows, witness, report)
    report.double_counted += sum(max(0, n - missing[round_id]) for round_id, n in excess.items())


def _check_rows(
    rows: list[UpdateRow], rounds: dict[int, RoundRow], devices: dict, witness: Witness | None, report: AuditReport
) -> None:
    """Each accepted row: in a committed or open round, unique, and (with a witness) sent by its device."""
    keys = Counter((r.device_id, r.idempotency_key) for r in rows)
    pairs = Counter((r.round_id, r.device_id) for r in rows)
    extra = sum(n - 1 for n in keys.values()) + sum(n - 1 for n in pairs.values())
    if extra:
        report.double_counted += extra
        report.problems.append(f"{extra} accepted rows repeat an Idempotency-Key or a (round, device) pair")
    for row in rows:
        r = rounds.get(row.round_id)
        if r is None or r.status == "abandoned":
            report.lost += 1
            report.problems.append(
                f"acknowledged update of device {row.device_id[:8]} (key "
                f"{row.idempotency_key[:12]}) is in round {row.round_id}, which is "
                f"{'missing' if r is None else 'abandoned'}"
            )
        if witness is not None and witness.tokens.get(row.idempotency_key) not in (None, devices.get(row.device_id)):
            report.problems.append(
                f"key {row.idempotency_key[:12]} was sent with another device's token "
                f"than the one it is recorded under ({row.device_id[:8]})"
            )
    if witness is not None:
        shas = Counter(
            next(iter(witness.bodies[r.idempotency_key]))
            for r in rows
            if len(witness.bodies.get(r.idempotency_key, ())) == 1
        )
        same = sum(n - 1 for n in shas.values())
        if same:
            report.double_counted += same
            report.problems.append(f"{same} accepted rows carry a body already accepted under another key")


def _influence_limits(
    r: RoundRow, rounds: dict, by_round: dict, versions: dict, models: BlobStore, report: AuditReport
) -> InfluenceLimits | None:
    """The round's default influence limits as the coordinator computed them (strategies/influence.py),
    or None when they did not apply (DP, an explicit norm bound, or switched off)."""
    config = r.config
    if not bounded_by_default(config) or r.dp_clip is not None:
        return None
    previous = max((i for i, x in rounds.items() if i < r.id and x.status == "committed"), default=None)
    reference = by_round.get(previous, []) if previous is not None else []
    base_row = versions.get(r.base_version)
    base = _weights(models, base_row, report) if base_row is not None else None
    if base is None:
        return None
    data = models.read(base_row.filename)
    trainable = [base[name] for name in expected_shapes(loads(data, kind="model"))]
    return round_limits(config, trainable, [u.norm for u in reference], [u.sample_count for u in reference])


def _check_round(
    r: RoundRow,
    rows: list[UpdateRow],
    rounds: dict,
    by_round: dict,
    versions: dict,
    models: BlobStore,
    witness: Witness | None,
    report: AuditReport,
    excess: dict[int, int],
) -> None:
    """A committed or open round: its counters, its running sum, and (committed) its model version."""
    label, config = f"round {r.id}", r.config
    if r.received != len(rows):
        report.problems.append(f"{label}: received={r.received} but {len(rows)} accepted rows")
    weight = float(sum(row.sample_count for row in rows))
    if r.total_weight != weight:
        report.problems.append(f"{label}: total_weight={r.total_weight} but the rows hold {weight} samples")
    limits = _influence_limits(r, rounds, by_round, versions, models, report)
    if limits is not None:  # the aggregate weighs each update at most the cap
        weight = float(sum(min(float(row.sample_count), limits.weight_cap) for row in rows))
    stored = None
    if r.aggregate is not None:
        try:
            stored = loads(r.aggregate, kind="aggregate")
        except ContainerError as exc:
            report.problems.append(f"{label}: stored aggregate is unreadable: {exc}")
    if stored is not None and r.dp_clip is None:
        count = int(stored.metadata["count"])
        if count > len(rows):  # counted more than it acknowledged: double, unless rows went missing
            excess[r.id] = count - len(rows)
        elif count < len(rows):
            report.lost += len(rows) - count
        if count != len(rows) or float(stored.metadata["total_weight"]) != weight:
            report.problems.append(
                f"{label}: the stored aggregate counts {count} updates and "
                f"{stored.metadata['total_weight']} samples; the rows: {len(rows)}, {weight}"
            )
    plain = config.strategy in RECOMPUTABLE and r.dp_clip is None and config.norm_bound is None
    witnessed = _recompute(rows, witness, report, r.id, limits) if witness is not None and plain and rows else None
    if witnessed is not None and stored is not None:
        _compare(f"{label}: stored aggregate vs witnessed bodies", stored.tensors, witnessed[0], report)
    if r.status != "committed":
        return
    version = versions.get(r.result_version)
    if version is None or version.round_id != r.id:
        report.problems.append(
            f"{label}: committed, but its result version {r.result_version} is not registered as produced by it"
        )
        return
    base_row = versions.get(r.base_version)
    if not plain or base_row is None:
        report.versions_skipped += 1
        return
    base, new = _weights(models, base_row, report), _weights(models, version, report)
    sums, total = witnessed if witnessed is not None else (stored.tensors, weight) if stored else (None, 0.0)
    if base is None or new is None or sums is None or total <= 0:
        report.versions_skipped += 1
        return
    lr = float(config.server_lr)
    expected = {
        name: (np.asarray(base[name], np.float64) + lr * (s / total)).astype(base[name].dtype)
        for name, s in sums.items()
    }
    report.versions_checked += 1
    if (
        _compare(
            f"model v{version.version} (round {r.id}) vs base v{r.base_version} + aggregate",
            new,
            expected,
            report,
        )
        and witnessed is not None
    ):
        report.versions_recomputed += 1
        report.versions_exact += all(np.array_equal(new[n], expected[n]) for n in expected)


def _check_witness(rows: list[UpdateRow], witness: Witness, report: AuditReport) -> Counter[int]:
    """Every upload answered 2xx on the wire is an accepted row; returns the rows missing, by round."""
    missing: Counter[int] = Counter()
    counted = {r.idempotency_key: r for r in rows}
    report.wire_acknowledged = len(witness.acks)
    report.ack_replays = sum(n - 1 for n in witness.acks.values())
    report.undelivered_acks = witness.undelivered
    for key in witness.acks:
        row = counted.get(key)
        if row is None:
            report.lost += 1
            missing.update(witness.ack_rounds[key])
            report.problems.append(f"upload key {key[:12]} was acknowledged on the wire but has no accepted row")
        elif len(witness.ack_rounds[key]) > 1:
            report.double_counted += 1
            report.problems.append(
                f"upload key {key[:12]} was acknowledged for several rounds {sorted(witness.ack_rounds[key])}"
            )
        if len(witness.bodies.get(key, ())) > 1:
            report.problems.append(f"upload key {key[:12]} was sent with {len(witness.bodies[key])} different bodies")
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordinator.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, help="the coordinator's SQLite file, or its postgresql:// URL")
    p.add_argument(
        "--models", default=None, help="model files directory (default: <db>.models; PostgreSQL: the database)"
    )
    p.add_argument("--uploads", default=None, help="the fault proxy's record directory (uploads.jsonl, bodies/)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = p.parse_args(argv)
    try:
        report = audit(args.db, args.models, args.uploads)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(
            f"{'OK' if report.ok else 'FAILED'}: {report.acknowledged} acknowledged updates "
            f"({report.in_committed_rounds} in {report.committed_rounds} committed rounds, "
            f"{report.in_open_round} in the open round), lost {report.lost}, double-counted "
            f"{report.double_counted}; {report.versions_checked} versions checked, "
            f"{report.versions_recomputed} recomputed from witnessed bodies, {report.versions_skipped} skipped"
        )
        for problem in report.problems:
            print("  - " + problem)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
