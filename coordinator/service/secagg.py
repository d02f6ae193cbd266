"""Secure aggregation of a round over HTTP: the cohort, the four SecAgg+ phases, durable after every message.

A secure-aggregation round (`RoundSettings.secure_aggregation`) takes no plain uploads. Assigned
devices train, then join; the cohort is fixed when `goal` devices have joined (or, when only the
time for the four phases is left before the deadline, with whoever joined, if at least 4): each
member gets its index 1..n and the round's `SecAggConfig`. Then the phases of protocol/secagg run
(advertise keys, share keys, masked input, unmask), devices long-polling `status` for what is due.
Every accepted message is written in the transaction that accepts it (table secagg_messages), and
the ServerSession's state at every phase change (secagg_rounds), so a coordinator restarted at any
point rebuilds the session (state, then the messages after it) and resumes from the last
acknowledged message, with the same survivor set: it cannot be led to unmask one device's input. A
phase whose stragglers do not answer within the timeout closes without them; the protocol abandons
the round when too few remain, and devices are told why. The unmasked sum becomes the round's
aggregate, which the round lifecycle commits like any streaming round's.

Durability: a device's message and a phase change are written with durable=False (database.py:
safe against kill -9, in order with later durable commits), one fsync per message would make a
100-device phase take seconds; the round's commit is durable and flushes them. A power cut may lose
the last acknowledged messages: the protocol then sees those devices as dropped at that phase, which
it handles like any dropout (their inputs were not summed, so unmasking them reveals nothing).

`cryptography` is imported only here and only when a round uses secure aggregation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from coordinator.errors import Refused
from coordinator.service.modelfile import expected_shapes
from coordinator.service.rounds import RoundLifecycle
from coordinator.service.secagg_config import (
    ABANDONED,
    CLOSERS,
    DONE,
    JOINING,
    MIN_COHORT,
    POLL_SECONDS,
    PROTOCOL_PHASES,
    RECEIVERS,
    closes_at,
    expected_from,
    secagg_config,
    snapshot,
    wake,
)
from coordinator.service.secagg_keys import advertise_message, fold_joined_keys, joined_keys
from coordinator.service.versions import ModelVersions
from coordinator.store import RoundRow, SecAggRow, Store
from coordinator.strategies import RunningSum

log = logging.getLogger("pocketfed.coordinator")


class SecureAggregation:
    def __init__(
        self,
        store: Store,
        versions: ModelVersions,
        lifecycle: RoundLifecycle,
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.versions, self.lifecycle, self.clock = store, versions, lifecycle, clock
        self._mutex = threading.Lock()  # guards the cached session (status reads it while a message writes it)
        self._cached: tuple[int, int, Any] | None = None  # (round, revision, ServerSession)
        # bumped at every phase change made here: long polls (routers/secagg.py) wake on it (a device's news
        # is a phase change; waking every poll on every message would cost O(n^2) status answers a phase)
        self.generation = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()
        self._waiters_lock = threading.Lock()

    # ------------------------------------------------------------------ reads

    def layout(self, r: RoundRow) -> list[tuple[str, tuple[int, ...]]]:
        """The tensors of the masked vector, in the order both sides flatten them (sorted names)."""
        shapes = expected_shapes(self.versions.get(r.base_version).container)
        return [(name, shapes[name]) for name in sorted(shapes)]

    def status(self, round_id: int, device_id: str) -> dict[str, Any]:
        """What the device should do now: the phase, its index and config once in the cohort, and the
        message due to it (None if nothing is), whether the server still waits for its answer."""
        r = self._round(round_id)
        row = self.store.secagg(round_id)
        phase = row.phase if row is not None else JOINING
        reason = row.reason if row is not None else None
        if not r.is_open and phase not in (DONE, ABANDONED):
            phase, reason = ABANDONED, f"round {round_id} was {r.status}: {r.reason}"
        members = row.members if row is not None else []
        index = members.index(device_id) + 1 if device_id in members else None
        out: dict[str, Any] = {
            "round_id": round_id,
            "phase": phase,
            "joined": index is not None,
            "index": index,
            "cohort_size": len(members),
            "config": None,
            "layout": None,
            "message": None,
            "expected": False,
            "waiting": False,
            "reason": reason,
            "retry_after": POLL_SECONDS,
        }
        if index is None or row is None:
            return out
        if phase == ABANDONED:
            out["message"] = {"type": "abandoned", "round_id": round_id, "reason": reason}
        if not row.has_state:
            return out
        with self._mutex:
            session = self._session(row)
            if phase in PROTOCOL_PHASES:  # the session may be newer than the row read without the lock
                phase = out["phase"] = session.phase
            out["config"] = session.config.to_dict()
            out["layout"] = [[name, list(shape)] for name, shape in self.layout(r)]
            if phase in PROTOCOL_PHASES:
                out["expected"] = index in expected_from(session)
                out["waiting"] = index in session.waiting_for()
                out["message"] = session.outgoing(index) if out["expected"] else None
        return out

    async def wait_for_news(self, seen: int, timeout: float) -> None:
        """Return once the generation moves past `seen`, or after `timeout` seconds: the long poll is
        woken by the phase change itself, not by a timer (a timer costs every waiting device a wake-up
        per tick, and the round up to a tick per phase)."""
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._waiters_lock:
            self._waiters.add(waiter)
        try:
            if self.generation == seen and timeout > 0:
                await asyncio.wait_for(waiter[1], timeout)
        except TimeoutError:
            pass
        finally:
            with self._waiters_lock:
                self._waiters.discard(waiter)

    def _news(self) -> None:
        """A phase changed: bump the generation and wake every long poll (from any thread)."""
        self.generation += 1
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that poll's event loop is closed
                loop.call_soon_threadsafe(wake, future)

    # ------------------------------------------------------------------ writes

    def join(self, round_id: int, device_id: str, keys: Any = None) -> dict[str, Any]:
        """Enter the round's cohort (again: nothing changes). The goal-th join fixes the cohort. `keys`:
        the device's public keys, advertised with the join (secagg_keys.py), or None."""
        keys = joined_keys(keys)
        fixed = False
        with self.store.lock, self._mutex:
            try:
                with self.store.transaction(durable=False) as tx:  # kill -9 safe (module doc)
                    tx.own_round(round_id)
                    r = self._open_round(round_id, device_id)
                    row = self.store.secagg(round_id)
                    if row is not None and device_id in row.members:
                        pass
                    elif row is not None and row.phase != JOINING:
                        raise Refused(
                            409, f"round {round_id}: the secure-aggregation cohort is already fixed", "cohort_fixed"
                        )
                    else:
                        now = self.clock()
                        if row is None:
                            row = SecAggRow(round_id, JOINING, [], now, -1, None, 0, None)
                        row = replace(row, members=[*row.members, device_id], revision=row.revision + 1)
                        mine = (
                            []
                            if keys is None
                            else [(row.revision, "advertise", advertise_message(round_id, len(row.members), keys))]
                        )
                        if len(row.members) >= r.goal:
                            row = self._fix_cohort(tx, r, row, mine)
                            fixed = True
                        elif mine:
                            tx.add_secagg_message(round_id, *mine[0])
                        tx.put_secagg(row)
            except BaseException:
                self._cached = None
                raise
        if fixed:  # after the commit: a poll woken earlier could read the row as it was
            self._news()
        return self.status(round_id, device_id)

    def receive(self, round_id: int, device_id: str, kind: str, message: Any) -> dict[str, Any]:
        """A device's message for a phase (JSON, or the masked-input frame's bytes). A replay of an
        accepted message is answered again and changes nothing."""
        from protocol.secagg import SecAggError
        from protocol.secagg.wire import unpack_frame

        phase_for, method = RECEIVERS[kind]
        settled = closed = False
        with self.store.lock, self._mutex:
            try:
                with self.store.transaction(durable=False) as tx:  # kill -9 safe (module doc)
                    tx.own_round(round_id)
                    r = self._open_round(round_id, device_id)
                    row = self.store.secagg(round_id)
                    if row is None or device_id not in row.members or not row.has_state:
                        raise Refused(
                            403, f"device is not in round {round_id}'s secure-aggregation cohort", "not_in_cohort"
                        )
                    index = row.members.index(device_id) + 1
                    try:
                        claimed = unpack_frame(message, "masked_input")[0] if kind == "masked_input" else message
                    except SecAggError as exc:
                        raise Refused(422, f"{kind}: {exc}", "bad_secagg_message") from None
                    if not isinstance(claimed, dict) or claimed.get("index") != index:
                        raise Refused(
                            403, f"{kind}: the message must carry this device's index {index}", "wrong_secagg_index"
                        )
                    session = self._session(row)
                    try:
                        fresh = getattr(session, method)(message)
                    except SecAggError as exc:
                        if row.phase != phase_for:
                            raise Refused(
                                409,
                                f"round {round_id}: secure aggregation is in phase {row.phase!r}; "
                                f"{kind} is no longer taken ({exc})",
                                "secagg_phase",
                            ) from None
                        raise Refused(422, f"{kind}: {exc}", "bad_secagg_message") from None
                    if fresh:
                        row = replace(row, revision=row.revision + 1)
                        body = message if kind == "masked_input" else json.dumps(message).encode()
                        tx.add_secagg_message(round_id, row.revision, kind, body)
                        if not session.waiting_for():
                            row = self._close_phase(tx, r, row, session)
                            closed = True
                        tx.put_secagg(row)
                        self._cached = (round_id, row.revision, session)
                        settled = row.phase in (DONE, ABANDONED)
            except BaseException:
                self._cached = None
                raise
        if closed:  # after the commit (see join)
            self._news()
        if settled:
            self.lifecycle.tick()
            self._news()
        return {"accepted": fresh, "phase": row.phase}

    def tick(self) -> None:
        """Close the open round's current phase if its stragglers ran out of time."""
        r = self.lifecycle.current()
        if r is None or not r.config.secure_aggregation:
            return
        row = self.store.secagg(r.id)
        now = self.clock()
        if row is None or row.phase in (DONE, ABANDONED) or now < closes_at(r, row):
            return
        settled = False
        with self.store.lock, self._mutex:
            try:
                with self.store.transaction() as tx:
                    tx.own_round(r.id)
                    r = self.store.round(r.id)
                    row = self.store.secagg(r.id)
                    if r is None or not r.is_open or row is None or row.phase in (DONE, ABANDONED):
                        return
                    if now < closes_at(r, row):
                        return
                    row = replace(row, revision=row.revision + 1)
                    if row.phase == JOINING:
                        row = self._fix_cohort(tx, r, row)
                    else:
                        log.info(
                            "round %d: secure-aggregation phase %s timed out; closing it without the stragglers",
                            r.id,
                            row.phase,
                        )
                        row = self._close_phase(tx, r, row, self._session(row))
                    tx.put_secagg(row)
                    self._cached = None
                    settled = row.phase in (DONE, ABANDONED)
            except BaseException:
                self._cached = None
                raise
            self._news()
        if settled:
            self.lifecycle.tick()
            self._news()

    # ------------------------------------------------------------------ phases

    def _fix_cohort(self, tx, r: RoundRow, row: SecAggRow, joining: list | None = None) -> SecAggRow:
        """The cohort is whoever joined: build the config and the server session (or abandon), with the
        keys that came with the joins (stored, and `joining`'s, not yet) folded in (secagg_keys.py)."""
        from protocol.secagg import RoundAbandoned, SecAggError, ServerSession

        now, n = self.clock(), len(row.members)
        if n < MIN_COHORT:
            return replace(
                row, phase=ABANDONED, phase_started=now, reason=f"only {n} devices joined; at least {MIN_COHORT} needed"
            )
        vector_length = sum(math.prod(shape) for _, shape in self.layout(r))
        try:
            config = secagg_config(r.config, r.id, n, vector_length)
        except SecAggError as exc:
            return replace(row, phase=ABANDONED, phase_started=now, reason=str(exc))
        session = ServerSession(config)
        k, t = config.neighbours, config.threshold
        log.info("round %d: secure-aggregation cohort of %d fixed (k=%d, t=%d)", r.id, n, k, t)
        joined = [*self.store.secagg_messages(r.id, -1), *(joining or [])]
        tx.drop_secagg_messages(r.id, row.revision)  # folded into the state written now
        try:
            fold_joined_keys(session, joined)
        except RoundAbandoned as exc:
            return replace(row, phase=ABANDONED, phase_started=now, reason=exc.reason, **snapshot(row, session))
        return replace(row, phase=session.phase, phase_started=now, **snapshot(row, session))

    def _close_phase(self, tx, r: RoundRow, row: SecAggRow, session) -> SecAggRow:
        """Close the session's current phase; after the unmask, the sum goes into the round's aggregate."""
        from protocol.secagg import RoundAbandoned

        now = self.clock()
        tx.drop_secagg_messages(r.id, row.revision)  # folded into the state written now
        try:
            result = getattr(session, CLOSERS[session.phase])()
        except RoundAbandoned as exc:
            log.info("round %d: secure aggregation abandoned: %s", r.id, exc.reason)
            return replace(row, phase=ABANDONED, phase_started=now, reason=exc.reason, **snapshot(row, session))
        if session.phase == "done":
            sums, start = {}, 0
            for name, shape in self.layout(r):
                size = math.prod(shape)
                sums[name] = np.asarray(result.weighted_sum[start : start + size], np.float64).reshape(shape)
                start += size
            survivors = len(result.survivors)
            running = RunningSum(sums, float(result.total_weight), survivors)
            tx.fold_into_round(r.id, added=survivors, samples=float(result.total_weight), aggregate=running.to_bytes())
            log.info("round %d: secure aggregation unmasked the sum of %d devices", r.id, survivors)
            return replace(row, phase=DONE, phase_started=now, **snapshot(row, session))
        return replace(row, phase=session.phase, phase_started=now, **snapshot(row, session))

    # ------------------------------------------------------------------ helpers

    def _round(self, round_id: int) -> RoundRow:
        r = self.store.round(round_id)
        if r is None:
            raise Refused(404, f"round {round_id} does not exist", "unknown_round")
        if not r.config.secure_aggregation:
            raise Refused(409, f"round {round_id} does not use secure aggregation", "not_secagg")
        return r

    def _open_round(self, round_id: int, device_id: str) -> RoundRow:
        r = self._round(round_id)
        if not self.store.is_assigned(round_id, device_id):
            raise Refused(403, f"device is not assigned to round {round_id}; check in first", "not_assigned")
        if not r.is_open or self.clock() >= r.deadline:
            raise Refused(409, f"round {round_id} is closed or past its deadline", "round_closed")
        return r

    def _session(self, row: SecAggRow):
        """The row's ServerSession: the cached one if it is at least at the row's revision, else rebuilt
        from the stored state and the messages accepted after it (after a restart, or another replica's
        writes)."""
        from protocol.secagg import ServerSession

        cached = self._cached
        if cached is not None and cached[0] == row.round_id and cached[1] >= row.revision:
            return cached[2]
        stored = self.store.secagg(row.round_id, with_state=True)
        if stored is None or stored.state is None:
            raise Refused(409, f"round {row.round_id}: the secure-aggregation cohort is not fixed yet", "secagg_phase")
        session = ServerSession.from_bytes(stored.state)
        for _, kind, body in self.store.secagg_messages(row.round_id, stored.state_revision):
            getattr(session, RECEIVERS[kind][1])(body if kind == "masked_input" else json.loads(body))
        self._cached = (row.round_id, stored.revision, session)
        return session
