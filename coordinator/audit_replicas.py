"""The audit's view of replicas (coordinator/audit.py): partial aggregates, round by round.

Each replica folds what it acknowledges into its own partial of the round (service/aggregates.py),
and every accepted row names the replica that acknowledged it, so the books can be checked replica
by replica: a partial that counts an update its replica never acknowledged, or misses one, shows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from coordinator.service.aggregates import merged
from coordinator.store import PartialRow, RoundRow, Store, UpdateRow
from coordinator.strategies import RunningSum
from engine.serialize.container import ContainerError


def with_partials(store: Store, r: RoundRow, problems: list[str]) -> RoundRow:
    """An open round with its stored aggregate as a whole: its row's sum and its replicas' partial sums."""
    parts = [r.aggregate] if r.aggregate is not None else []
    parts += [p.aggregate for p in store.round_partials(r.id) if p.aggregate is not None]
    try:
        total = merged([RunningSum.from_bytes(blob) for blob in parts]) if parts else None
    except ContainerError as exc:
        problems.append(f"round {r.id}: a stored partial aggregate is unreadable: {exc}")
        return r
    return replace(r, aggregate=total.to_bytes() if total is not None else None)


def check_partials(partials: list[PartialRow], rows: list[UpdateRow]) -> list[str]:
    """Each replica's partial of each round counts exactly the updates (and samples) that replica
    acknowledged; returns the problems found."""
    problems = []
    counts: Counter[tuple[int, str]] = Counter()
    weights: Counter[tuple[int, str]] = Counter()
    for row in rows:
        if row.replica is not None:  # rows from before replicas were folded into their round's row
            counts[row.round_id, row.replica] += 1
            weights[row.round_id, row.replica] += row.sample_count
    for p in partials:
        key = (p.round_id, p.replica)
        n, weight = counts.pop(key, 0), weights[key]
        if p.received != n or p.total_weight != weight:
            problems.append(
                f"round {p.round_id}: replica {p.replica}'s partial counts {p.received} updates "
                f"({p.total_weight:g} samples); it acknowledged {n} ({weight:g})"
            )
    for (round_id, replica), n in counts.items():
        problems.append(f"round {round_id}: replica {replica} acknowledged {n} updates but has no partial")
    return problems
