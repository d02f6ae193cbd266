"""Models for the ONNX training-step tests: LeNet, an MLP, and models that between them use every
operator the step lowers, all on the embedded Fashion-MNIST; plus the harness that runs one step
file in onnxruntime the way a device does (feeding each step's new weights and state back)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from engine import ComputingGraph, Model, nn, opr
from engine.data import load_default
from engine.loss import CrossEntropyLoss, ILoss, MSELoss

BATCH = 32


def batches(steps: int = 20, batch: int = BATCH, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive real batches of the embedded Fashion-MNIST training set."""
    data = load_default("train")
    for k in range(steps):
        yield data.get_batch(np.arange(start + k * batch, start + (k + 1) * batch))


def mlp(seed: int = 0) -> Model:
    nn.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).build((1, 28, 28))


def conv_net(seed: int = 0) -> Model:
    """engine.nn layers in training mode: batch norm (running statistics), dropout, average pooling."""
    nn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # a bias before batch norm has no gradient but noise
        nn.BatchNorm2d(4),
        nn.Tanh(),  # not ReLU: batch norm centres values on its kink, where float noise flips gradients
        nn.AvgPool2d(2),
        nn.Conv2d(4, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.25, seed=7),
        nn.Linear(8 * 6 * 6, 10),
    ).build((1, 28, 28))


def _weight_maker(graph: ComputingGraph, seed: int):
    """weight(name, *shape, scale=0.3): a trainable tensor of seeded normal values."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.3) -> object:
        return opr.shared(graph, (rng.standard_normal(shape) * scale).astype(np.float32), name)

    return weight


def kitchen_sink(seed: int = 0) -> Model:
    """Raw operators the other models leave out: strided/grouped/dilated convolutions, overlapping and
    padded pooling in all modes, max reduction, concat and slices, leaky relu (maximum), masks
    (greater, astype), sqrt/abs/pow/log/exp/sigmoid, a transposed weight, softmax."""
    graph = ComputingGraph()
    weight = _weight_maker(graph, seed)
    x = opr.host2device(graph, (None, 1, 28, 28), name="x")
    h = opr.convolution(x, weight("c1.w", 8, 1, 3, 3), stride=2, padding=1)  # (N, 8, 14, 14)
    h = opr.batch_norm(h, weight("bn.w", 8), weight("bn.b", 8), *_stats(graph, 8))
    h = opr.pooling(opr.tanh(h), "average_count_exclude_padding", window=3, stride=2, padding=1)  # 7x7
    h = opr.sigmoid(opr.convolution(h, weight("c2.w", 8, 4, 3, 3, scale=0.1), padding=2, dilation=2, groups=2))
    wide = opr.pooling(h, "average", window=2)  # 7 -> 3: the last row and column get no gradient
    h = opr.pooling(h, "max", window=3, stride=2, padding=1)  # overlapping windows: (N, 8, 4, 4)
    features = opr.concat([h.flatten(), opr.max(h, axis=(2, 3)), wide.flatten()], axis=1)  # 128 + 8 + 72
    h = opr.matrix_mul(features, weight("fc.w", 208, 32, scale=0.1)) + weight("fc.b", 32)
    h = opr.maximum(h, h * 0.1) * opr.astype(opr.Greater.make(h, -2.0), "float32")
    h = h + opr.concat([opr.Slice.make(h, axis=1, start=16, stop=32), opr.Slice.make(h, axis=1, start=0, stop=16)], 1)
    h = opr.pow(opr.sqrt(opr.abs(h) + 1.0), 2.0) + opr.log(opr.exp(h * 0.5) + 1.0)
    logits = opr.matrix_mul(h, opr.transpose(weight("out.w", 10, 32, scale=0.1)))
    logits = logits + opr.softmax(logits, axis=1) * weight("out.gain", 10)
    params = {n: v for n, v in graph.shared.items()}
    return Model(graph, {"x": x}, {"logits": logits}, params)


def _stats(graph: ComputingGraph, channels: int) -> tuple:
    return (
        opr.shared(graph, np.zeros(channels, np.float32), "bn.running_mean", trainable=False),
        opr.shared(graph, np.ones(channels, np.float32), "bn.running_var", trainable=False),
    )


def embedding_bag(seed: int = 0) -> Model:
    """Tokens in, classes out: an embedding table, a mean over the tokens, a linear head."""
    nn.manual_seed(seed)
    graph = ComputingGraph()
    tokens = opr.host2device(graph, (None, TOKENS), "int64", name="tokens")
    table = opr.shared(graph, nn.Embedding(LEVELS, 16).weight.data * 0.1, "embed.weight")
    head = opr.shared(graph, nn.Linear(16, 10).weight.data, "head.weight")
    pooled = opr.mean(opr.embedding(table, tokens), axis=1)
    logits = opr.matrix_mul(pooled, head, transpose_b=True)
    return Model(graph, {"tokens": tokens}, {"logits": logits}, {"embed.weight": table, "head.weight": head})


LEVELS, TOKENS = 64, 49


def tokens(images: np.ndarray) -> np.ndarray:
    """Each 4x4 patch's mean brightness in 16 levels, offset by the patch row's parity: 49 tokens."""
    patches = images.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4))
    levels = np.clip(((patches + 0.45) * 5).astype(np.int64), 0, 15)  # normalized pixels lie in [-0.43, 2.83]
    return (levels + 16 * (np.arange(7)[None, :, None] % 4)).reshape(-1, TOKENS)


class KitchenLoss(ILoss):
    """Label-smoothed cross entropy plus a softmax cross-entropy weighted by "argmax was right"."""

    def __call__(self, pred, label):
        right = opr.astype(opr.equal(opr.argmax(pred, axis=1), label), "float32")
        picked = opr.mean(opr.softmax_cross_entropy(pred, label) * right)
        return CrossEntropyLoss(label_smooth=0.1)(pred, label) + picked * 0.5


class OneHotMSE(ILoss):
    """Squared error between the softmax and the one-hot label (integer labels in)."""

    def __call__(self, pred, label):
        return MSELoss()(opr.softmax(pred, axis=1), opr.one_hot(label, 10))


# ----- running a step file as a device does -----


class OnnxStep:
    def __init__(self, data: bytes, weights: dict[str, np.ndarray], lr: float) -> None:
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        proto = onnx.load_from_string(data)
        self.interface = json.loads({p.key: p.value for p in proto.metadata_props}["pocketfed.training_step"])
        self.inputs = {i.name: i for i in proto.graph.input}
        self.outputs = [o.name for o in proto.graph.output]
        self.tensors = {n: np.array(weights[n]) for n in self.inputs if n in weights}
        self.lr = np.asarray(lr, np.float32)
        self.masks = [(m, np.random.default_rng(m["seed"])) for m in self.interface["dropout_masks"]]
        for name, info in self.inputs.items():
            if name.startswith(("state/", "prox_anchor/")):
                dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
                base = name.split("/", 1)[1]
                self.tensors[name] = np.array(weights[base]) if name.startswith("prox_") else np.zeros(dims, np.float32)

    def step(self, feeds: dict[str, np.ndarray]) -> float:
        batch = len(next(iter(feeds.values())))
        for mask, rng in self.masks:  # the engine's DropoutMask draws: uniform >= p, per site and step
            dims = self.inputs[mask["name"]].type.tensor_type.shape.dim
            shape = [batch if d.dim_param == "N" else d.dim_value for d in dims]
            feeds = {**feeds, mask["name"]: (rng.random(shape, dtype=np.float32) >= mask["p"]).astype(np.float32)}
        results = dict(zip(self.outputs, self.session.run(None, {**feeds, **self.tensors, "lr": self.lr})))
        for name in self.tensors:
            new = results.get(f"new_{name}" if name.startswith("state/") else f"new/{name}")
            if new is not None:
                self.tensors[name] = new
        return float(results["loss"])


def modern_sink(seed: int = 0) -> Model:
    """The modern operators the model families leave out: nearest resizing, hard swish / sigmoid,
    SiLU, GELU, depthwise convolution, softmax over inner axes, one-sided clips, where / less /
    logical masks, layer norm."""
    graph = ComputingGraph()
    weight = _weight_maker(graph, seed)
    x = opr.host2device(graph, (None, 1, 28, 28), name="x")
    h = opr.convolution(x, weight("c1.w", 4, 1, 3, 3), stride=2, padding=1)  # (N, 4, 14, 14)
    h = opr.resize_nearest(h, (17, 17), coordinate="half_pixel", nearest="floor")
    h = opr.depthwise_convolution(opr.hard_swish(h), weight("dw.w", 8, 1, 3, 3), stride=2, padding=1)  # (N, 8, 9, 9)
    h = h + opr.softmax(h, axis=1) + opr.softmax(h, axis=2)  # softmax over channels, over rows
    h = opr.where(opr.less(h, 0.1), opr.gelu(h), opr.silu(h)) + opr.hard_sigmoid(h, 0.2, 0.4)
    inside = opr.LogicalAnd.make(opr.LessEqual.make(h, 1.5), opr.GreaterEqual.make(h, -1.5))
    h = opr.clip(h, high=1.0) + opr.clip(h, low=-0.5) * opr.astype(inside, "float32")
    h = opr.layer_norm(h.flatten(), weight("ln.w", 8 * 9 * 9), weight("ln.b", 8 * 9 * 9, scale=0.1))
    logits = opr.matrix_mul(h, weight("out.w", 8 * 9 * 9, 10, scale=0.05))
    return Model(graph, {"x": x}, {"logits": logits}, dict(graph.shared.items()))
