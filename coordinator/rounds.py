"""The round state machine: open -> committed | abandoned, then the next round opens by itself.

A round has a base model version, a goal K, room for ceil(K * over_select) assigned devices,
a deadline and a minimum number of updates to commit. It commits as soon as K updates have
arrived, or at the deadline with at least the minimum; otherwise it is abandoned. Deadlines
are enforced by `tick()`, which a background task calls every few seconds and every request
calls first (so a stalled timer never lets a stale round take updates).

Every state change is one SQLite transaction, and all of them run under one lock:
- accepted updates insert their rows AND write the new running aggregate together, many uploads
  per transaction (coordinator/ingest.py: group commit, answered only after the fsync);
- a commit writes the new model file atomically, then registers it and closes the round in
  one transaction; a crash in between leaves the round open with its full aggregate, and
  startup (which is `tick()` too) commits it again, to the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator import privacy
from coordinator.errors import Refused, crash_point
from coordinator.ingest import PreparedUpload, UploadWriter
from coordinator.modelfile import ModelInfo, expected_shapes, model_info, parse_model, with_version
from coordinator.settings import RoundSettings, Settings
from coordinator.storage import Database, ModelFiles
from coordinator.strategies import RunningSum, make_strategy
from coordinator.strategies.base import state_from_bytes, state_to_bytes
from coordinator.validation import check_update
from engine.serialize.container import Container, loads
from protocol.deltas import clip_by_l2
from protocol.messages import CheckinAnswer, Task

log = logging.getLogger("pocketfed.coordinator")


@dataclass
class LoadedModel:
    version: int
    data: bytes
    container: Container
    info: ModelInfo


class RoundManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        files: ModelFiles,
        clock: Callable[[], float] = time.time,
        on_new_version: Callable[[int, bytes], None] | None = None,
        on_event: Callable[..., None] | None = None,
    ):
        self.settings = settings
        self.round_settings: RoundSettings = settings.round_settings()
        self.db, self.files, self.clock = db, files, clock
        self.on_new_version = on_new_version or (lambda version, data: None)
        self.on_event = on_event or (lambda name, **labels: None)
        self._models: dict[int, LoadedModel] = {}
        self._running: tuple[int, int, RunningSum] | None = None  # (round, received, aggregate) cache
        self.dp = privacy.PrivacyLedger(db)
        self.writer = UploadWriter(self)
        # every rounds column but the aggregate blob, which only the writer and a commit need
        self._round_columns = ", ".join(
            row["name"] for row in db.query("PRAGMA table_info(rounds)") if row["name"] != "aggregate"
        )
        if self.round_settings.dp_enabled:
            privacy.require_accountant()
        row = db.query_one("SELECT value FROM server_state WHERE key = 'paused'")
        self.paused = bool(row and row["value"] == "1")

    # ------------------------------------------------------------------ startup

    def start(self, initial_model: Callable[[], bytes]) -> None:
        """Idempotent recovery: drop orphan files, publish v1 if there is none, settle the open round."""
        with self.db.lock:
            registered = {r["filename"] for r in self.db.query("SELECT filename FROM model_versions")}
            self.files.remove_orphans(registered)
            if not registered:
                self.publish(initial_model(), reason="initial model")
            open_round = self.current_round()
            if open_round is not None:
                log.info(
                    "startup: round %d is open with %d/%d updates",
                    open_round["id"],
                    open_round["received"],
                    open_round["goal"],
                )
            self.tick()

    # ------------------------------------------------------------------ model versions

    def latest_version(self) -> int:
        """The newest version; the initial model is version 0, and round N usually commits version N."""
        row = self.db.query_one("SELECT MAX(version) AS v FROM model_versions")
        return int(row["v"]) if row and row["v"] is not None else -1

    def model(self, version: int) -> LoadedModel | None:
        """A registered version's bytes and parsed tensors (the latest few stay cached)."""
        cached = self._models.get(version)  # the common case needs no lock
        if cached is not None:
            return cached
        with self.db.lock:
            if version in self._models:
                return self._models[version]
            row = self.db.query_one("SELECT * FROM model_versions WHERE version = ?", (version,))
            if row is None:
                return None
            data = self.files.read(row["filename"])
            container = parse_model(data)
            loaded = LoadedModel(version, data, container, model_info(data, container))
            if len(self._models) >= 4:
                self._models.pop(min(self._models))
            self._models[version] = loaded
            return loaded

    def publish(
        self,
        data: bytes,
        *,
        round_id: int | None = None,
        reason: str = "published",
        also: Callable[[Any], None] | None = None,
    ) -> int:
        """Register model bytes as the next immutable version (file first, then the DB row).

        With `round_id`, the same transaction closes that round as committed and runs `also(cursor)`
        (the server optimizer state), so a commit is all-or-nothing.
        """
        container = parse_model(data)
        with self.db.lock:
            version = self.latest_version() + 1
            if container.metadata.get("version") != version:
                data = with_version(container, version)
                container = parse_model(data)
            info = model_info(data, container)
            filename = self.files.write(version, data)
            crash_point("before_register_model")
            with self.db.transaction() as cur:
                cur.execute(
                    "INSERT INTO model_versions(version, sha256, filename, architecture, size_bytes, "
                    "num_parameters, created_at, round_id) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        version,
                        info.sha256,
                        filename,
                        info.architecture,
                        info.size_bytes,
                        info.num_parameters,
                        info.created_at,
                        round_id,
                    ),
                )
                if round_id is not None:
                    cur.execute(
                        "UPDATE rounds SET status='committed', closed_at=?, result_version=?, reason=? WHERE id=?",
                        (self.clock(), version, reason, round_id),
                    )
                if also is not None:
                    also(cur)
        log.info(
            "model v%d registered (%s, %d parameters, sha256 %s): %s",
            version,
            info.architecture,
            info.num_parameters,
            info.sha256[:12],
            reason,
        )
        self.on_new_version(version, data)
        return version

    # ------------------------------------------------------------------ rounds

    def current_round(self) -> dict | None:
        row = self.db.query_one(
            f"SELECT {self._round_columns} FROM rounds WHERE status = 'open' ORDER BY id DESC LIMIT 1"
        )
        return dict(row) if row else None

    def get_round(self, round_id: int, with_aggregate: bool = False) -> dict | None:
        columns = self._round_columns + (", aggregate" if with_aggregate else "")
        row = self.db.query_one(f"SELECT {columns} FROM rounds WHERE id = ?", (round_id,))
        return dict(row) if row else None

    def _open_round(self) -> dict:
        cfg = self.round_settings
        now = self.clock()
        base = self.latest_version()
        goal = cfg.goal
        dp = (
            (self.dp.clip_for(cfg), self.dp.sampling_rate(cfg), cfg.dp_noise_multiplier)
            if cfg.dp_enabled
            else (None, None, None)
        )
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO rounds(base_version, status, config, goal, max_assignments, "
                "min_updates, opened_at, deadline, dp_clip, dp_q, dp_noise) "
                "VALUES (?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    base,
                    cfg.model_dump_json(),
                    goal,
                    math.ceil(goal * cfg.over_select - 1e-9),
                    max(1, math.ceil(goal * cfg.min_fraction - 1e-9)),
                    now,
                    now + cfg.deadline,
                    *dp,
                ),
            )
            round_id = cur.lastrowid
        log.info(
            "round %d opened: base v%d, goal %d, deadline %.0fs, strategy %s",
            round_id,
            base,
            goal,
            cfg.deadline,
            cfg.strategy,
        )
        return self.get_round(round_id)

    def tick(self) -> None:
        """Settle the open round (commit at goal; commit or abandon at deadline); open one if none."""
        if not self.db.lock.held():  # fast path without the lock: an open round with nothing to settle
            r = self.current_round()
            if r is not None and r["received"] < r["goal"] and self.clock() < r["deadline"]:
                return
        with self.db.lock:
            r = self.current_round()
            if r is not None:
                if r["received"] >= r["goal"]:
                    self._commit(r, "goal reached")
                elif self.clock() >= r["deadline"]:
                    if r["received"] >= r["min_updates"]:
                        self._commit(r, f"deadline with {r['received']}/{r['goal']} updates")
                    else:
                        self._abandon(
                            r,
                            f"deadline with {r['received']}/{r['goal']} updates, "
                            f"fewer than the minimum {r['min_updates']}",
                        )
                else:
                    return
            if not self.paused and self.dp.budget_allows(self.round_settings):
                self._open_round()

    def _abandon(self, r: dict, reason: str) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE rounds SET status='abandoned', closed_at=?, reason=?, aggregate=NULL WHERE id=?",
                (self.clock(), reason, r["id"]),
            )
        log.info("round %d abandoned: %s", r["id"], reason)
        self.on_event("round_closed", outcome="abandoned")

    def _commit(self, r: dict, reason: str) -> None:
        config = json.loads(r["config"])
        strategy = make_strategy(config)
        base = self.model(r["base_version"])
        writes: list[tuple[str, Any]] = []
        if strategy.streaming:
            running = self.running_sum(r)
            delta = running.mean()
            if r["dp_clip"] is not None:
                delta, writes = self.dp.privatize(r, config, delta, running.count)
        else:
            rows = self.db.query("SELECT delta, sample_count FROM updates WHERE round_id=?", (r["id"],))
            delta = strategy.combine([(loads(row["delta"]).tensors, row["sample_count"]) for row in rows])
        state_key = f"strategy_state/{strategy.name}"
        state_row = self.db.query_one("SELECT value FROM server_state WHERE key=?", (state_key,))
        state = state_from_bytes(state_row["value"] if state_row else None)
        new_weights, new_state = strategy.step({k: base.container.tensors[k] for k in delta}, delta, state)
        if not all(np.all(np.isfinite(w)) for w in new_weights.values()):
            self._abandon(r, "the aggregate produced non-finite weights")
            return
        data = with_version(
            base.container, self.latest_version() + 1, new_weights, round_id=r["id"], parent_version=r["base_version"]
        )
        state_bytes = state_to_bytes(new_state)
        writes.append(("INSERT OR REPLACE INTO server_state(key, value) VALUES (?, ?)", (state_key, state_bytes)))
        version = self.publish(
            data, round_id=r["id"], reason=reason, also=lambda cur: [cur.execute(sql, params) for sql, params in writes]
        )
        log.info(
            "round %d committed -> model v%d: %s, %d updates, %g samples",
            r["id"],
            version,
            reason,
            r["received"],
            r["total_weight"],
        )
        self.on_event("round_closed", outcome="committed")

    # ------------------------------------------------------------------ device calls

    def _retry(self, seconds: float, reason: str) -> CheckinAnswer:
        s = self.settings
        wait = int(math.ceil(min(max(seconds, s.min_retry_after), s.max_retry_after)))
        return CheckinAnswer("retry", retry_after=wait, reason=reason)

    def task_for(self, r: dict) -> Task:
        config = json.loads(r["config"])
        return Task(
            round_id=r["id"],
            base_version=r["base_version"],
            epochs=config["epochs"],
            batch_size=config["batch_size"],
            lr=config["lr"],
            momentum=config["momentum"],
            deadline=r["deadline"],
            **make_strategy(config).task_options(),
            clip_norm=config["clip_norm"],
            noise_multiplier=config["noise_multiplier"],
            encoding=config["encoding"],
            topk_fraction=config["topk_fraction"],
        )

    def checkin(self, device_id: str, eligible: bool) -> CheckinAnswer:
        """A task (the same one again for a device already assigned), or when to come back.

        Looks without the lock (committed state); a new assignment goes through the upload writer,
        grouped with others, which checks the round's room again."""
        for _ in range(2):  # twice: the round may close between the look and the assignment
            self.tick()
            r = self.current_round()
            if self.paused or r is None:
                return self._retry(self.settings.max_retry_after / 4, self.dp.budget_note or "training is paused")
            to_deadline = r["deadline"] - self.clock()
            if not eligible:
                return self._retry(to_deadline, "device reported not eligible")
            if self.db.query_one("SELECT 1 FROM updates WHERE round_id=? AND device_id=?", (r["id"], device_id)):
                return self._retry(to_deadline, f"already contributed to round {r['id']}")
            if self.db.query_one("SELECT 1 FROM assignments WHERE round_id=? AND device_id=?", (r["id"], device_id)):
                return CheckinAnswer("task", task=self.task_for(r))
            assigned = self.db.query_one("SELECT COUNT(*) AS n FROM assignments WHERE round_id=?", (r["id"],))["n"]
            outcome = "full" if assigned >= r["max_assignments"] else self._wait(self.writer.assign(device_id, r["id"]))
            if outcome == "assigned":
                return CheckinAnswer("task", task=self.task_for(r))
            if outcome == "full":
                return self._retry(to_deadline, f"round {r['id']} has all {r['max_assignments']} devices it needs")
        return self._retry(0, "the round just closed; check in again")

    def previous_answer(self, device_id: str, key: str) -> dict | None:
        row = self.db.query_one(
            "SELECT response FROM updates WHERE device_id=? AND idempotency_key=?", (device_id, key)
        )
        return json.loads(row["response"]) if row else None

    def check_may_upload(self, r: dict | None, round_id: int, device_id: str) -> dict:
        if r is None:
            raise Refused(404, f"round {round_id} does not exist", "unknown_round")
        if not self.db.query_one("SELECT 1 FROM assignments WHERE round_id=? AND device_id=?", (round_id, device_id)):
            raise Refused(403, f"device is not assigned to round {round_id}; check in first", "not_assigned")
        if self.db.query_one("SELECT 1 FROM updates WHERE round_id=? AND device_id=?", (round_id, device_id)):
            raise Refused(
                409,
                f"device already uploaded an update to round {round_id} (with another Idempotency-Key)",
                "duplicate",
            )
        if r["status"] != "open":
            raise Refused(409, f"round {round_id} is {r['status']}; late update refused", "round_closed")
        return r

    def prepare_upload(self, device_id: str, round_id: int, key: str, body: bytes) -> dict | PreparedUpload:
        """Everything before the write, without the lock: the replayed answer, or the decoded and
        validated update (the writer checks replay, duplicates and round state again)."""
        answer = self.previous_answer(device_id, key)
        if answer is not None:
            return answer
        self.tick()
        r = self.check_may_upload(self.get_round(round_id), round_id, device_id)
        base = self.model(r["base_version"])
        config = json.loads(r["config"])
        update, norm = check_update(
            body,
            round_id=round_id,
            base_version=r["base_version"],
            expected=expected_shapes(base.container),
            max_norm=config["max_update_norm"],
            max_sample_count=config["max_sample_count"],
        )
        bound = r["dp_clip"] if r["dp_clip"] is not None else config.get("norm_bound")
        return PreparedUpload(
            device_id=device_id,
            round_id=round_id,
            key=key,
            sample_count=update.sample_count,
            norm=norm,
            encoding=update.encoding + ("+topk" if update.sparse else ""),
            metrics=update.metrics,
            delta=update.delta if bound is None else clip_by_l2(update.delta, bound)[0],
            weight=1.0 if r["dp_clip"] is not None else float(update.sample_count),  # DP: bounded weights
            streaming=make_strategy(config).streaming,
        )

    def submit(self, device_id: str, round_id: int, key: str, body: bytes) -> dict:
        """Validate and fold one update into the round (blocking until it is durably committed);
        the same key replayed gets the same answer."""
        prepared = self.prepare_upload(device_id, round_id, key, body)
        if isinstance(prepared, dict):
            return prepared
        return self._wait(self.writer.submit(prepared))

    def _wait(self, future: Future) -> Any:
        if self.db.lock.held():  # the writer needs this lock: waiting here would never end
            raise RuntimeError("waiting for the upload writer while holding the database lock")
        return future.result()

    def running_sum(self, r: dict) -> RunningSum:
        """A fresh copy of the round's aggregate: from memory when the cache is current (it saves
        parsing the stored blob), else from the database."""
        if self._running is not None and self._running[:2] == (r["id"], r["received"]):
            cached = self._running[2]
            return RunningSum(dict(cached.sums), cached.total_weight, cached.count)  # add() makes new arrays
        blob = r["aggregate"] if "aggregate" in r else self.get_round(r["id"], with_aggregate=True)["aggregate"]
        return RunningSum.from_bytes(blob)

    def remember_running(self, round_id: int, received: int, running: RunningSum) -> None:
        """The writer's newly committed aggregate, so the next group need not parse it back."""
        self._running = (round_id, received, running)

    def close(self) -> None:
        """Stop the upload writer after what it has queued."""
        self.writer.close()

    # ------------------------------------------------------------------ operator calls

    def set_paused(self, paused: bool) -> None:
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO server_state(key, value) VALUES ('paused', ?)", ("1" if paused else "0",)
            )
        self.paused = paused
        log.info("round scheduling %s", "paused" if paused else "resumed")
        self.tick()

    def update_settings(self, changes: dict[str, Any]) -> RoundSettings:
        """Validated round-setting changes; they apply from the next round on."""
        with self.db.lock:
            new = RoundSettings(**{**self.round_settings.model_dump(), **changes})
            if new.dp_enabled:
                try:
                    privacy.require_accountant()
                except ValueError as exc:
                    raise Refused(422, f"dp_noise_multiplier: {exc}", "bad_settings") from None
            self.round_settings = new
        log.info("round settings changed: %s", changes)
        return self.round_settings

    def publish_admin(self, data: bytes) -> int:
        """An operator's model replaces the base: the open round is abandoned, a new one opens on it."""
        with self.db.lock:
            version = self.publish(data, reason="published by the operator")
            r = self.current_round()
            if r is not None:
                self._abandon(r, f"superseded by published model v{version}")
            self.tick()
        return version
