"""ONNX import of common PyTorch export patterns: `x.view(x.size(0), -1)` shape chains, ceil-mode and
asymmetric pooling, asymmetric/SAME/explicit padding. Each imported model gives PyTorch's (or
onnxruntime's) outputs at two batch sizes and trains; what stays unsupported is a clear error."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import engine  # noqa: E402
from engine import grad, opr  # noqa: E402
from engine.loss import CrossEntropyLoss  # noqa: E402
from engine.onnx import OnnxError, import_onnx  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.serialize import modelfile  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

TOL = 1e-5
h = onnx.helper


class Net(torch.nn.Module):
    """A small CNN whose flatten is spelled as users spell it."""

    def __init__(self, flatten: str):
        super().__init__()
        self.flatten = flatten
        ceil = flatten == "ceil_mode"
        self.conv1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.pool1 = torch.nn.MaxPool2d(3, 2, ceil_mode=True) if ceil else torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(6, 16, 4 if ceil else 5)  # ceil: 28 -> 14 -> 11 -> 6 (floor would give 5)
        self.pool2 = torch.nn.MaxPool2d(2, ceil_mode=ceil)
        self.fc = torch.nn.Linear(16 * 6 * 6 if ceil else 400, 10)

    def forward(self, x):
        batch = x.size(0)  # taken from the network input, used on a later tensor
        x = self.pool2(torch.relu(self.conv2(self.pool1(torch.relu(self.conv1(x))))))
        if self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "reshape_shape0":
            x = x.reshape(x.shape[0], -1)
        elif self.flatten == "view_input_batch":
            x = x.view(batch, -1)
        elif self.flatten == "reshape_400":
            x = x.reshape(-1, 400)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


def export(module, path, in_shape=(1, 28, 28), opset=17, dtype=torch.float32):
    module.eval()
    example = torch.zeros(2, *in_shape, dtype=dtype)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def logits(model, x):
    return model.graph.compile(model.output, training=False).execute({model.input.name: x})


def images(n, seed=0, shape=(1, 28, 28)):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


FLATTENS = ["view", "reshape_shape0", "view_input_batch", "reshape_400", "ceil_mode"]


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("flatten", FLATTENS)
def test_pytorch_flatten_spellings_import_with_pytorchs_logits(tmp_path, flatten, opset):
    torch.manual_seed(0)
    net = Net(flatten).eval()
    path = export(net, tmp_path / "net.onnx", opset=opset)
    if flatten in ("view", "reshape_shape0", "view_input_batch"):  # the pattern this is about is really in the file
        assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= {n.op_type for n in onnx.load(path).graph.node}
    model = engine.load(path)
    assert model.input.shape == (None, 1, 28, 28)
    for n in (5, 2):  # the batch axis stays dynamic
        x = images(n, seed=n)
        expected = net(torch.from_numpy(x)).detach().numpy()
        assert np.abs(logits(model, x) - expected).max() <= TOL


@pytest.mark.parametrize("flatten", ["view", "ceil_mode"])
def test_loss_and_gradients_match_pytorch(tmp_path, flatten):
    torch.manual_seed(1)
    net = Net(flatten).eval()
    model = import_onnx(export(net, tmp_path / "net.onnx"))
    x, y = images(4, seed=3), np.array([0, 3, 7, 9])
    label = opr.host2device(model.graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    names = list(model.params)
    results = model.graph.compile([loss, *grad(loss, [model.params[n] for n in names])]).execute(x=x, label=y)
    expected = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    expected.backward()
    assert abs(float(results[0]) - expected.item()) <= TOL
    params = dict(net.named_parameters())
    for name, g in zip(names, results[1:], strict=True):
        np.testing.assert_allclose(g, params[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("flatten", ["view", "reshape_400", "ceil_mode"])
def test_imported_model_trains_and_survives_the_pocketfed_format(tmp_path, flatten):
    torch.manual_seed(2)
    model = engine.load(export(Net(flatten), tmp_path / "net.onnx"))
    x, y = images(16, seed=4), np.arange(16) % 10
    trainer = Trainer(model, optimizer=SGD(0.05, momentum=0.9), batch_size=16, seed=0)
    losses = [trainer.step(x, y)[0] for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0], losses
    again = modelfile.loads(modelfile.dumps(model))  # what devices receive
    assert np.abs(logits(again, x[:3]) - trainer.logits(x[:3])).max() <= TOL


class SamePadding(torch.nn.Module):
    """Conv2d(padding='same') with an even kernel pads asymmetrically: exported as Pad + Conv."""

    def __init__(self):
        super().__init__()
        self.pad = torch.nn.ZeroPad2d((1, 0, 2, 1))
        self.conv = torch.nn.Conv2d(2, 3, 4, padding="same")
        self.pool = torch.nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.fc = torch.nn.Linear(3 * 6 * 5, 4)  # (7, 8) -> pad (10, 9) -> same conv -> ceil pool (6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(self.pad(x))), 1))


@pytest.mark.parametrize("opset", [13, 17])
def test_pad_same_conv_and_ceil_mode_average_pool_match_pytorch(tmp_path, opset):
    torch.manual_seed(3)
    net = SamePadding().eval()
    model = engine.load(export(net, tmp_path / "same.onnx", in_shape=(2, 7, 8), opset=opset))
    for n in (3, 1):
        x = images(n, seed=n, shape=(2, 7, 8))
        assert np.abs(logits(model, x) - net(torch.from_numpy(x)).detach().numpy()).max() <= TOL
    trainer = Trainer(model, optimizer=SGD(0.1), batch_size=8)
    x, y = images(8, seed=5, shape=(2, 7, 8)), np.arange(8) % 4
    losses = [trainer.step(x, y)[0] for _ in range(5)]
    assert losses[-1] < losses[0]


def onnx_model(nodes, in_shape, out_rank, initializers=()):
    out_shape = [f"d{i}" for i in range(out_rank)]  # sizes left to the importer
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
        list(initializers),
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()


def ort_run(data, x):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


WEIGHT = onnx.numpy_helper.from_array(np.random.default_rng(7).standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
SPATIAL_CASES = {
    "conv-asymmetric-pads": (h.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1]), [WEIGHT]),
    "conv-same-upper": (h.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2]), [WEIGHT]),
    "conv-same-lower": (h.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 3]), [WEIGHT]),
    "conv-dilated-asymmetric": (h.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 1], pads=[3, 0, 1, 2]), [WEIGHT]),
    "maxpool-asymmetric": (h.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], pads=[1, 0, 0, 1]), []),
    "maxpool-ceil-stride3": (
        h.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[3, 3], ceil_mode=1),
        [],
    ),
    "avgpool-asymmetric-include": (
        h.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 0, 0, 2], count_include_pad=1),
        [],
    ),
    "avgpool-ceil-exclude": (
        h.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        [],
    ),
    "avgpool-ceil-include": (
        h.make_node(
            "AveragePool",
            ["x"],
            ["y"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            ceil_mode=1,
            count_include_pad=1,
        ),
        [],
    ),
}


@pytest.mark.parametrize("case", list(SPATIAL_CASES))
def test_padding_the_engine_lacks_matches_onnxruntime(case):
    node, inits = SPATIAL_CASES[case]
    data = onnx_model([node], ["N", 2, 9, 8], 4, inits)
    model = import_onnx(data)
    for n in (2, 3):
        x = images(n, seed=n, shape=(2, 9, 8))
        expected = ort_run(data, x)
        ours = logits(model, x)
        assert ours.shape == expected.shape and np.abs(ours - expected).max() <= TOL


def shape_chain(tail_nodes, tail_inits=(), out_rank=2):
    """x (N, 3, 4) -> Shape -> Gather(0) -> Unsqueeze -> ..., the start of every `x.size(0)` pattern."""
    ints = onnx.numpy_helper.from_array
    nodes = [
        h.make_node("Shape", ["x"], ["s"], name="shape"),
        h.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
        h.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
        *tail_nodes,
    ]
    inits = [ints(np.array(0, np.int64), "zero"), ints(np.array([0], np.int64), "axes0"), *tail_inits]
    return onnx_model(nodes, ["N", 3, 4], out_rank, inits)


def test_shape_slice_cast_concat_chain_reshapes_with_the_batch():
    ints = onnx.numpy_helper.from_array
    data = shape_chain(
        [
            h.make_node("Shape", ["x"], ["s2"]),
            h.make_node("Slice", ["s2", "one", "big"], ["tail"]),  # [3, 4]
            h.make_node("Identity", ["tail"], ["t"]),
            h.make_node("Cast", ["n1"], ["n1i"], to=onnx.TensorProto.INT64),
            h.make_node("Concat", ["n1i", "t"], ["target"], axis=0),  # [N, 3, 4]: a no-op reshape, then flatten
            h.make_node("Reshape", ["x", "target"], ["r"]),
            h.make_node("Concat", ["n1", "minus1"], ["flat"], axis=0),
            h.make_node("Reshape", ["r", "flat"], ["y"]),
        ],
        [
            ints(np.array([1], np.int64), "one"),
            ints(np.array([2**62], np.int64), "big"),
            ints(np.array([-1], np.int64), "minus1"),
        ],
    )
    model = import_onnx(data)
    assert model.output.shape == (None, 12)
    x = images(3, shape=(3, 4))
    np.testing.assert_array_equal(logits(model, x), ort_run(data, x))


def test_arithmetic_on_the_batch_size_is_a_clear_error():
    """Multiplying the batch (attention's batch * heads) is supported; adding to it is not."""
    ints = onnx.numpy_helper.from_array
    data = shape_chain(
        [
            h.make_node("Add", ["n1", "two"], ["n2"], name="grow_batch"),
            h.make_node("Concat", ["n2", "minus1"], ["target"], axis=0),
            h.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [ints(np.array([2], np.int64), "two"), ints(np.array([-1], np.int64), "minus1")],
    )
    with pytest.raises(OnnxError, match=r"'grow_batch' \(Add\): .*arithmetic on a size fed at run time"):
        import_onnx(data)


def test_a_batch_times_a_factor_reshapes_like_onnxruntime():
    ints = onnx.numpy_helper.from_array
    data = shape_chain(
        [
            h.make_node("Mul", ["n1", "two"], ["n2"], name="double_batch"),
            h.make_node("Concat", ["n2", "six"], ["target"], axis=0),
            h.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [ints(np.array([2], np.int64), "two"), ints(np.array([6], np.int64), "six")],
    )
    x = np.random.default_rng(1).standard_normal((5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(logits(import_onnx(data), x), ort_run(data, x))


def test_a_batch_size_used_as_data_is_a_clear_error():
    data = shape_chain(
        [
            h.make_node("Cast", ["n1"], ["n1f"], to=onnx.TensorProto.FLOAT, name="batch_as_float"),
            h.make_node("Add", ["x", "n1f"], ["y"]),
        ],
        out_rank=3,
    )
    with pytest.raises(OnnxError, match=r"'batch_as_float' \(Cast\): .*fed at run time"):
        import_onnx(data)


def test_reflect_pad_names_op_and_node():
    pads = onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    with pytest.raises(OnnxError, match=r"'mirror' \(Pad\): .*mode='reflect'"):
        import_onnx(
            onnx_model(
                [h.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="mirror")], ["N", 2, 5, 5], 4, [pads]
            )
        )


def test_embedding_gather_imports_and_matches_pytorch(tmp_path):
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Embedding(9, 3), torch.nn.Flatten(), torch.nn.Linear(15, 2))
    model = engine.load(export(net, tmp_path / "emb.onnx", in_shape=(5,), dtype=torch.int64))
    tokens = np.random.default_rng(0).integers(0, 9, (4, 5))
    np.testing.assert_allclose(logits(model, tokens), net(torch.from_numpy(tokens)).detach().numpy(), atol=TOL)
