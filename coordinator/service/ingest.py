"""Uploads: everything before the write, on the request's own thread and without the lock (the
replayed answer, the round and assignment checks, decoding and validating the update, the round
strategy's view of it), then the group-commit writer (service/writer.py) for the rest."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future

from coordinator.errors import Refused
from coordinator.service.expected import Expected
from coordinator.service.modelfile import expected_shapes
from coordinator.service.rounds import RoundLifecycle
from coordinator.service.validation import check_update
from coordinator.service.versions import ModelVersions
from coordinator.service.writer import (
    PreparedUpload,
    UploadWriter,
    answered_meanwhile,
    check_may_upload,
    replayed,
)
from coordinator.store import RoundRow, Store
from protocol.update import MAX_HEADER_BYTES


def body_digest(body: bytes | bytearray) -> str:
    """The body's sha256, kept with the answer: a replayed Idempotency-Key must come with the same body."""
    return hashlib.sha256(body).hexdigest()


class Ingest:
    def __init__(
        self,
        store: Store,
        versions: ModelVersions,
        lifecycle: RoundLifecycle,
        writer: UploadWriter,
        clock: Callable[[], float] = time.time,
        on_late: Callable[[], None] | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ):
        self.max_header_bytes = max_header_bytes
        self.store, self.versions, self.lifecycle, self.writer, self.clock = store, versions, lifecycle, writer, clock
        self.on_late = on_late or (lambda: None)  # wakes the background tick when a deadline has passed

    def prepare(
        self, device_id: str, round_id: int, key: str, body: bytes, admitted: RoundRow | None = None
    ) -> dict | PreparedUpload:
        """The replayed answer for a known Idempotency-Key, or the decoded and validated update (the
        writer checks replay, duplicates and round state again, under the lock). `admitted`: the
        round as `check_may_upload` passed it just before the body was read (not checked again)."""
        body_sha256 = body_digest(body)
        answer = replayed(self.store, device_id, key, body_sha256)
        if answer is not None:
            return answer
        r = admitted
        if r is None:
            now = self.clock()
            r = self.store.round(round_id)
            if r is not None and r.is_open and now >= r.deadline:
                self.on_late()
            try:
                r = check_may_upload(self.store, r, round_id, device_id, now)
            except Refused as exc:
                answer = answered_meanwhile(self.store, device_id, key, body_sha256, exc)  # by another replica
                if isinstance(answer, Refused):
                    raise
                return answer
        cfg = r.config
        if cfg.secure_aggregation:
            raise Refused(
                409,
                f"round {round_id} uses secure aggregation: send the masked update through "
                f"/v1/rounds/{round_id}/secagg, not a plain one",
                "secure_aggregation",
            )
        update, norm = check_update(
            body,
            round_id=round_id,
            base_version=r.base_version,
            expected=expected_shapes(self.versions.get(r.base_version).container),
            max_norm=cfg.max_update_norm,
            max_sample_count=cfg.max_sample_count,
            max_header_bytes=self.max_header_bytes,
        )
        strategy = self.lifecycle.strategy_for(r)
        delta, weight = strategy.accept(update.delta, update.sample_count)
        return PreparedUpload(
            device_id=device_id,
            round_id=round_id,
            key=key,
            sample_count=update.sample_count,
            norm=norm,
            encoding=update.encoding + ("+topk" if update.sparse else ""),
            metrics=update.metrics,
            delta=delta,
            weight=weight,
            streaming=strategy.streaming,
            body_sha256=body_sha256,
        )

    def prepare_and_submit(
        self,
        device_id: str,
        round_id: int,
        key: str,
        body: bytes,
        admitted: RoundRow | None = None,
        expected: Expected | None = None,
    ) -> dict | Future:
        """`prepare`, then `submit` the update (one hop to a worker thread for both): the replayed
        answer, or the future of the 202 body. `expected` (the writer's) is done once it is queued."""
        try:
            prepared = self.prepare(device_id, round_id, key, body, admitted)
            return prepared if isinstance(prepared, dict) else self.writer.submit(prepared)
        finally:
            if expected is not None:
                expected.done()

    def submit(self, prepared: PreparedUpload) -> Future:
        """Queue a prepared upload; the future resolves with the 202 body once it is on disk."""
        return self.writer.submit(prepared)
