"""The personal model: the latest global model with a few layers fine-tuned on this
device's data and never uploaded (FedPer-style personalization, Arivazhagan et al. 2019).

On label-skewed data the global model must serve every device; a personal classifier
head learns that this user mostly sees, say, sneakers and bags. The agent holds out part
of its local data and reports both models' accuracy on it, so the gain is measured, not
assumed. The personal layers live in the state directory as a container of kind
"personal"; nothing in this module talks to the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from device_agent.state import AgentState
from engine.data import IDataView, Subset, split_holdout

log = logging.getLogger("pocketfed.agent.personal")


def trainable_names(model: Any) -> list[str]:
    """The parameters a delta covers: the model file's "trainable" list, in its order."""
    return list(model.metadata.get("trainable") or model.trainable)


def personal_names(trainable: Sequence[str], layers: Sequence[str] | None = None) -> list[str]:
    """Parameter names of the personal layers. Default: the last layer (the classifier head),
    i.e. every parameter sharing the prefix of the last trainable one ("fc3.weight" -> "fc3")."""
    if not trainable:
        raise ValueError("the model has no trainable parameters to personalize")
    if not layers:
        layers = [trainable[-1].rsplit(".", 1)[0]]
    chosen = [n for n in trainable if any(n == layer or n.startswith(layer + ".") for layer in layers)]
    if not chosen:
        raise ValueError(f"personal layers {list(layers)} match no parameter; the model has {list(trainable)}")
    return chosen


def split_local(dataset: IDataView, holdout: float, seed: int) -> tuple[IDataView, IDataView | None]:
    """(train, held-out) views of the local data; held-out is None when holdout == 0."""
    train_idx, hold_idx = split_holdout(np.arange(dataset.size()), holdout, seed)
    return Subset(dataset, train_idx), (Subset(dataset, hold_idx) if len(hold_idx) else None)


class PersonalModel:
    """Fine-tunes the personal layers of each new base model and keeps them in the state dir."""

    def __init__(
        self,
        state: AgentState,
        layers: Sequence[str] | None = None,
        epochs: int = 1,
        lr: float = 0.05,
        batch_size: int = 32,
        seed: int = 0,
    ):
        self.state, self.layers = state, list(layers or [])
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed

    def stored_weights(self, names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Personal tensors from disk that still fit the model (a changed architecture starts over)."""
        found = self.state.personal()
        if not found:
            return {}
        tensors, _ = found
        return {n: tensors[n] for n in names if n in tensors and tensors[n].shape == shapes[n]}

    def base_version(self) -> int | None:
        """The base version the stored personal layers were fine-tuned on (None: none yet)."""
        found = self.state.personal()
        version = found[1].get("base_version") if found else None
        return None if version is None else int(version)

    def _trainer(self, model: Any, train_size: int, base_version: int) -> tuple[Any, list[str]]:
        from device_agent.models import make_sgd
        from engine.trainer import Trainer

        names = personal_names(trainable_names(model), self.layers)
        trainer = Trainer(
            model,
            optimizer=make_sgd(self.lr, 0.9),
            trainable=names,
            batch_size=max(1, min(self.batch_size, train_size)),
            seed=self.seed + base_version,
        )
        return trainer, names

    def update(
        self,
        model_bytes: bytes,
        base_version: int,
        train: IDataView,
        holdout: IDataView | None,
        epochs: int | None = None,
    ) -> dict[str, Any]:
        """Fine-tune the personal layers on top of `model_bytes` (`epochs` passes, default ours); return
        accuracies on the held-out data."""
        return self._run(model_bytes, base_version, train, holdout, epochs=epochs or self.epochs)

    def measure(self, model_bytes: bytes, base_version: int, holdout: IDataView) -> dict[str, Any]:
        """Accuracy of `model_bytes` as served and with the stored personal layers on it, training nothing."""
        return self._run(model_bytes, base_version, holdout, holdout, epochs=0)

    def _run(
        self, model_bytes: bytes, base_version: int, train: IDataView, holdout: IDataView | None, *, epochs: int
    ) -> dict[str, Any]:
        from device_agent.models import model_view
        from engine import load_model_bytes  # imported late: the CLI's --help should not load the engine

        model = load_model_bytes(model_bytes)
        train, holdout = model_view(model, train), None if holdout is None else model_view(model, holdout)
        trainer, names = self._trainer(model, train.size(), base_version)
        try:
            global_eval = trainer.evaluate(holdout) if holdout is not None else None
            shapes = {n: tuple(model.params[n].value.shape) for n in names}
            previous = self.stored_weights(names, shapes)
            if previous:
                trainer.set_weights(previous)
            if epochs:
                trainer.fit(train, epochs)
                weights = trainer.get_weights()
                mine = {n: np.asarray(weights[n], np.float32) for n in names}
                self.state.save_personal(mine, {"base_version": int(base_version), "layers": names})
            personal_eval = trainer.evaluate(holdout) if holdout is not None else None
        finally:
            trainer.release()  # the personal model is done; its planned memory is not kept between rounds
        return {
            "personal_layers": names,
            "global_acc": None if global_eval is None else float(global_eval["accuracy"]),
            "personal_acc": None if personal_eval is None else float(personal_eval["accuracy"]),
            "global_loss": None if global_eval is None else float(global_eval["loss"]),
            "personal_loss": None if personal_eval is None else float(personal_eval["loss"]),
        }


def load_personal_model(state: AgentState) -> Any:
    """The personal model for inference: the cached base with the stored personal layers swapped in."""
    from engine import load_model_bytes

    cached = state.cached_model()
    if cached is None:
        raise FileNotFoundError(f"{state.dir}: no cached model; run `pf-agent run` first")
    model = load_model_bytes(cached[2])
    found = state.personal()
    if found is None:
        log.warning("no personal layers yet; predicting with the global model")
        return model
    fitting = {n: v for n, v in found[0].items() if n in model.params and model.params[n].value.shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return model
