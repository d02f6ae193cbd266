"""`engine.nn`: modules over the static graph, PyTorch-style. LeNet in three lines:

    lenet = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                          nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    model = lenet.build((1, 28, 28))          # an engine.Model: weights "0.weight", "0.bias", ...

Freeze what personalization must not touch (`lenet.freeze("0", "3")`): frozen weights get no
gradient nodes and no optimizer state, because `Model.trainable` (what `Trainer` trains) follows them.
"""

from .attention import LayerNorm, MultiheadAttention
from .layers import (
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Conv1d,
    Conv2d,
    Dropout,
    Embedding,
    Flatten,
    Hardsigmoid,
    Hardswish,
    Linear,
    MaxPool2d,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Tanh,
    manual_seed,
)
from .module import Buffer, Module, Parameter, Sequential
from .recurrent import GRU, LSTM


def lenet(num_classes: int = 10) -> Sequential:
    """LeNet-5 as in the MegEngine article (first conv padded by 2, so 28x28 inputs work)."""
    return Sequential(
        Conv2d(1, 6, 5, padding=2),
        ReLU(),
        MaxPool2d(2),
        Conv2d(6, 16, 5),
        ReLU(),
        MaxPool2d(2),
        Flatten(),
        Linear(400, 120),
        ReLU(),
        Linear(120, 84),
        ReLU(),
        Linear(84, num_classes),
    )


__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm2d",
    "Buffer",
    "Conv1d",
    "Conv2d",
    "Dropout",
    "Embedding",
    "Flatten",
    "GELU",
    "GRU",
    "Hardsigmoid",
    "Hardswish",
    "LSTM",
    "LayerNorm",
    "Linear",
    "MaxPool2d",
    "Module",
    "MultiheadAttention",
    "Parameter",
    "ReLU",
    "ReLU6",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "lenet",
    "manual_seed",
]
