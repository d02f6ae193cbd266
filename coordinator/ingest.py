"""Group commit for accepted updates: one writer thread, one transaction and one fsync for many.

An upload is decoded and validated by its request, without the database lock
(`RoundManager.prepare_upload`). What is left -- the replay and duplicate checks against the
current state, the update's row, and the round's running aggregate -- is queued here. The writer
drains the queue, applies every waiting upload in ONE transaction (so the aggregate is serialized
and fsynced once per group, not once per upload), commits durably, and only then answers the
waiting requests. A 202 therefore still means "on disk": kill -9 right after it loses nothing,
and a crash before the COMMIT loses the whole group, none of which was acknowledged.

Check-ins that need a new assignment ride in the same groups (`assign`): their insert and the
round's "room left" check cost no lock round-trip of their own.

A round that reaches its goal mid-group stops there: the writer settles it (`tick`, which
commits the model) and the rest of the group goes round again, where they find the round closed
(409), exactly as if they had arrived one at a time.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.errors import Refused, crash_point
from coordinator.strategies import RunningSum
from engine.serialize.container import dumps

if TYPE_CHECKING:
    from coordinator.rounds import RoundManager

log = logging.getLogger("pocketfed.coordinator")


@dataclass
class PreparedUpload:
    """A decoded, validated update waiting for the writer; `future` gets the 202 body or a Refused."""

    device_id: str
    round_id: int
    key: str
    sample_count: int
    norm: float
    encoding: str  # as recorded: "float32", "int8+topk", ...
    metrics: dict[str, float]
    delta: dict[str, np.ndarray]  # clipped already when the round bounds norms
    weight: float  # the sample count, or 1 under DP
    streaming: bool
    future: Future = field(default_factory=Future)


@dataclass
class Assignment:
    """A check-in asking for a place in a round; `future` gets "assigned", "full" or "closed"."""

    device_id: str
    round_id: int
    future: Future = field(default_factory=Future)


@dataclass
class _RoundInGroup:
    """One round's state while a group is applied: its row as of the group's start, plus the group."""

    row: dict | None
    received: int
    running: RunningSum | None = None
    added: int = 0
    samples: float = 0.0
    assigned: int | None = None  # assignments so far, counted once per group


class UploadWriter:
    """The single writer of accepted updates (started on the first upload, stopped by close())."""

    def __init__(self, manager: RoundManager, max_group: int = 512):
        self.manager, self.max_group = manager, max_group
        self._queue: queue.SimpleQueue[PreparedUpload | Assignment | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.groups = self.applied = 0  # upload transactions and uploads applied: uploads per fsync

    def assign(self, device_id: str, round_id: int) -> Future:
        """Queue a check-in's assignment to an open round (see `Assignment`)."""
        return self.submit(Assignment(device_id, round_id))

    def submit(self, item: PreparedUpload | Assignment) -> Future:
        """Queue a validated upload; its future resolves once it is durably committed (or refused)."""
        with self._start_lock:
            if self._closed:
                item.future.set_exception(Refused(503, "coordinator is shutting down; retry later", "shutdown"))
                return item.future
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pf-upload-writer", daemon=True)
                self._thread.start()
        self._queue.put(item)
        return item.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._start_lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.max_group:  # whatever queued up during the last fsync
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            live = [item for item in group if item.future.set_running_or_notify_cancel()]  # skip abandoned
            if live:
                self._write(live)
            if stop:
                return

    def _write(self, group: list[PreparedUpload | Assignment]) -> None:
        manager = self.manager
        with manager.db.lock:
            pending = group
            while pending:
                try:
                    outcomes, pending = self._apply(pending)
                except Exception as exc:  # a broken group: apply its uploads one at a time
                    log.warning("group of %d uploads failed (%s); applying them one by one", len(pending), exc)
                    outcomes = [self._apply_alone(item) for item in pending]
                    pending = []
                try:
                    manager.tick()  # commit a round that reached its goal before answering anyone
                except Exception:
                    log.exception("settling the round after a group of uploads failed")
                for item, outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        item.future.set_exception(outcome)
                    else:
                        item.future.set_result(outcome)

    def _apply_alone(self, item: PreparedUpload | Assignment) -> tuple[PreparedUpload | Assignment, Any]:
        try:
            for _ in range(2):
                outcomes, deferred = self._apply([item])
                if outcomes:
                    return outcomes[0]
                self.manager.tick()  # its round was full: settle it, then the upload is late
            raise RuntimeError(f"round {item.round_id} stayed full after settling it")
        except Exception as exc:
            log.exception("%s from device %s failed", type(item).__name__, item.device_id[:8])
            return item, exc

    def _apply(self, group: list) -> tuple[list[tuple[Any, Any]], list[PreparedUpload]]:
        """One transaction for the group: (outcome per item, uploads deferred past a goal). Durable
        (fsync) when it holds an upload; assignments alone a device can redo, as before."""
        manager = self.manager
        outcomes: list[tuple[PreparedUpload, Any]] = []
        deferred: list[PreparedUpload] = []
        accepted: list[tuple[PreparedUpload, dict]] = []
        rounds: dict[int, _RoundInGroup] = {}
        now = manager.clock()
        durable = any(isinstance(item, PreparedUpload) for item in group)
        with manager.db.transaction(durable=durable) as cur:
            for item in group:
                if isinstance(item, Assignment):
                    outcomes.append((item, self._assign(item, rounds, cur, now)))
                    continue
                try:
                    answer = manager.previous_answer(item.device_id, item.key)  # sees this group's rows too
                    if answer is None:
                        answer = self._add(item, rounds, cur, now)
                        if answer is not None:
                            accepted.append((item, answer))
                except Refused as exc:
                    answer = exc
                if answer is None:
                    deferred.append(item)
                else:
                    outcomes.append((item, answer))
            for round_id, state in rounds.items():
                if state.added:
                    cur.execute(
                        "UPDATE rounds SET received=received+?, total_weight=total_weight+?, aggregate=? WHERE id=?",
                        (
                            state.added,
                            state.samples,
                            state.running.to_bytes() if state.running else state.row["aggregate"],
                            round_id,
                        ),
                    )
            crash_point("before_update_commit")
        for round_id, state in rounds.items():
            if state.added and state.running is not None:
                manager.remember_running(round_id, state.received, state.running)
        self.groups += durable  # transactions that held uploads
        self.applied += len(accepted)
        crash_point("after_update_commit")
        for item, answer in accepted:
            log.info(
                "round %d: update %d/%d accepted from device %s (%d samples, norm %.4g, %s)",
                item.round_id,
                answer["received"],
                answer["goal"],
                item.device_id[:8],
                item.sample_count,
                item.norm,
                item.encoding,
            )
            manager.on_event("update_accepted")
        return outcomes, deferred

    def _add(self, item: PreparedUpload, rounds: dict[int, _RoundInGroup], cur, now: float) -> dict | None:
        """Insert one upload's row and fold it into its round; None: the round is full, defer it."""
        manager = self.manager
        state = self._round(item.round_id, rounds)
        r = state.row
        if r is not None and r["status"] == "open" and state.received >= r["goal"]:
            return None  # settle the round first (tick); it will then refuse this one as late
        manager.check_may_upload(r, item.round_id, item.device_id)
        if item.streaming and state.running is None:
            state.running = manager.running_sum(r)
        answer = {"accepted": True, "round_id": item.round_id, "received": state.received + 1, "goal": r["goal"]}
        cur.execute(
            "INSERT INTO updates(round_id, device_id, idempotency_key, sample_count, norm, encoding, "
            "metrics, received_at, response, delta) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                item.round_id,
                item.device_id,
                item.key,
                item.sample_count,
                item.norm,
                item.encoding,
                json.dumps(item.metrics),
                now,
                json.dumps(answer),
                None if item.streaming else dumps(item.delta, kind="delta"),
            ),
        )
        if state.running is not None:
            state.running.add(item.delta, item.weight)
        state.received += 1
        state.added += 1
        state.samples += float(item.sample_count)
        return answer

    def _round(self, round_id: int, rounds: dict[int, _RoundInGroup]) -> _RoundInGroup:
        state = rounds.get(round_id)
        if state is None:
            row = self.manager.get_round(round_id, with_aggregate=True)
            state = rounds[round_id] = _RoundInGroup(row, row["received"] if row else 0)
        return state

    def _assign(self, item: Assignment, rounds: dict[int, _RoundInGroup], cur, now: float) -> str:
        """Give the device a place in the round if it is open and has room (checked again here: the
        check-in's own look was without the lock)."""
        state = self._round(item.round_id, rounds)
        if state.row is None or state.row["status"] != "open":
            return "closed"
        if cur.execute(
            "SELECT 1 FROM assignments WHERE round_id=? AND device_id=?", (item.round_id, item.device_id)
        ).fetchone():
            return "assigned"
        if state.assigned is None:
            state.assigned = cur.execute(
                "SELECT COUNT(*) FROM assignments WHERE round_id=?", (item.round_id,)
            ).fetchone()[0]
        if state.assigned >= state.row["max_assignments"]:
            return "full"
        cur.execute(
            "INSERT INTO assignments(round_id, device_id, assigned_at) VALUES (?,?,?)",
            (item.round_id, item.device_id, now),
        )
        state.assigned += 1
        return "assigned"
