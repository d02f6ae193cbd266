"""Every write, on one open transaction (`Store.transaction()` hands out a `Writes`).

Statements are built once at import; SQLAlchemy caches their compiled form. Upserts use the
dialect's own INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL spell it alike).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from functools import cache

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from coordinator.store.rows import NewRound, UpdateRow
from coordinator.store.schema import assignments, devices, model_versions, rounds, server_state, updates

_b = sa.bindparam


@cache
def _state_statements(dialect: str) -> tuple[sa.Insert, sa.Insert]:
    """(upsert, insert-if-missing) of a server_state row, in the dialect's INSERT ... ON CONFLICT."""
    insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
    upsert = insert(server_state).values(key=_b("key"), value=_b("value"))
    upsert = upsert.on_conflict_do_update(index_elements=[server_state.c.key], set_={"value": upsert.excluded.value})
    return upsert, insert(server_state).on_conflict_do_nothing()


ADD_DEVICE = sa.insert(devices)
TOUCH_DEVICE = sa.update(devices).where(devices.c.id == _b("device_id")).values(last_seen=_b("seen"))
ADD_VERSION = sa.insert(model_versions)
SET_EVALUATION = (
    sa.update(model_versions)
    .where(model_versions.c.version == _b("v"))
    .values(accuracy=_b("accuracy"), eval_loss=_b("loss"), eval_n=_b("n"))
)
OPEN_ROUND = sa.insert(rounds)
CLOSE_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(status=_b("status"), closed_at=_b("closed_at"), reason=_b("reason"), result_version=_b("result"))
)
ABANDON_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(status="abandoned", closed_at=_b("closed_at"), reason=_b("reason"), aggregate=None)
)
FOLD_INTO_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(
        received=rounds.c.received + _b("added"),
        total_weight=rounds.c.total_weight + _b("samples"),
        aggregate=_b("aggregate"),
    )
)
FOLD_COUNTS_INTO_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(received=rounds.c.received + _b("added"), total_weight=rounds.c.total_weight + _b("samples"))
)
SET_EPSILON = sa.update(rounds).where(rounds.c.id == _b("round_id")).values(epsilon=_b("eps"))
ADD_ASSIGNMENT = sa.insert(assignments)
ADD_UPDATE = sa.insert(updates)


class Writes:
    """The writes one transaction may make; reads inside it go through Store (same connection)."""

    def __init__(self, conn: Connection, dialect: str):
        self.conn, self.dialect = conn, dialect

    # ------------------------------------------------------------------ devices

    def add_device(self, device_id: str, token_hash: str, name: str | None, created_at: float) -> None:
        self.conn.execute(
            ADD_DEVICE, {"id": device_id, "token_hash": token_hash, "name": name, "created_at": created_at}
        )

    def touch_devices(self, seen: Iterable[tuple[str, float]]) -> None:
        """last_seen for each (device id, time)."""
        params = [{"device_id": device_id, "seen": at} for device_id, at in seen]
        if params:
            self.conn.execute(TOUCH_DEVICE, params)

    # ------------------------------------------------------------------ model versions

    def add_version(
        self,
        version: int,
        *,
        sha256: str,
        filename: str,
        architecture: str,
        size_bytes: int,
        num_parameters: int,
        created_at: str,
        round_id: int | None,
    ) -> None:
        self.conn.execute(
            ADD_VERSION,
            {
                "version": version,
                "sha256": sha256,
                "filename": filename,
                "architecture": architecture,
                "size_bytes": size_bytes,
                "num_parameters": num_parameters,
                "created_at": created_at,
                "round_id": round_id,
            },
        )

    def set_evaluation(self, version: int, accuracy: float, loss: float, n: int) -> None:
        self.conn.execute(SET_EVALUATION, {"v": version, "accuracy": accuracy, "loss": loss, "n": n})

    # ------------------------------------------------------------------ rounds

    def open_round(self, new: NewRound) -> int:
        result = self.conn.execute(
            OPEN_ROUND,
            {
                "base_version": new.base_version,
                "status": "open",
                "config": new.config.model_dump_json(),
                "goal": new.goal,
                "max_assignments": new.max_assignments,
                "min_updates": new.min_updates,
                "opened_at": new.opened_at,
                "deadline": new.deadline,
                "dp_clip": new.dp_clip,
                "dp_q": new.dp_q,
                "dp_noise": new.dp_noise,
            },
        )
        return int(result.inserted_primary_key[0])

    def commit_round(self, round_id: int, *, closed_at: float, reason: str, result_version: int) -> None:
        params = {"round_id": round_id, "status": "committed", "closed_at": closed_at, "reason": reason}
        self.conn.execute(CLOSE_ROUND, {**params, "result": result_version})

    def abandon_round(self, round_id: int, *, closed_at: float, reason: str) -> None:
        """Abandoned: its aggregate is dropped (no version will ever use it)."""
        self.conn.execute(ABANDON_ROUND, {"round_id": round_id, "closed_at": closed_at, "reason": reason})

    def fold_into_round(self, round_id: int, *, added: int, samples: float, aggregate: bytes | None) -> None:
        """A group's accepted updates: counters up, and the round's new running aggregate (None: the
        round keeps every delta instead, and has no aggregate)."""
        params = {"round_id": round_id, "added": added, "samples": samples}
        if aggregate is None:
            self.conn.execute(FOLD_COUNTS_INTO_ROUND, params)
        else:
            self.conn.execute(FOLD_INTO_ROUND, {**params, "aggregate": aggregate})

    def set_epsilon(self, round_id: int, epsilon: float) -> None:
        self.conn.execute(SET_EPSILON, {"round_id": round_id, "eps": epsilon})

    # ------------------------------------------------------------------ assignments and updates

    def add_assignment(self, round_id: int, device_id: str, assigned_at: float) -> None:
        self.conn.execute(ADD_ASSIGNMENT, {"round_id": round_id, "device_id": device_id, "assigned_at": assigned_at})

    def add_update(self, row: UpdateRow) -> None:
        self.conn.execute(
            ADD_UPDATE,
            {
                "round_id": row.round_id,
                "device_id": row.device_id,
                "idempotency_key": row.idempotency_key,
                "sample_count": row.sample_count,
                "norm": row.norm,
                "encoding": row.encoding,
                "metrics": json.dumps(row.metrics),
                "received_at": row.received_at,
                "response": json.dumps(row.response),
                "delta": row.delta,
            },
        )

    # ------------------------------------------------------------------ server state

    def set_state(self, key: str, value: bytes | str) -> None:
        self.conn.execute(_state_statements(self.dialect)[0], {"key": key, "value": value})

    def add_state_if_missing(self, key: str, value: bytes | str) -> None:
        self.conn.execute(_state_statements(self.dialect)[1], {"key": key, "value": value})
