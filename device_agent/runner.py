"""The agent's loop: enroll, check in, train, upload - one federated round at a time.

    resume any unacknowledged upload (same Idempotency-Key, so it counts once)
    loop:
        eligible?            (charging, idle, unmetered) else wait
        POST /v1/checkin     -> a task, or "come back in N seconds" (waited in full, plus jitter; meanwhile,
                                when due, GET /v1/models/latest with If-None-Match and re-personalize on a newer base)
        evaluate/personalize -> no training for the federation: measure, maybe fine-tune the personal layers,
                                report accuracies only (tasks.py)
        model for the task   (from the cache when the version is unchanged; sha256-verified)
        train locally        (stops, and discards the round, if conditions stop holding or the deadline passes)
        delta = trained - base -> clip -> noise -> top-k -> encode
        persist, then upload (a crash after this point re-sends the same bytes)
        fine-tune the personal layers, report one JSON line

A temporary refusal (network down, 5xx, 408/429/503 after every retry) never ends the loop: the agent waits as the
server asked (or `max_wait` when it did not say) and carries on. Only a permanent refusal of enrollment or check-in (a
4xx other than a token we can renew) stops it.

Raw samples, labels and file names never leave this module: the only things built for the network
are the update container (deltas, sample count, aggregate metrics) and the JSON control messages in client.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent import feddyn
from device_agent.client import CoordinatorClient, DeadlinePassed, RejectedError, UnavailableError
from device_agent.credentials import ensure_token
from device_agent.eligibility import Probe
from device_agent.models import CorruptModel, make_sgd, model_problem, model_view
from device_agent.personal import PersonalModel, split_local, trainable_names
from device_agent.state import AgentState
from device_agent.tasks import TASK_KINDS, BaseRefresh, do_metrics_task
from engine.data import IDataView
from engine.serialize.container import ContainerError
from protocol.deltas import TopK, add_gaussian_noise, clip_by_l2
from protocol.messages import ProtocolError, Task
from protocol.update import decode_update, encode_update

log = logging.getLogger("pocketfed.agent")


@dataclass
class AgentConfig:
    coordinator: str
    enrollment_key: str
    name: str | None = None
    rounds: int | None = None  # None: until stopped
    once: bool = False
    holdout: float = 0.2
    personal_layers: list[str] = field(default_factory=list)
    personal_epochs: int = 1
    seed: int = 0
    max_wait: float = 30.0  # our own idle interval, used only when the server named no wait (never caps one)
    refresh_interval: float = 3600.0  # seconds between our own looks for a newer base version (0: never)
    rotate_token_days: float = 30.0  # trade the token for a new one this often (0: never); credentials.py
    json_lines: bool = False
    secagg_leave_after: str | None = None  # simulation: vanish after this secure-aggregation phase


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        client: CoordinatorClient,
        state: AgentState,
        dataset: IDataView,
        probe: Probe,
        *,
        sleep: Callable[[float], None] = time.sleep,
        emit: Callable[[str], None] | None = None,
        secagg_hand_off: Callable[[Callable[[], Any]], None] | None = None,
    ):
        self.config, self.client, self.state, self.probe = config, client, state, probe
        self.sleep = sleep
        self.secagg_hand_off = secagg_hand_off  # runs the secure-aggregation phases elsewhere (simulation)
        self.emit = emit or (lambda line: print(line, file=sys.stdout, flush=True))
        self.train_set, self.holdout_set = split_local(dataset, config.holdout, config.seed)
        self.eval_set = self.holdout_set or self.train_set
        self.personal = PersonalModel(state, config.personal_layers, epochs=config.personal_epochs, seed=config.seed)
        self.refresh = BaseRefresh(config.refresh_interval)

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, Any]]:
        """Run until `rounds` training tasks were done (or one task of any kind, with `once`); returns the
        records of every task done."""
        records: list[dict[str, Any]] = []
        target = 1 if self.config.once else self.config.rounds
        reenrolled = False  # a refused token leads to one fresh enrollment, not a loop of them

        def done() -> int:
            return len(records) if self.config.once else sum(r.get("kind", "train") == "train" for r in records)

        while target is None or done() < target:
            try:
                self.ensure_enrolled()
                resumed = self.resume_pending()
                if resumed is not None:
                    records.append(self.report(resumed))
                    continue
                record = self.one_round()
            except UnavailableError as exc:
                wait = self.client.paced_wait(self.config.max_wait if exc.retry_after is None else exc.retry_after)
                log.warning("%s; trying again in %.0fs", exc, wait)
                self.sleep(wait)
                continue
            except ProtocolError as exc:  # a malformed answer: do nothing with it, look again later
                wait = self.client.paced_wait(self.config.max_wait)
                log.warning("the coordinator's answer breaks the protocol (%s); trying again in %.0fs", exc, wait)
                self.sleep(wait)
                continue
            except RejectedError as exc:
                if exc.status == 401 and exc.path != "/v1/devices" and not reenrolled:
                    log.warning("token refused (%s); enrolling again", exc.detail)
                    self.state.forget_identity()
                    self.client.token = None
                    reenrolled = True
                    continue
                raise
            if record is not None:
                reenrolled = False
                records.append(self.report(record))
        return records

    def ensure_enrolled(self) -> None:
        ensure_token(self.client, self.state, self.config)  # enroll, or rotate a token that is due

    def one_round(self) -> dict[str, Any] | None:
        """Check in and, if given a task, do it. None means "nothing done, look again later"."""
        verdict = self.probe.check()
        if not verdict.ok:
            log.info("not eligible: %s", verdict.reason)
            self.sleep(self.client.paced_wait(self.config.max_wait))
            return None
        answer = self.client.checkin(self.train_set.size(), TASK_KINDS)
        task = answer.task
        if task is None:  # pace steering: the server's wait, in full (plus jitter), whatever its length
            if self.refresh.due():
                self.refresh.run(self)
            wait = self.client.paced_wait(answer.retry_after or 0)
            log.info("no task for us now (%s); checking in again in %.1fs", answer.reason, wait)
            self.sleep(wait)
            return None
        if not task.trains_global:
            record = do_metrics_task(self, task)
            if record is None:  # not done: do not ask again at once
                self.sleep(self.client.paced_wait(self.config.max_wait))
            return record
        if task.round_id == self.state.last_round():  # one update per round, even if offered again
            wait = self.client.paced_wait(self.config.max_wait)
            log.info("round %d is already done here; checking in again in %.1fs", task.round_id, wait)
            self.sleep(wait)
            return None
        return self.do_task(task)

    # ------------------------------------------------------------------ one task

    def model_bytes(self, version: int) -> bytes:
        """The base model of `version`: from the cache when we have it, else downloaded and verified
        (sha256 against the ETag, then the container's checksum). Two bad copies raise CorruptModel."""
        cached = self.state.cached_model()
        if cached is not None and cached[0] == version:
            return cached[2]
        etag = cached[1] if cached else None
        problem = "not downloaded"
        for _ in range(2):
            data, etag = self.client.download_model(version, etag)
            if data is None:  # 304 for a version we do not hold: our cache lies; fetch unconditionally
                data, etag = self.client.download_model(version)
            problem = model_problem(data or b"", etag)
            if problem is None:
                self.state.save_model(version, etag, data)
                log.info("downloaded model version %d (%d bytes)", version, len(data))
                return data
            log.warning("model version %d is corrupted (%s); discarding it", version, problem)
            etag = None
        raise CorruptModel(f"model version {version}: {problem}")

    def drop_round(self, round_id: int, why: str) -> None:
        """Give a round up for good: nothing is sent for it, and it is not taken again if offered again."""
        log.warning("round %d: %s; dropping the round", round_id, why)
        self.state.set_last_round(round_id)

    def do_task(self, task: Task) -> dict[str, Any] | None:
        round_id, version = task.round_id, task.base_version
        log.info("round %d: training on %d samples from model version %d", round_id, self.train_set.size(), version)
        try:
            model = self.model_bytes(version)
        except CorruptModel as exc:
            self.drop_round(round_id, str(exc))
            return None
        except RejectedError as exc:  # e.g. 404: the version is gone
            self.drop_round(round_id, f"the model download was refused ({exc})")
            return None
        trained = self.train_locally(task, model)
        if trained is None:
            return None
        if time.time() > task.deadline:
            self.drop_round(round_id, "the deadline passed before the update was ready")
            return None
        delta, metrics = trained
        if task.secure_aggregation:
            from device_agent.secagg import secure_round

            return self.personalize(secure_round(self, task, delta, metrics))
        body, residual = self.encode(delta, task, metrics)
        record = {
            "kind": "train",
            "round": round_id,
            "version": version,
            "samples": self.train_set.size(),
            "loss_before": metrics["loss_before"],
            "loss_after": metrics["loss_after"],
            "acc_before": metrics["acc_before"],
            "acc_after": metrics["acc_after"],
            "bytes_sent": len(body),
            "bytes_raw_float32": 4 * sum(d.size for d in delta.values()),
            "encoding": task.encoding,
            "topk_fraction": task.topk_fraction,
        }
        g = feddyn.next_g(task, self.state.feddyn(), delta)  # FedDyn's new g, adopted once acknowledged
        self.state.save_pending(round_id, body, residual, record, deadline=task.deadline, feddyn=g)
        return self.personalize(self.send_pending())

    def train_locally(self, task: Task, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
        """Train the task's model on the local data: (delta, metrics), or None if stopped mid-way.

        The trainer's planned memory is released before returning, so encoding and the personal
        model's training do not run on top of it (a phone's peak memory is what counts)."""
        from engine import load_model_bytes
        from engine.serialize.modelfile import ModelFileError
        from engine.trainer import Interrupted, Trainer

        round_id = task.round_id
        try:
            model = load_model_bytes(data)
        except (ModelFileError, ContainerError) as exc:  # verified bytes that still do not build a model
            self.drop_round(round_id, f"the model does not load ({exc})")
            return None
        train_set, eval_set = model_view(model, self.train_set), model_view(model, self.eval_set)
        trainable = trainable_names(model)
        base = {n: np.array(model.params[n].value, np.float32, copy=True) for n in trainable}
        trainer = Trainer(
            model,
            optimizer=make_sgd(task.lr, task.momentum),
            trainable=trainable,
            **feddyn.trainer_options(task, self.state.feddyn(), base),
            batch_size=min(task.batch_size, train_set.size()),
            seed=self.config.seed + round_id,
        )
        deadline = task.deadline
        stop_reason: list[str] = []

        def should_stop() -> bool:
            if time.time() > deadline:
                stop_reason.append("the round's deadline passed")
                return True
            verdict = self.probe.check()
            if not verdict.ok:
                stop_reason.append(verdict.reason)
            return not verdict.ok

        try:
            before = trainer.evaluate(eval_set)
            fit = trainer.fit(train_set, task.epochs, should_stop=should_stop)
            after = trainer.evaluate(eval_set)
        except Interrupted:
            log.warning(
                "round %d: stopped mid-training (%s); its work is discarded",
                round_id,
                stop_reason[-1] if stop_reason else "interrupted",
            )
            if time.time() > deadline:  # a round past its deadline is over; conditions may come back
                self.drop_round(round_id, "the deadline passed during training")
            return None
        finally:
            trainer.release()
        weights = trainer.get_weights()
        delta = {n: np.asarray(weights[n], np.float32) - base[n] for n in trainable}
        metrics = {
            "loss_before": before["loss"],
            "loss_after": after["loss"],
            "acc_before": before["accuracy"],
            "acc_after": after["accuracy"],
            "train_loss": fit["loss"],
            "steps": fit["steps"],
        }
        return delta, metrics

    def personalize(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """After an acknowledged upload: refresh the personal layers on that round's base model."""
        cached = self.state.cached_model()
        if record is not None and cached is not None and cached[0] == record["version"]:
            record.update(self.personal.update(cached[2], cached[0], self.train_set, self.holdout_set))
        return record

    def encode(
        self, delta: dict[str, np.ndarray], task: Task, metrics: dict[str, float]
    ) -> tuple[bytes, dict[str, np.ndarray] | None]:
        """Privacy and compression as the task asks: clip, noise, top-k (with error feedback), encode."""
        clip_norm, noise = task.clip_norm, task.noise_multiplier
        if clip_norm:
            delta, norm = clip_by_l2(delta, clip_norm)
            metrics["delta_norm"] = norm
        if noise > 0:
            std = noise * clip_norm if clip_norm else noise
            delta = add_gaussian_noise(delta, std, np.random.default_rng())  # fresh OS entropy: never seeded
        fraction, encoding = task.topk_fraction, task.encoding
        residual = None
        if fraction:
            delta, residual = TopK(float(fraction)).compress(delta, self.state.residual())
        body = encode_update(
            delta,
            sample_count=self.train_set.size(),
            round_id=task.round_id,
            base_version=task.base_version,
            metrics=metrics,
            encoding=encoding,
            topk_fraction=fraction,
        )
        if residual is not None:  # also feed back the quantization error of what was really sent
            sent = decode_update(body).delta
            residual = {n: residual[n] + delta[n] - sent[n] for n in residual}
        return body, residual

    # ------------------------------------------------------------------ the pending upload

    def send_pending(self) -> dict[str, Any] | None:
        """Upload the persisted update. Acknowledged: its record. Refused (4xx): None, round dropped.
        Unreachable: UnavailableError propagates and the update stays pending for the next try."""
        pending = self.state.pending()
        if pending is None:
            return None
        info, body = pending
        deadline = info.get("deadline")
        unknown = bool(info.get("attempted"))  # an earlier run may have sent it: only a replay tells
        if deadline is not None and time.time() > deadline and not unknown:
            log.warning("round %d: the deadline passed before the upload; dropping the round", info["round_id"])
            self.state.finish_pending(acknowledged=False)
            return None
        if not unknown:
            self.state.mark_pending_attempted()
        try:
            answer = self.client.upload(
                info["round_id"], body, info["idempotency_key"], deadline=deadline, outcome_unknown=unknown
            )
        except (RejectedError, DeadlinePassed) as exc:
            log.warning("round %d: upload refused (%s); dropping the round", info["round_id"], exc)
            self.state.finish_pending(acknowledged=False)
            return None
        self.state.finish_pending(acknowledged=True)
        log.info(
            "round %d: update accepted (%d of %d received)",
            info["round_id"],
            answer.received,
            answer.goal,
        )
        return dict(info["record"])

    def resume_pending(self) -> dict[str, Any] | None:
        if self.state.pending() is None:
            return None
        log.info("re-sending the update left pending by an earlier run")
        record = self.send_pending()
        if record is not None:
            record["resumed"] = True
        return self.personalize(record)

    def report(self, record: dict[str, Any]) -> dict[str, Any]:
        if record.get("kind", "train") != "train":  # --json stays one line per training round
            log.info("%s task for version %s done", record["kind"], record.get("version"))
            return record
        if self.config.json_lines:
            self.emit(json.dumps(record, sort_keys=True))
        log.info(
            "round %s done: acc %.3f -> %.3f, personal %s vs global %s, %d bytes sent (%d raw)",
            record.get("round"),
            record.get("acc_before", 0),
            record.get("acc_after", 0),
            record.get("personal_acc"),
            record.get("global_acc"),
            record.get("bytes_sent", 0),
            record.get("bytes_raw_float32", 0),
        )
        return record
