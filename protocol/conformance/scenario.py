"""The base of every scenario: a coordinator that follows docs/protocol.md by default, plus the checks
that hold in every scenario. A scenario subclass changes a few answers (a 503 here, a tampered model
there), says when it has seen enough (`finished`) and what it concludes (`verdict`).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from protocol.conformance.server import Reply, Seen
from protocol.conformance.world import MODEL_VERSION, World, etag_of
from protocol.update import UpdateError, decode_update

ENROLLMENT_KEY = "conformance-enrollment-key"
TOKEN = "conformance-token-7f3a"  # noqa: S105 (a test fixture, not a secret)
DEVICE_ID = "c0ffee00c0ffee00c0ffee00c0ffee00"
IDLE = 600  # "come back in 10 minutes": what the coordinator says when it has nothing more to play
MODEL_PATH = re.compile(r"^/v1/models/(\d+)$")
STEP_PATH = re.compile(r"^/v1/models/(\d+)/training-step$")
UPLOAD_PATH = re.compile(r"^/v1/rounds/(\d+)/updates$")
CHECKIN_FIELDS = {"eligible", "num_samples", "task_kinds"}
METADATA_KEYS = {"format", "format_version", "encoding", "sparse", "sample_count", "round_id", "base_version"}
METADATA_KEYS |= {"metrics", "tensors"}


@dataclass
class Upload:
    """One upload attempt as the scenario saw it."""

    seen: Seen
    round_id: int
    key: str | None
    accepted: bool = False


class Scenario:
    """One scripted situation. Subclasses set `name` and `checks` (one line for the report), change a
    few answers (the `on_*` methods), and say when they have seen enough (`finished`) and what they
    conclude (`verdict`)."""

    name = "scenario"
    checks = ""
    timeout = 60.0  # seconds per agent run before the suite stops waiting
    runs = 1  # agent runs, one after the other, on the same state directory
    round_id = 1
    encoding = "float32"
    epochs = 2
    deadline_in = 300.0  # seconds from the first offer of a round to its deadline

    def __init__(self, world: World):
        self.world = world
        self.run = 0  # the agent run in progress (0-based); the suite advances it
        self.requests: list[Seen] = []
        self.uploads: list[Upload] = []
        self.problems: list[str] = []
        self.accepted_keys: dict[str, dict] = {}  # Idempotency-Key -> its 202 answer
        self.task_deadlines: dict[int, float] = {}
        self.run_started: list[float] = []  # time.monotonic() at the start of each run
        self.lock = threading.RLock()

    def start_run(self, run: int) -> None:
        with self.lock:
            self.run = run
            self.run_started.append(time.monotonic())

    # ------------------------------------------------------------------ dispatch

    def __call__(self, seen: Seen) -> Reply:
        with self.lock:
            self.requests.append(seen)
            path = seen.path.split("?")[0]
            if seen.method == "POST" and path == "/v1/devices":
                return self.on_enroll(seen)
            if not self.authorized(seen):
                return Reply.refuse(401, "Authorization: unknown bearer token", {"WWW-Authenticate": "Bearer"})
            if seen.method == "POST" and path == "/v1/checkin":
                self.check_checkin_body(seen)
                return self.on_checkin(seen)
            if seen.method == "GET" and (m := MODEL_PATH.match(path)):
                return self.on_model(seen, int(m.group(1)))
            if seen.method == "GET" and (m := STEP_PATH.match(path)):
                return self.on_training_step(seen, int(m.group(1)))
            if seen.method == "POST" and (m := UPLOAD_PATH.match(path)):
                upload = Upload(seen, int(m.group(1)), seen.headers.get("idempotency-key"))
                self.uploads.append(upload)
                return self.on_upload(seen, upload)
            return Reply.refuse(404, f"{seen.method} {path}: no such endpoint")

    def authorized(self, seen: Seen) -> bool:
        if seen.headers.get("authorization") == f"Bearer {TOKEN}":
            return True
        self.problems.append(f"{seen.method} {seen.path} without the device's bearer token")
        return False

    # ------------------------------------------------------------------ the default coordinator

    def on_enroll(self, seen: Seen) -> Reply:
        try:
            body = seen.json()
        except ValueError:
            return Reply.refuse(422, "body: not JSON")
        if not isinstance(body, dict) or set(body) - {"enrollment_key", "name"}:
            return Reply.refuse(422, f"body: unexpected fields in {body!r}")
        if body.get("enrollment_key") != ENROLLMENT_KEY:
            self.problems.append(f"enrolled with key {body.get('enrollment_key')!r}, not the one given")
            return Reply.refuse(401, "enrollment_key: wrong enrollment key")
        return Reply.json(201, {"device_id": DEVICE_ID, "token": TOKEN})

    def task(self, round_id: int | None = None, **overrides: object) -> dict:
        round_id = self.round_id if round_id is None else round_id
        deadline = self.task_deadlines.setdefault(round_id, time.time() + self.deadline_in)
        return {
            "round_id": round_id,
            "base_version": MODEL_VERSION,
            "epochs": self.epochs,
            "batch_size": 16,
            "lr": 0.05,
            "momentum": 0.0,
            "deadline": deadline,
            "fedprox_mu": 0.0,
            "clip_norm": None,
            "noise_multiplier": 0.0,
            "encoding": self.encoding,
            "topk_fraction": None,
            **overrides,
        }

    def offer(self, round_id: int | None = None, **overrides: object) -> Reply:
        return Reply.json(200, {"status": "task", "task": self.task(round_id, **overrides)})

    def come_back(self, seconds: int = IDLE, reason: str = "nothing to do") -> Reply:
        body = {"status": "retry", "retry_after": seconds, "reason": reason}
        return Reply.json(200, body, {"Retry-After": str(seconds)})

    def on_checkin(self, seen: Seen) -> Reply:
        """Offer the task until the device has an accepted update in the round, then send it away."""
        if any(u.accepted and u.round_id == self.round_id for u in self.uploads):
            return self.come_back(reason=f"already contributed to round {self.round_id}")
        return self.offer()

    def model_reply(self, seen: Seen, data: bytes, etag: str) -> Reply:
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
        candidates = {t.strip().removeprefix("W/") for t in seen.headers.get("if-none-match", "").split(",")}
        if etag in candidates or "*" in candidates:
            return Reply(304, b"", headers)
        return Reply(200, data, {"Content-Type": "application/octet-stream", **headers})

    def on_model(self, seen: Seen, version: int) -> Reply:
        if version != MODEL_VERSION:
            self.problems.append(f"asked for model version {version}; the task said {MODEL_VERSION}")
            return Reply.refuse(404, f"model version {version} does not exist")
        return self.model_reply(seen, self.world.model_bytes, self.world.etag)

    def on_training_step(self, seen: Seen, version: int) -> Reply:
        step = self.world.training_step
        if version != MODEL_VERSION or step is None:
            return Reply.refuse(404, f"no training step for model version {version}")
        return self.model_reply(seen, step, etag_of(step))

    def on_upload(self, seen: Seen, upload: Upload) -> Reply:
        """Replay a known key; otherwise check the update and accept it."""
        if upload.key and upload.key in self.accepted_keys:
            upload.accepted = True
            return Reply.json(202, self.accepted_keys[upload.key])
        refusal = self.refusal(seen, upload)
        if refusal is not None:
            return refusal
        return self.accept(upload)

    def refusal(self, seen: Seen, upload: Upload) -> Reply | None:
        """What the real coordinator would refuse (and which a conforming device never sends)."""
        if not upload.key or len(upload.key) > 200:
            self.problems.append(f"upload without a valid Idempotency-Key ({upload.key!r})")
            return Reply.refuse(400, "Idempotency-Key: header is required")
        deadline = self.task_deadlines.get(upload.round_id)
        if deadline is None:
            self.problems.append(f"upload to round {upload.round_id}, which was never offered")
            return Reply.refuse(403, f"device is not assigned to round {upload.round_id}")
        if any(u.accepted and u.round_id == upload.round_id for u in self.uploads):
            return Reply.refuse(409, f"device already uploaded an update to round {upload.round_id}")
        if seen.wall > deadline:
            return Reply.refuse(409, f"round {upload.round_id} is closed; late update refused")
        try:
            update = decode_update(seen.body, expected=self.world.shapes)
        except (UpdateError, ValueError) as exc:
            self.problems.append(f"round {upload.round_id}: the upload is not a valid update: {exc}")
            return Reply.refuse(422, f"update: {exc}")
        if update.round_id != upload.round_id or update.base_version != MODEL_VERSION:
            self.problems.append(
                f"update says round {update.round_id} / base {update.base_version}, "
                f"expected round {upload.round_id} / base {MODEL_VERSION}"
            )
            return Reply.refuse(422, "update.round_id / base_version do not match")
        return None

    def accept(self, upload: Upload) -> Reply:
        answer = {"accepted": True, "round_id": upload.round_id, "received": 1, "goal": 1}
        upload.accepted = True
        self.accepted_keys[str(upload.key)] = answer
        return Reply.json(202, answer)

    def check_checkin_body(self, seen: Seen) -> None:
        try:
            body = seen.json()
        except ValueError:
            self.problems.append("check-in body is not JSON")
            return
        if not isinstance(body, dict) or set(body) - CHECKIN_FIELDS:
            self.problems.append(f"check-in body carries unknown fields: {body!r}")

    # ------------------------------------------------------------------ the suite's hooks

    def finished(self) -> bool:
        """Seen enough for this run? (The suite also stops when the agent exits or the run times out.)"""
        return False

    def verdict(self) -> list[str]:
        """Problems found (empty: passed). The base checks every scenario shares come first."""
        found = list(dict.fromkeys(self.problems))
        for upload in self.uploads:
            if self.world.carries_raw_data(upload.seen.body):
                found.append(f"round {upload.round_id}: the upload contains raw local data")
        for seen in self.requests:
            if seen.body and not UPLOAD_PATH.match(seen.path) and self.world.carries_raw_data(seen.body):
                found.append(f"{seen.method} {seen.path} contains raw local data")
        keys_per_round: dict[int, set[str | None]] = {}
        for upload in self.uploads:
            keys_per_round.setdefault(upload.round_id, set()).add(upload.key)
        for round_id, keys in sorted(keys_per_round.items()):
            if len(keys) > 1:
                found.append(f"round {round_id}: {len(keys)} different updates (Idempotency-Keys) for one task")
        return found

    # ------------------------------------------------------------------ helpers for subclasses

    def since(self, moment: float) -> list[Seen]:
        return [s for s in self.requests if s.arrived >= moment]

    def checkins(self) -> list[Seen]:
        return [s for s in self.requests if s.path == "/v1/checkin"]

    def model_downloads(self) -> list[Seen]:
        return [s for s in self.requests if MODEL_PATH.match(s.path.split("?")[0])]

    def settled_after(self, event_time: float | None, grace: float) -> bool:
        """True once `grace` seconds passed after `event_time` (a moment after which nothing should happen)."""
        return event_time is not None and time.monotonic() - event_time >= grace
