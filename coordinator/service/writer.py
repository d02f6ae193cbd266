"""Group commit for accepted updates: one writer thread, one transaction and one fsync for many.

An upload is decoded and validated by its request, without the lock (service/ingest.py). What is
left -- the replay and duplicate checks against the current state, the update's row, and the
round's running aggregate -- is queued here. The writer drains the queue, applies every waiting
item in ONE transaction (so the aggregate is serialized and fsynced once per group, not once per
upload), commits durably, and only then answers the waiting requests. A 202 therefore still means
"on disk": kill -9 right after it loses nothing, and a crash before the COMMIT loses the whole
group, none of which was acknowledged.

Check-ins ride in the same groups: a new assignment (`Assignment`) and a device's last_seen
(`Seen`) cost no transaction of their own.

A round that reaches its goal mid-group stops there: the writer settles it (the lifecycle's
`tick`, which commits the model) and the rest of the group goes round again, where they find the
round closed (409), exactly as if they had arrived one at a time.

Replicas (PostgreSQL): each replica's writer folds its groups into its own partial aggregate of the
round (service/aggregates.py), holding the round's shared lock, so replicas acknowledge side by
side and a commit waits for their groups in flight. The goal is then counted from what was
committed when the group began: replicas acknowledging at the same instant may pass it by the
updates they had in flight (never beyond the round's assignments). An upload acknowledged by
another replica meanwhile -- the same Idempotency-Key retried there, or the same device -- is
caught by the database's unique keys (INSERT ... ON CONFLICT DO NOTHING) and answered as the first
was, or refused as a duplicate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.errors import Refused, crash_point
from coordinator.service.expected import Arrivals, Expected
from coordinator.service.rounds import RoundLifecycle
from coordinator.store import RoundRow, Store, UpdateRow, Writes
from coordinator.strategies import RunningSum
from engine.serialize.container import dumps

log = logging.getLogger("pocketfed.coordinator")


def check_may_upload(store: Store, r: RoundRow | None, round_id: int, device_id: str, now: float) -> RoundRow:
    """The round exists, the device was assigned to it and has not uploaded, and it is still open
    and before its deadline (checked here too: the background tick may not have closed it yet)."""
    if r is None:
        raise Refused(404, f"round {round_id} does not exist", "unknown_round")
    if not store.is_assigned(round_id, device_id):
        raise Refused(403, f"device is not assigned to round {round_id}; check in first", "not_assigned")
    if store.has_update(round_id, device_id):
        raise Refused(
            409, f"device already uploaded an update to round {round_id} (with another Idempotency-Key)", "duplicate"
        )
    if not r.is_open:
        raise Refused(409, f"round {round_id} is {r.status}; late update refused", "round_closed")
    if now >= r.deadline:
        raise Refused(409, f"round {round_id} passed its deadline; late update refused", "round_closed")
    return r


def replayed(store: Store, device_id: str, key: str, body_sha256: str) -> dict | None:
    """The first answer to this Idempotency-Key, if any; the same key with another body is refused
    (422), never answered as if the new body had been stored."""
    answer = store.answer_for_key(device_id, key)
    if answer is None:
        return None
    first_sha256 = answer.pop("body_sha256", None)  # stored with the answer, never sent
    if first_sha256 is not None and first_sha256 != body_sha256:
        raise Refused(
            422,
            f"Idempotency-Key: {key[:80]!r} was already used for a different body; use a new key for a new update",
            "idempotency_key_reused",
        )
    return answer


def answered_meanwhile(store: Store, device_id: str, key: str, body_sha256: str, refusal: Refused) -> dict | Refused:
    """A "duplicate" refusal may be this very upload, acknowledged by another replica between the
    replay check and the duplicate check: then its first answer, else the refusal."""
    if refusal.reason == "duplicate":
        answer = replayed(store, device_id, key, body_sha256)
        if answer is not None:
            return answer
    return refusal


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
    delta: dict[str, np.ndarray]  # as the round's strategy accepted it (clipped under DP or a norm bound)
    weight: float  # in the running mean: the sample count, or 1 under DP
    streaming: bool
    body_sha256: str = ""  # kept with the answer: a replayed key must come with the same body
    future: Future = field(default_factory=Future)


@dataclass
class Assignment:
    """A check-in asking for a place in a round; `future` gets "assigned", "full" or "closed"."""

    device_id: str
    round_id: int
    seen_at: float | None = None  # also record the device's last_seen
    future: Future = field(default_factory=Future)


@dataclass
class Seen:
    """A check-in recording when the device was last seen; `future` gets None."""

    device_id: str
    at: float
    future: Future = field(default_factory=Future)


Item = PreparedUpload | Assignment | Seen


@dataclass
class _RoundInGroup:
    """One round's state while a group is applied: its row as of the group's start, plus the group."""

    row: RoundRow | None
    received: int  # the round's count (every replica's) at the group's start, plus this group's
    partial: int | None = None  # this replica's stored count for the round (None: no partial yet)
    running: RunningSum | None = None  # this replica's partial sum, with the group's updates
    read: bool = False  # partial and running are loaded
    added: int = 0
    samples: float = 0.0
    assigned: int | None = None  # assignments so far, counted once per group


class _Answered(Exception):
    """The upload's key was acknowledged meanwhile (by another replica): its first answer."""

    def __init__(self, answer: dict):
        self.answer = answer


class UploadWriter:
    """The single writer of accepted updates and assignments (started on first use, stopped by close()).

    A group waits up to `linger` seconds for the uploads whose bodies are arriving or being decoded
    at that moment (`expect`: they hold an upload slot), never for uploads not yet started: each
    group serializes and writes the round's whole running aggregate and fsyncs once, so a group of
    16 pays a sixteenth of that per upload, where groups of whatever happened to be queued averaged
    3-5 under load. An upload alone never waits."""

    def __init__(self, store: Store, lifecycle: RoundLifecycle, max_group: int = 512, linger: float = 0.02):
        self.store, self.lifecycle, self.max_group, self.linger = store, lifecycle, max_group, linger
        self.arrivals = Arrivals()  # uploads holding a slot, not yet submitted
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.groups = self.applied = 0  # upload transactions and uploads applied: uploads per fsync

    def submit(self, item: Item) -> Future:
        """Queue an item; its future resolves once it is committed (durably, for an upload) or refused."""
        with self._start_lock:
            if self._closed:
                item.future.set_exception(Refused(503, "coordinator is shutting down; retry later", "shutdown"))
                return item.future
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pf-upload-writer", daemon=True)
                self._thread.start()
        self._queue.put(item)
        return item.future

    def expect(self) -> Expected:
        """Announce an upload on its way; its `done()` once it is submitted, or refused."""
        return self.arrivals.expect()

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
            group, stop, until = [first], False, None
            while len(group) < self.max_group:  # whatever queued up during the last fsync
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if not self.arrivals.count or not any(isinstance(i, PreparedUpload) for i in group):
                        break
                    until = until if until is not None else time.monotonic() + self.linger
                    wait = min(until - time.monotonic(), 0.001)  # polls: a refused upload is no longer expected
                    if wait <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=wait)
                    except queue.Empty:
                        continue
                if item is None:
                    stop = True
                    break
                group.append(item)
            live = [item for item in group if item.future.set_running_or_notify_cancel()]  # skip abandoned
            if live:
                self._write(live)
            if stop:
                return

    def _write(self, group: list[Item]) -> None:
        uploads = any(isinstance(item, PreparedUpload) for item in group)
        with self.store.lock:
            pending = group
            while pending:
                try:
                    outcomes, pending = self._apply(pending)
                except Exception as exc:  # a broken group: apply its items one at a time
                    self.lifecycle.aggregates.forget()
                    log.warning("group of %d uploads failed (%s); applying them one by one", len(pending), exc)
                    outcomes = [self._apply_alone(item) for item in pending]
                    pending = []
                try:
                    if uploads:  # commit a round that reached its goal before answering anyone
                        self.lifecycle.tick()
                except Exception:
                    log.exception("settling the round after a group of uploads failed")
                for item, outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        item.future.set_exception(outcome)
                    else:
                        item.future.set_result(outcome)

    def _apply_alone(self, item: Item) -> tuple[Item, Any]:
        try:
            for _ in range(2):
                outcomes, _deferred = self._apply([item])
                if outcomes:
                    return outcomes[0]
                self.lifecycle.tick()  # its round was full: settle it, then the upload is late
            raise RuntimeError(f"round {item.round_id} stayed full after settling it")
        except Exception as exc:
            self.lifecycle.aggregates.forget()
            log.exception("%s from device %s failed", type(item).__name__, item.device_id[:8])
            return item, exc

    def _apply(self, group: list[Item]) -> tuple[list[tuple[Item, Any]], list[PreparedUpload]]:
        """One transaction for the group: (outcome per item, uploads deferred past a goal). Durable
        (fsync) when it holds an upload; assignments and last_seen alone a device can redo."""
        outcomes: list[tuple[Item, Any]] = []
        deferred: list[PreparedUpload] = []
        accepted: list[tuple[PreparedUpload, dict]] = []
        rounds: dict[int, _RoundInGroup] = {}
        seen: dict[str, float] = {}
        now = self.lifecycle.clock()
        durable = any(isinstance(item, PreparedUpload) for item in group)
        with self.store.transaction(durable=durable) as tx:
            for item in group:
                if isinstance(item, Seen):
                    seen[item.device_id] = item.at
                    outcomes.append((item, None))
                    continue
                if isinstance(item, Assignment):
                    if item.seen_at is not None:
                        seen[item.device_id] = item.seen_at
                    outcomes.append((item, self._assign(item, rounds, tx, now)))
                    continue
                try:
                    answer = replayed(self.store, item.device_id, item.key, item.body_sha256)  # this group's too
                    if answer is None:
                        answer = self._add(item, rounds, tx, now)
                        if answer is not None:
                            accepted.append((item, answer))
                except Refused as exc:
                    answer = answered_meanwhile(self.store, item.device_id, item.key, item.body_sha256, exc)
                except _Answered as replay:
                    answer = replay.answer
                if answer is None:
                    deferred.append(item)
                else:
                    outcomes.append((item, answer))
            replica = self.lifecycle.replica
            for round_id, state in rounds.items():
                if state.added:
                    blob = state.running.to_bytes() if state.running is not None else None
                    tx.fold_into_partial(
                        round_id,
                        replica,
                        expected=state.partial,
                        added=state.added,
                        samples=state.samples,
                        aggregate=blob,
                    )
            tx.touch_devices(seen.items())
            crash_point("before_update_commit")
        for round_id, state in rounds.items():
            if state.added and state.running is not None:
                self.lifecycle.aggregates.remember(round_id, (state.partial or 0) + state.added, state.running)
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
        return outcomes, deferred

    def _add(self, item: PreparedUpload, rounds: dict[int, _RoundInGroup], tx: Writes, now: float) -> dict | None:
        """Insert one upload's row and fold it into its round; None: the round is full, defer it."""
        state = self._round(item.round_id, rounds, tx)
        r = state.row
        if r is not None and r.is_open and state.received >= r.goal:
            return None  # settle the round first (tick); it will then refuse this one as late
        check_may_upload(self.store, r, item.round_id, item.device_id, now)
        if not state.read:
            state.partial, state.running = self.lifecycle.aggregates.partial(item.round_id, item.streaming)
            state.read = True
        answer = {"accepted": True, "round_id": item.round_id, "received": state.received + 1, "goal": r.goal}
        added = tx.add_update(
            UpdateRow(
                round_id=item.round_id,
                device_id=item.device_id,
                idempotency_key=item.key,
                sample_count=item.sample_count,
                norm=item.norm,
                encoding=item.encoding,
                metrics=item.metrics,
                received_at=now,
                response={**answer, "body_sha256": item.body_sha256},
                delta=None if item.streaming else dumps(item.delta, kind="delta"),
                replica=self.lifecycle.replica,
            )
        )
        if not added:  # another replica acknowledged this device's update since the checks above
            first = replayed(self.store, item.device_id, item.key, item.body_sha256)
            if first is not None:
                raise _Answered(first)
            raise Refused(409, f"device already uploaded an update to round {item.round_id}", "duplicate")
        if state.running is not None:
            state.running.add(item.delta, item.weight)
        state.received += 1
        state.added += 1
        state.samples += float(item.sample_count)
        return answer

    def _round(self, round_id: int, rounds: dict[int, _RoundInGroup], tx: Writes) -> _RoundInGroup:
        state = rounds.get(round_id)
        if state is None:
            tx.share_round(round_id)  # no commit of it while this group is in flight (replicas)
            row = self.store.round(round_id)  # read after the lock: a commit just made shows here
            state = rounds[round_id] = _RoundInGroup(row, row.received if row else 0)
        return state

    def _assign(self, item: Assignment, rounds: dict[int, _RoundInGroup], tx: Writes, now: float) -> str:
        """Give the device a place in the round if it is open and has room (checked again here: the
        check-in's own look was without the lock)."""
        state = self._round(item.round_id, rounds, tx)
        if state.row is None or not state.row.is_open or now >= state.row.deadline:
            return "closed"
        if self.store.is_assigned(item.round_id, item.device_id):
            return "assigned"
        if state.assigned is None:
            state.assigned = self.store.count_assigned(item.round_id)
        if state.assigned >= state.row.max_assignments:
            return "full"
        tx.add_assignment(item.round_id, item.device_id, now)
        state.assigned += 1
        return "assigned"
