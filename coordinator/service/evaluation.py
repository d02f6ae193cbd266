"""Server-side evaluation of each new model version on a held-out set, off the request path.

A single worker thread evaluates versions in order and stores accuracy/loss for the dashboard
and /metrics. `evaluate_model_bytes` from the engine is called here and nowhere else.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("pocketfed.coordinator")

EvaluateFn = Callable[[bytes], dict]  # model bytes -> {"accuracy", "loss", "n"}


def engine_evaluator(eval_data: str) -> EvaluateFn:
    """Evaluate with the engine on the dataset at `eval_data` (loaded once, lazily)."""
    dataset = None

    def evaluate(model_bytes: bytes) -> dict:
        nonlocal dataset
        from engine.data import open_dataset
        from engine.trainer import evaluate_model_bytes

        if dataset is None:  # an IDX directory's test split; other formats have no splits
            dataset = open_dataset(eval_data, split="test")
        return evaluate_model_bytes(model_bytes, dataset, preprocessing="model")  # what the model records

    return evaluate


class Evaluator:
    def __init__(
        self,
        evaluate: EvaluateFn,
        store: Callable[[int, dict], None],
        failed: Callable[[int, str], None] | None = None,
    ):
        self._evaluate, self._store = evaluate, store
        self._failed = failed or (lambda version, why: None)  # the release gate holds such a candidate back
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self._taken: set[int] = set()  # versions queued once (a failure is not retried every tick)
        self._thread = threading.Thread(target=self._run, name="pf-evaluator", daemon=True)
        self._thread.start()

    def submit(self, version: int, model_bytes: bytes) -> None:
        if version not in self._taken:
            self._taken.add(version)
            self._queue.put((version, model_bytes))

    def catch_up(self, versions: list[int], load: Callable[[int], bytes]) -> None:
        """Queue the versions not yet evaluated (by any replica) that this one has not taken yet."""
        for version in versions:
            if version not in self._taken:
                self.submit(version, load(version))

    def wait_idle(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                version, data = item
                try:
                    result = self._evaluate(data)
                except Exception as exc:  # an evaluation failure must not stop the service
                    log.warning("evaluation of model v%d failed: %s", version, exc)
                    try:
                        self._failed(version, str(exc) or type(exc).__name__)
                    except Exception as inner:  # e.g. the store closed at shutdown
                        log.warning("holding back model v%d failed: %s", version, inner)
                    continue
                try:
                    self._store(version, result)
                except Exception as exc:  # e.g. the store closed at shutdown: startup evaluates it again
                    log.warning("evaluation of model v%d could not be stored: %s", version, exc)
                    continue
                log.info(
                    "model v%d evaluated: accuracy=%.4f loss=%.4f n=%d",
                    version,
                    result["accuracy"],
                    result["loss"],
                    result["n"],
                )
            finally:
                self._queue.task_done()
