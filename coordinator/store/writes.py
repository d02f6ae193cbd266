"""Every write, on one open transaction (`Store.transaction()` hands out a `Writes`).

Statements are built once at import; SQLAlchemy caches their compiled form. Upserts use the
dialect's own INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL spell it alike).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sqlalchemy.engine import Connection

from coordinator.store import locks
from coordinator.store import write_statements as w
from coordinator.store.rows import NewRound, SecAggRow, UpdateRow


class StalePartial(RuntimeError):
    """A replica's partial changed under it (its in-memory view was stale): the group is redone."""


class Writes:
    """The writes one transaction may make; reads inside it go through Store (same connection)."""

    def __init__(self, conn: Connection, dialect: str):
        self.conn, self.dialect = conn, dialect

    # ------------------------------------------------------------------ devices

    def add_device(self, device_id: str, token_hash: str, name: str | None, created_at: float) -> None:
        self.conn.execute(
            w.ADD_DEVICE, {"id": device_id, "token_hash": token_hash, "name": name, "created_at": created_at}
        )

    def add_enrollment_code(self, code_hash: str, created_at: float, expires_at: float) -> None:
        self.conn.execute(w.ADD_CODE, {"code_hash": code_hash, "created_at": created_at, "expires_at": expires_at})

    def spend_enrollment_code(self, code_hash: str, device_id: str, now: float) -> bool:
        """Mark an unspent, unexpired code as spent by `device_id`; False if there is no such code."""
        return self.conn.execute(w.SPEND_CODE, {"hash": code_hash, "spender": device_id, "now": now}).rowcount == 1

    def hit(self, key: str, window: float, now: float) -> int:
        """Store.hit inside this transaction (so a refused request's hit is rolled back with it)."""
        start = int(now // window * window)
        return int(self.conn.execute(w.hit_statement(self.dialect), {"key": key, "start": start}).scalar_one())

    def set_token_hash(self, device_id: str, new_hash: str) -> bool:
        """Replace the device's token (the old one then gets 401); False if there is no such device."""
        return self.conn.execute(w.SET_TOKEN, {"for_id": device_id, "new_hash": new_hash}).rowcount == 1

    def revoke_device(self, device_id: str) -> bool:
        """Forget the device's token; False if there is no such device."""
        return self.set_token_hash(device_id, f"revoked:{device_id}")  # unique, never a token's sha256

    def touch_devices(self, seen: Iterable[tuple[str, float]]) -> None:
        """last_seen for each (device id, time)."""
        params = [{"device_id": device_id, "seen": at} for device_id, at in seen]
        if params:
            self.conn.execute(w.TOUCH_DEVICE, params)

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
            w.ADD_VERSION,
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
        self.conn.execute(w.SET_EVALUATION, {"v": version, "accuracy": accuracy, "loss": loss, "n": n})

    # ------------------------------------------------------------------ rounds

    def open_round(self, new: NewRound) -> int:
        result = self.conn.execute(
            w.OPEN_ROUND,
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
                "canary": int(new.canary),
            },
        )
        return int(result.inserted_primary_key[0])

    def commit_round(self, round_id: int, *, closed_at: float, reason: str, result_version: int) -> None:
        params = {"round_id": round_id, "status": "committed", "closed_at": closed_at, "reason": reason}
        self.conn.execute(w.CLOSE_ROUND, {**params, "result": result_version})

    def abandon_round(self, round_id: int, *, closed_at: float, reason: str) -> None:
        """Abandoned: its aggregate is dropped (no version will ever use it)."""
        self.conn.execute(w.ABANDON_ROUND, {"round_id": round_id, "closed_at": closed_at, "reason": reason})

    def fold_into_round(self, round_id: int, *, added: int, samples: float, aggregate: bytes | None) -> None:
        """A group's accepted updates: counters up, and the round's new running aggregate (None: the
        round keeps every delta instead, and has no aggregate)."""
        params = {"round_id": round_id, "added": added, "samples": samples}
        if aggregate is None:
            self.conn.execute(w.FOLD_COUNTS_INTO_ROUND, params)
        else:
            self.conn.execute(w.FOLD_INTO_ROUND, {**params, "aggregate": aggregate})

    def set_epsilon(self, round_id: int, epsilon: float) -> None:
        self.conn.execute(w.SET_EPSILON, {"round_id": round_id, "eps": epsilon})

    # ------------------------------------------------------------------ assignments and updates

    def add_assignment(self, round_id: int, device_id: str, assigned_at: float) -> None:
        """Assign the device (already assigned by another replica meanwhile: nothing to do)."""
        params = {"round_id": round_id, "device_id": device_id, "assigned_at": assigned_at}
        self.conn.execute(w.add_assignment(self.dialect), params)

    def add_update(self, row: UpdateRow) -> bool:
        """Insert an accepted update; False when its (round, device) or (device, key) already has one."""
        result = self.conn.execute(
            w.add_update(self.dialect),
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
                "replica": row.replica,
            },
        )
        return result.first() is not None

    # ------------------------------------------------------------------ replicas: locks, partials, blobs

    def own_lifecycle(self) -> None:
        """Serialize with every other replica's round and version changes (store/locks.py)."""
        locks.lifecycle(self.conn)

    def own_round(self, round_id: int) -> None:
        """Exclusive use of the round (its commit or abandonment): waits for acknowledgements in flight."""
        locks.round_exclusive(self.conn, round_id)

    def share_round(self, round_id: int) -> None:
        """Acknowledge uploads to the round alongside other replicas, never during its commit."""
        locks.round_shared(self.conn, round_id)

    def fold_into_partial(
        self, round_id: int, replica: str, *, expected: int | None, added: int, samples: float, aggregate: bytes | None
    ) -> None:
        """A group's accepted updates into this replica's partial of the round: counters up and its new
        running sum (None: a non-streaming round keeps every delta and no sum). `expected` is the
        partial's count as this replica last saw it (None: it has none yet); if the row says
        otherwise, nothing is written and StalePartial is raised."""
        params = {"r": round_id, "rep": replica, "added": added, "samples": samples}
        if expected is None:
            row = {"round_id": round_id, "replica": replica, "received": added, "total_weight": samples}
            done = self.conn.execute(w.add_partial(self.dialect), {**row, "aggregate": aggregate})
        else:
            statement = w.GROW_PARTIAL_COUNTS if aggregate is None else w.GROW_PARTIAL
            done = self.conn.execute(statement, {**params, "expected": expected, "aggregate": aggregate})
        if done.first() is None:
            raise StalePartial(f"round {round_id}: partial of replica {replica} is not at {expected} updates")

    def merge_partials(self, round_id: int, *, received: int, total_weight: float, aggregate: bytes | None) -> None:
        """Closing a round: its row gets the whole count, weight and sum (None when abandoned or not
        streaming); the partials keep their counts (what each replica acknowledged) but drop their sums."""
        params = {"round_id": round_id, "received": received, "weight": total_weight, "aggregate": aggregate}
        self.conn.execute(w.SET_ROUND_TOTALS, params)
        self.conn.execute(w.DROP_PARTIAL_SUMS, {"r": round_id})

    def put_secagg(self, row: SecAggRow) -> None:
        """Write a secure-aggregation round's state at `row.revision`, which must be the stored one + 1
        (or 0 for a new row); otherwise StalePartial (another writer got there first)."""
        values = {
            "phase": row.phase,
            "members": json.dumps(row.members),
            "phase_started": row.phase_started,
            "revision": row.revision,
            "reason": row.reason,
        }
        keep_state = row.state is None and row.has_state  # read without its state, which stays as stored
        if not keep_state:
            values.update(state=row.state, state_revision=row.state_revision)
        if row.revision == 0:
            self.conn.execute(w.ADD_SECAGG, {"round_id": row.round_id, **values})
            return
        statement = w.UPDATE_SECAGG_KEEPING_STATE if keep_state else w.UPDATE_SECAGG
        params = {f"new_{k}": v for k, v in values.items()}
        done = self.conn.execute(statement, {"r": row.round_id, "expected": row.revision - 1, **params})
        if done.rowcount != 1:
            raise StalePartial(f"secure aggregation of round {row.round_id}: revision {row.revision - 1} is gone")

    def add_secagg_message(self, round_id: int, seq: int, kind: str, body: bytes) -> None:
        self.conn.execute(w.ADD_SECAGG_MESSAGE, {"round_id": round_id, "seq": seq, "kind": kind, "body": body})

    def drop_secagg_messages(self, round_id: int, through: int) -> None:
        """Messages folded into a newer state are not needed any more."""
        self.conn.execute(w.DROP_SECAGG_MESSAGES, {"r": round_id, "through": through})

    def add_blob(self, name: str, data: bytes) -> None:
        self.conn.execute(w.ADD_BLOB, {"name": name, "data": data})

    # ------------------------------------------------------------------ releases

    def add_release(self, version: int, action: str, actor: str, reason: str, at: float) -> None:
        params = {"version": version, "action": action, "actor": actor, "reason": reason, "at": at}
        self.conn.execute(w.ADD_RELEASE, params)

    def add_population(self, name: str, key_hash: str, architecture: str, created_at: float, by: str) -> None:
        row = {"enrollment_key_hash": key_hash, "architecture": architecture, "created_at": created_at}
        self.conn.execute(w.ADD_POPULATION, {"name": name, **row, "created_by": by})

    # ------------------------------------------------------------------ server state

    def set_state(self, key: str, value: bytes | str) -> None:
        self.conn.execute(w.state_statements(self.dialect)[0], {"key": key, "value": value})

    def add_state_if_missing(self, key: str, value: bytes | str) -> None:
        self.conn.execute(w.state_statements(self.dialect)[1], {"key": key, "value": value})
