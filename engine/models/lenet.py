"""LeNet built from raw operators, line for line as the MegEngine article builds it.

conv(5x5, 6) -> relu -> maxpool -> conv(5x5, 16) -> relu -> maxpool -> flatten ->
fc 400->120 -> relu -> fc 120->84 -> relu -> fc 84->10. The first convolution pads by 2,
which is what MegEngine's example achieves by padding 28x28 images to 32x32.
"""

from __future__ import annotations

import numpy as np

from .. import opr
from ..graph import ComputingGraph
from ..model import Model


def _uniform(rng: np.random.Generator, shape: tuple, fan_in: int) -> np.ndarray:
    """PyTorch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def lenet_weights(seed: int = 0, num_classes: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1": ((6, 1, 5, 5), 25),
        "conv2": ((16, 6, 5, 5), 150),
        "fc1": ((400, 120), 400),
        "fc2": ((120, 84), 120),
        "fc3": ((84, num_classes), 84),
    }
    weights = {}
    for name, (shape, fan_in) in shapes.items():
        weights[f"{name}.weight"] = _uniform(rng, shape, fan_in)
        bias_shape = (shape[0], 1, 1) if name.startswith("conv") else (shape[1],)
        weights[f"{name}.bias"] = _uniform(rng, bias_shape, fan_in)
    return weights


def build_lenet(seed: int = 0, num_classes: int = 10, in_shape: tuple = (1, 28, 28)) -> Model:
    graph = ComputingGraph()
    w = {name: opr.shared(graph, value, name) for name, value in lenet_weights(seed, num_classes).items()}
    x = opr.host2device(graph, (None, *in_shape), "float32", name="x")  # Host2DeviceCopy
    h = opr.relu(opr.convolution(x, w["conv1.weight"], padding=2) + w["conv1.bias"])
    h = opr.pooling(h, "max", window=2)
    h = opr.relu(opr.convolution(h, w["conv2.weight"]) + w["conv2.bias"])
    h = opr.pooling(h, "max", window=2).flatten()  # (N, 400)
    h = opr.relu(opr.matrix_mul(h, w["fc1.weight"]) + w["fc1.bias"])
    h = opr.relu(opr.matrix_mul(h, w["fc2.weight"]) + w["fc2.bias"])
    logits = opr.matrix_mul(h, w["fc3.weight"]) + w["fc3.bias"]
    return Model(
        graph,
        inputs={"x": x},
        outputs={"logits": logits},
        params=w,
        metadata={"architecture": "lenet", "num_classes": num_classes},
    )
