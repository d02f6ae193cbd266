"""The scenarios, one small class each (docs/protocol.md names the rule each one checks)."""

from __future__ import annotations

import email.utils
import math
import time

import numpy as np

from engine.serialize.container import loads
from protocol.conformance.scenario import METADATA_KEYS, Scenario, Upload
from protocol.conformance.server import DROP, Reply, Seen
from protocol.update import decode_update

TOLERANCE = 0.005  # seconds of timer slack allowed when checking that a device waited long enough


class DeltasOnly(Scenario):
    name = "deltas_only"
    checks = "the upload is a delta of the model's trainable tensors, trained on all the data given, nothing else"

    def finished(self) -> bool:
        done = [u.seen.answered for u in self.uploads if u.accepted and u.seen.answered]
        return bool(done) and self.settled_after(done[0], 1.0)  # a moment to catch a second upload

    def verdict(self) -> list[str]:
        found = super().verdict()
        accepted = [u for u in self.uploads if u.accepted]
        if not accepted:
            return [*found, "no update was accepted"]
        body = accepted[0].seen.body
        update = decode_update(body, expected=self.world.shapes)
        metadata = loads(body).metadata
        if set(metadata) - METADATA_KEYS:
            found.append(f"update metadata has extra keys {sorted(set(metadata) - METADATA_KEYS)}")
        if len(update.metrics) > 32:
            found.append(f"update carries {len(update.metrics)} metrics; a few aggregate numbers are expected")
        if update.sample_count != self.world.samples:
            found.append(f"sample_count {update.sample_count}, but the agent was given {self.world.samples} examples")
        if update.encoding != self.encoding:
            found.append(f"encoded as {update.encoding}; the task asked for {self.encoding}")
        found += self.delta_problems(update.delta)
        return found

    def delta_problems(self, delta: dict[str, np.ndarray]) -> list[str]:
        world = self.world
        norm = math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values()))
        off = math.sqrt(sum(float(np.sum(np.square(delta[n] - w, dtype=np.float64))) for n, w in world.weights.items()))
        if off < 0.5 * world.weight_norm():
            return [f"the update is close to the model's weights (distance {off:.3g}): full weights, not a delta"]
        if not 0 < norm < 0.5 * world.weight_norm():
            return [f"delta norm {norm:.3g} is not that of a few steps (weights' norm {world.weight_norm():.3g})"]
        before, after = world.loss(), world.loss(delta)
        if not after < before:
            return [f"base + delta does not lower the loss on the given data ({before:.4f} -> {after:.4f})"]
        return []


class DeltasOnlyInt8(DeltasOnly):
    name = "deltas_only_int8"
    checks = "an int8 task gets an int8 update (per-tensor scale) that decodes to a real delta"
    encoding = "int8"


class ModelCache(Scenario):
    name = "model_cache"
    checks = "a second task on the same model version does not download the model again (cache or 304)"
    runs = 2

    def on_checkin(self, seen: Seen) -> Reply:
        round_id = 1 + self.run
        if any(u.accepted and u.round_id == round_id for u in self.uploads):
            return self.come_back()
        return self.offer(round_id)

    def verdict(self) -> list[str]:
        found = super().verdict()
        rounds = sorted({u.round_id for u in self.uploads if u.accepted})
        if rounds != [1, 2]:
            found.append(f"expected accepted updates for rounds [1, 2] (one per run), got {rounds}")
        full = [s for s in self.model_downloads() if s.status == 200]
        if len(full) != 1:
            found.append(f"the unchanged model was downloaded in full {len(full)} times (expected once)")
        return found


class OneUploadPerTask(Scenario):
    name = "one_upload_per_task"
    checks = "after a restart, a task for a round already done is neither trained nor uploaded again"
    runs = 2

    def on_checkin(self, seen: Seen) -> Reply:
        return self.offer()  # even after the upload: a device must remember which rounds it finished

    def finished(self) -> bool:
        if self.run == 0:
            return False  # the agent exits after its task
        offered = [s.answered for s in self.checkins() if s.arrived >= self.run_started[1] and s.answered]
        return bool(offered) and self.settled_after(offered[0], 3.0 + 2 * self.first_task_seconds())

    def first_task_seconds(self) -> float:
        """How long the first run took from its task to its upload: a forgetful agent retraining after the
        restart would need about as long again (more on a loaded machine) before its second upload shows."""
        first = [s.answered for s in self.checkins() if s.arrived < self.run_started[1] and s.answered]
        return max(0.0, self.uploads[0].seen.arrived - first[0]) if first and self.uploads else 0.0

    def verdict(self) -> list[str]:
        found = super().verdict()
        if not any(u.accepted for u in self.uploads):
            return [*found, "no update was accepted in the first run"]
        if len(self.run_started) > 1:
            again = [u for u in self.uploads if u.seen.arrived >= self.run_started[1]]
            if again:
                found.append(f"uploaded to round {self.round_id} again after a restart ({len(again)} attempts)")
            if not any(s.arrived >= self.run_started[1] for s in self.checkins()):
                found.append("the restarted agent never checked in")
        return found


class IdempotentRetry(Scenario):
    name = "idempotent_retry"
    checks = "a 503 and then a lost answer on upload: every retry carries the same Idempotency-Key and bytes"

    def on_upload(self, seen: Seen, upload: Upload) -> Reply:
        attempt = len(self.uploads)
        if attempt == 1:
            return Reply.refuse(503, "coordinator is shutting down; retry later", {"Retry-After": "1"})
        reply = super().on_upload(seen, upload)
        return DROP if attempt == 2 and reply.status == 202 else reply  # counted, but the answer is lost

    def finished(self) -> bool:
        if any(u.seen.status == 202 for u in self.uploads) or len(self.uploads) > 5:
            return True
        return bool(self.uploads) and any(s.arrived > self.uploads[0].seen.arrived for s in self.checkins())

    def verdict(self) -> list[str]:
        found = super().verdict()
        if len(self.uploads) < 3:
            found.append(f"{len(self.uploads)} upload attempts; expected retries after the 503 and the lost answer")
        keys = [u.key for u in self.uploads]
        if len(set(keys)) > 1:
            found.append(f"the retries changed the Idempotency-Key: {keys}")
        if len({u.seen.body for u in self.uploads}) > 1:
            found.append("the retries changed the update's bytes")
        if not any(u.seen.status == 202 for u in self.uploads):
            found.append("the agent never got its update acknowledged")
        return found


PACED_ANSWERS = 5  # check-in: 429, "retry", 503 with a date; download: 408; upload: 503


class RetryAfter(Scenario):
    name = "retry_after"
    checks = "429, 503 (HTTP-date), 408 and a check-in 'retry': the agent waits at least Retry-After, then comes back"

    def __init__(self, world):
        super().__init__(world)
        self.paced: list[tuple[Seen, float | None, float | None]] = []  # (request, seconds, or unix time)

    def pace(self, seen: Seen, reply: Reply, seconds: float | None = None, until: float | None = None) -> Reply:
        self.paced.append((seen, seconds, until))
        return reply

    def on_checkin(self, seen: Seen) -> Reply:
        n = len(self.checkins())
        if n == 1:
            return self.pace(seen, Reply.refuse(429, "too many requests", {"Retry-After": "2"}), seconds=2)
        if n == 2:
            return self.pace(seen, self.come_back(2, "round full"), seconds=2)
        if n == 3:
            until = math.ceil(time.time()) + 3  # an HTTP-date has whole seconds
            date = email.utils.formatdate(until, usegmt=True)
            return self.pace(seen, Reply.refuse(503, "overloaded", {"Retry-After": date}), until=until)
        return super().on_checkin(seen)

    def on_model(self, seen: Seen, version: int) -> Reply:
        if len(self.model_downloads()) == 1:
            return self.pace(seen, Reply.refuse(408, "request timeout", {"Retry-After": "1"}), seconds=1)
        return super().on_model(seen, version)

    def on_upload(self, seen: Seen, upload: Upload) -> Reply:
        if len(self.uploads) == 1:
            return self.pace(seen, Reply.refuse(503, "busy", {"Retry-After": "2"}), seconds=2)
        return super().on_upload(seen, upload)

    def finished(self) -> bool:
        return any(u.seen.status == 202 for u in self.uploads)

    def verdict(self) -> list[str]:
        found = super().verdict()
        for seen, seconds, until in self.paced:
            label = f"{seen.method} {seen.path} answered {seen.status} (Retry-After {seconds or 'HTTP-date'})"
            later = [s for s in self.requests if s.arrived > seen.arrived]
            if not later or seen.answered is None:
                found.append(f"{label}: the agent never came back")
                continue
            after = later[0]
            if seconds is not None and after.arrived - seen.answered < seconds - TOLERANCE:
                found.append(f"{label}: the agent came back after {after.arrived - seen.answered:.2f}s")
            if until is not None and after.wall < until - TOLERANCE:
                found.append(f"{label}: the agent came back {until - after.wall:.2f}s before the date")
        if len(self.paced) < PACED_ANSWERS:
            found.append(f"only {len(self.paced)} of the {PACED_ANSWERS} paced answers were reached")
        return found


class NoRetryOn4xx(Scenario):
    name = "no_retry_on_4xx"
    checks = "a 409 and a 422 on upload are not retried; the agent drops those rounds and carries on"
    refusals = {1: (409, "round 1 is closed; late update refused"), 2: (422, "update: L2 norm exceeds the bound")}

    def on_checkin(self, seen: Seen) -> Reply:
        for round_id in self.refusals:
            if not any(u.round_id == round_id for u in self.uploads):
                return self.offer(round_id)
        return self.come_back()

    def on_upload(self, seen: Seen, upload: Upload) -> Reply:
        status, detail = self.refusals.get(upload.round_id, (403, "not assigned"))
        return Reply.refuse(status, detail)

    def finished(self) -> bool:
        rounds = [u.round_id for u in self.uploads]
        if len(rounds) != len(set(rounds)):
            return True  # a refused upload was sent again: seen enough
        last = [u.seen.answered for u in self.uploads if u.round_id == 2 and u.seen.answered]
        return bool(last) and self.settled_after(last[0], 3.0)

    def verdict(self) -> list[str]:
        found = super().verdict()
        for round_id, (status, _) in self.refusals.items():
            tries = sum(u.round_id == round_id for u in self.uploads)
            if tries > 1:
                found.append(f"round {round_id}: the upload refused with {status} was sent {tries} times")
            if tries == 0:
                found.append(f"round {round_id}: never uploaded (did the agent stop after an earlier refusal?)")
        return found


class Deadline(Scenario):
    name = "deadline"
    checks = "no upload after a task's deadline: one that passed on arrival, one that passes during training"
    epochs = 100  # round 2: far more work than the 1 s it allows

    def on_checkin(self, seen: Seen) -> Reply:
        now = time.time()
        if 1 not in self.task_deadlines:  # round 1 arrives already late (a slow network, a skewed clock)
            self.task_deadlines[1] = now - 1.0
            return self.offer(1, epochs=2)  # little work: an agent that ignores deadlines uploads soon
        if 2 not in self.task_deadlines:  # the agent gave round 1 up: round 2 has one second left
            self.task_deadlines[2] = now + 1.0
        if now <= self.task_deadlines[2]:
            return self.offer(2)
        return self.come_back(reason="no open round")

    def late_uploads(self) -> list[str]:
        found, unanswered = [], set()
        for upload in self.uploads:
            deadline = self.task_deadlines.get(upload.round_id, math.inf)
            if upload.seen.wall > deadline and upload.key not in unanswered:
                found.append(f"round {upload.round_id}: uploaded {upload.seen.wall - deadline:.2f}s after the deadline")
            if upload.seen.status is None:
                unanswered.add(upload.key)  # a resend of an unanswered attempt may come late: only a replay tells
        return found

    def finished(self) -> bool:
        deadline = self.task_deadlines.get(2)
        done = deadline is not None and any(s.wall > deadline for s in self.checkins())
        return done or bool(self.late_uploads())

    def verdict(self) -> list[str]:
        found = super().verdict() + self.late_uploads()
        if 2 not in self.task_deadlines:
            found.append("the agent never came back for round 2 after the stale round 1")
        return found


class CorruptedModel(Scenario):
    name = "corrupted_model"
    checks = "a model whose bytes do not match its ETag (sha256) is not trained on: no upload"

    def on_model(self, seen: Seen, version: int) -> Reply:
        return self.model_reply(seen, self.world.tampered_model, self.world.etag)

    def finished(self) -> bool:
        downloads = self.model_downloads()
        return bool(self.uploads) or (
            bool(downloads) and any(s.arrived > downloads[0].arrived for s in self.checkins())
        )

    def verdict(self) -> list[str]:
        found = super().verdict()
        if not self.model_downloads():
            found.append("the agent never downloaded the model")
        if self.uploads:
            found.append(f"uploaded {len(self.uploads)} time(s) for a task on a corrupted model")
        return found


SCENARIOS: list[type[Scenario]] = [
    DeltasOnly,
    DeltasOnlyInt8,
    ModelCache,
    OneUploadPerTask,
    IdempotentRetry,
    RetryAfter,
    NoRetryOn4xx,
    Deadline,
    CorruptedModel,
]
