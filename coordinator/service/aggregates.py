"""Hierarchical aggregation: each replica's partial running sum of a round, and the round's total.

Every replica folds the updates it acknowledges into its own `round_partials` row, in the same
transaction as the acknowledgement (service/writer.py), so replicas never contend for one row; a
round's total is its rows' sum, added up once, by the replica that commits it (service/rounds.py).
SQLite has one process and so one partial per round (replica "local"), which keeps the embedded
default's arithmetic exactly that of one running sum, across restarts too.

This replica's latest partial is kept in memory so that neither its next group nor a commit parses
the stored blob back; it is only a cache: used when the partial's stored count still matches it,
else the blob is read again.
"""

from __future__ import annotations

import os
import secrets
import socket

from coordinator.store import RoundRow, Store
from coordinator.strategies import RunningSum

SQLITE_REPLICA = "local"


def replica_name(store: Store) -> str:
    """This process's name in partials, updates and the lease: one per process start on a shared
    database (a restarted replica starts a new partial; its old one still counts), "local" on SQLite."""
    if not store.shared:
        return SQLITE_REPLICA
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


def merged(parts: list[RunningSum]) -> RunningSum:
    """The sum of running sums, in the order given (one part is returned as it is: no rounding added)."""
    if len(parts) == 1:
        return parts[0]
    total = RunningSum()
    for part in parts:
        for name, value in part.sums.items():
            total.sums[name] = total.sums[name] + value if name in total.sums else value
        total.total_weight += part.total_weight
        total.count += part.count
    return total


class RoundAggregates:
    def __init__(self, store: Store, replica: str):
        self.store, self.replica = store, replica
        self._cached: tuple[int, int, RunningSum] | None = None  # (round, partial count, its sum)

    def partial(self, round_id: int, streaming: bool) -> tuple[int | None, RunningSum | None]:
        """(this replica's stored count for the round, None if it has no partial yet; a copy of its
        running sum for a streaming round). Read inside the writer's transaction."""
        count = self.store.partial_count(round_id, self.replica)
        if not streaming:
            return count, None
        if count is None:
            return None, RunningSum()
        return count, self._sum(round_id, count)

    def _sum(self, round_id: int, count: int) -> RunningSum:
        cached = self._cached
        if cached is not None and cached[:2] == (round_id, count):
            return RunningSum(dict(cached[2].sums), cached[2].total_weight, cached[2].count)  # add() makes new arrays
        return RunningSum.from_bytes(self.store.partial_aggregate(round_id, self.replica))

    def remember(self, round_id: int, count: int, running: RunningSum) -> None:
        self._cached = (round_id, count, running)

    def forget(self) -> None:
        self._cached = None

    def total(self, r: RoundRow) -> RunningSum:
        """The round's whole running sum: what its row holds (folded there before replicas existed, or a
        secure aggregation's sum) and then every replica's partial, by replica name."""
        parts = []
        row = r.aggregate if r.aggregate is not None else self.store.round(r.id, with_aggregate=True).aggregate
        if row is not None:
            parts.append(RunningSum.from_bytes(row))
        for p in self.store.round_partials(r.id, with_aggregate=False):
            if p.replica == self.replica:
                parts.append(self._sum(r.id, p.received))
            else:
                parts.append(RunningSum.from_bytes(self.store.partial_aggregate(r.id, p.replica)))
        return merged(parts) if parts else RunningSum()
