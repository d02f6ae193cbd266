"""Train many simulated devices' LeNets at once, as one graph with a device axis (`pf-sim --stacked`).

D devices that start a round from the same global model are one "stacked" LeNet: the devices'
images sit on the channel axis, both convolutions are grouped (groups=D, so device d only sees its
own channels and filters), and the dense layers are batched matrix products over the device axis.
Each step feeds every device's next batch (the order its own `Trainer.fit` would draw), and the loss
is the mean cross-entropy over all D*B samples; the learning rate is scaled by D, so each device's
weights move by exactly what its own SGD step would have done (the other devices' terms have zero
gradient in its weights). One graph, compiled once per group size and reused every round, so no
model file is parsed per device and the Python overhead of a step is paid once for D devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine import opr
from engine.graph import ComputingGraph
from engine.model import Model
from engine.optimizer import SGD
from engine.trainer import Trainer

Weights = dict[str, np.ndarray]
CONVS = ("conv1", "conv2")
DENSE = ("fc1", "fc2", "fc3")
RESTRICT = "fedrs.scale"  # the stacked graph's per-device logit scales


def stack_weights(base: Mapping[str, np.ndarray], devices: int) -> Weights:
    """The global LeNet's weights repeated for D devices in the stacked layout."""
    return stack_each([base] * devices)


def stack_each(per_device: Sequence[Mapping[str, np.ndarray]]) -> Weights:
    """Each device's own LeNet-shaped tensors, in the stacked layout."""
    stacked = {}
    for layer in CONVS:
        for part in ("weight", "bias"):
            name = f"{layer}.{part}"
            stacked[name] = np.concatenate([np.asarray(w[name], np.float32) for w in per_device], axis=0)
    for layer in DENSE:
        stacked[f"{layer}.weight"] = np.stack([np.asarray(w[f"{layer}.weight"], np.float32) for w in per_device])
        stacked[f"{layer}.bias"] = np.stack([np.asarray(w[f"{layer}.bias"], np.float32)[None] for w in per_device])
    return stacked


def unstack_weights(stacked: Mapping[str, np.ndarray], devices: int) -> list[Weights]:
    """Per-device weights (LeNet names and shapes) from the stacked layout."""
    out: list[Weights] = [{} for _ in range(devices)]
    for layer in CONVS:
        for part in ("weight", "bias"):
            name = f"{layer}.{part}"
            for d, piece in enumerate(np.split(stacked[name], devices, axis=0)):
                out[d][name] = piece
    for layer in DENSE:
        for d in range(devices):
            out[d][f"{layer}.weight"] = stacked[f"{layer}.weight"][d]
            out[d][f"{layer}.bias"] = stacked[f"{layer}.bias"][d, 0]
    return out


def build_stacked_lenet(base: Mapping[str, np.ndarray], devices: int, image: tuple[int, int] = (28, 28)) -> Model:
    """LeNet (engine/models/lenet.py) for D devices at once; input x is (batch, D, H, W)."""
    graph = ComputingGraph()
    w = {name: opr.shared(graph, value, name) for name, value in stack_weights(base, devices).items()}
    x = opr.host2device(graph, (None, devices, *image), "float32", name="x")
    # the generic grouped kernel (im2col + one batched product), not convolution()'s depthwise one:
    # with 6 filters per group it is several times faster
    conv1 = opr.Convolution.make(x, w["conv1.weight"], padding=2, groups=devices)
    h = opr.relu(conv1 + w["conv1.bias"])
    h = opr.pooling(h, "max", window=2)
    h = opr.relu(opr.convolution(h, w["conv2.weight"], groups=devices) + w["conv2.bias"])
    h = opr.pooling(h, "max", window=2)  # (B, D*16, 5, 5): device d's 16 channels in a row
    h = opr.transpose(opr.reshape(h, (-1, devices, 400)), (1, 0, 2))  # (D, B, 400)
    for layer in ("fc1", "fc2"):
        h = opr.relu(opr.BatchedMatrixMul.make(h, w[f"{layer}.weight"]) + w[f"{layer}.bias"])
    logits = opr.BatchedMatrixMul.make(h, w["fc3.weight"]) + w["fc3.bias"]  # (D, B, 10)
    # FedRS's restricted softmax: each device's logits of the classes it lacks scaled down (ones: off)
    scale = opr.shared(graph, np.ones((devices, 1, 10), np.float32), RESTRICT, trainable=False)
    logits = logits * scale
    return Model(graph, inputs={"x": x}, outputs={"logits": opr.reshape(logits, (-1, 10))}, params=w)


def restriction(labels: np.ndarray, alpha: float | None) -> np.ndarray:
    """(D, 1, 10) logit scales: 1 for the classes a device holds, `alpha` for the others (Li & Zhan
    2021, "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data"):
    a device with two classes then stops pushing the other eight classes' logits down."""
    scale = np.ones((len(labels), 1, 10), np.float32)
    if alpha is not None:
        for d, y in enumerate(labels):
            scale[d, 0, np.setdiff1d(np.arange(10), np.asarray(y))] = alpha
    return scale


class StackedTrainer:
    """Local SGD for groups of D devices in one graph; graphs are cached by D and reused."""

    def __init__(self, lr: float, momentum: float, batch_size: int):
        self.lr, self.momentum, self.batch_size = float(lr), float(momentum), int(batch_size)
        self._trainers: dict[int, Trainer] = {}

    def _trainer(self, base: Mapping[str, np.ndarray], devices: int) -> Trainer:
        trainer = self._trainers.get(devices)
        if trainer is None:
            model = build_stacked_lenet(base, devices)
            optimizer = SGD(lr=self.lr * devices, momentum=self.momentum)
            trainer = Trainer(model, optimizer=optimizer, batch_size=self.batch_size)
            self._trainers[devices] = trainer
        else:
            trainer.set_weights(stack_weights(base, devices))
        for state in getattr(trainer.optimizer, "state", {}).values():
            state.value[...] = 0  # every round starts a fresh optimizer, as an agent's Trainer does
        return trainer

    def train(
        self,
        base: Mapping[str, np.ndarray],
        data: Sequence[tuple[np.ndarray, np.ndarray]],
        seeds: Sequence[int],
        epochs: int,
        feddyn: tuple[float, Sequence[Mapping[str, np.ndarray]]] | None = None,
        lr: float | None = None,
        restrict: float | None = None,
    ) -> list[Weights]:
        """Per-device deltas (trained - base) after `epochs` over each device's (x (n, 1, H, W), y (n,)).

        Every device must hold the same number of samples; `seeds[d]` is the data-order seed its own
        `Trainer.fit` would use (one permutation per epoch from one generator). `feddyn` = (alpha,
        each device's state g_d) adds FedDyn's local terms (coordinator/strategies/feddyn.py): every
        step also moves the weights by -lr * (alpha * (w - base) - g_d), taken at the step's start.
        `lr` overrides the trainer's learning rate for this call (a round's scheduled lr); `restrict`
        = FedRS's alpha scales each device's logits of the classes it does not hold (`restriction`)."""
        sizes = {len(y) for _, y in data}
        if len(sizes) != 1:
            raise ValueError(f"stacked training needs equal-sized devices, got sizes {sorted(sizes)}")
        n, devices = sizes.pop(), len(data)
        batch = min(self.batch_size, n)
        trainer = self._trainer(base, devices)
        lr = self.lr if lr is None else float(lr)
        trainer.optimizer.set_lr(lr * devices)
        rngs = [np.random.default_rng(seed) for seed in seeds]
        images = np.stack([x.reshape(n, *x.shape[-2:]) for x, _ in data], axis=1)  # (n, D, H, W)
        labels = np.stack([np.asarray(y, np.int64) for _, y in data])  # (D, n)
        trainer.model.graph[RESTRICT].value[...] = restriction(labels, restrict)
        rows = np.arange(devices)[:, None]
        params = {name: var.value for name, var in trainer.model.params.items()}
        if feddyn is not None:
            alpha, anchor, state = feddyn[0], stack_weights(base, devices), stack_each(feddyn[1])
        for _ in range(epochs):
            orders = np.stack([rng.permutation(n) for rng in rngs])  # (D, n)
            for start in range(0, n, batch):
                idx = orders[:, start : start + batch]  # (D, b)
                x = images[idx.T, rows.T]  # (b, D, H, W)
                feed = {"x": np.ascontiguousarray(x), "label": labels[rows, idx].reshape(-1)}
                if feddyn is not None:
                    pull = {k: lr * (alpha * (w - anchor[k]) - state[k]) for k, w in params.items()}
                loss = float(trainer.train_fn.execute(feed)[0])  # step() wants len(x) == len(label)
                if feddyn is not None:
                    for k, w in params.items():
                        w -= pull[k]
                if not np.isfinite(loss):
                    raise FloatingPointError(f"stacked training diverged: loss {loss}")
        trained = unstack_weights(trainer.get_weights(), devices)
        return [{k: np.asarray(t[k], np.float32) - np.asarray(base[k], np.float32) for k in t} for t in trained]
