"""ONNX in and out: a PyTorch LeNet imports with PyTorch's logits, loss and gradients; fine-tuned in
pocketfed it exports back and onnxruntime reproduces pocketfed's logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import engine  # noqa: E402
from engine import grad, nn, opr  # noqa: E402
from engine.cli import eval_main, train_main  # noqa: E402
from engine.data import Subset, load_default  # noqa: E402
from engine.loss import CrossEntropyLoss  # noqa: E402
from engine.onnx import OnnxError, export_onnx, import_onnx  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

TOL = 1e-5


class TorchLeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = torch.nn.Linear(400, 120), torch.nn.Linear(120, 84)
        self.fc3 = torch.nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def export_torch(module, path, in_shape=(1, 28, 28), opset=17, fold=True):
    module.eval()
    torch.onnx.export(
        module,
        (torch.zeros(2, *in_shape),),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["x"],
        output_names=["logits"],
        do_constant_folding=fold,
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def logits(model, x):
    return model.graph.compile(model.output, training=False).execute({model.input.name: x})


def ort_logits(path_or_bytes, x):
    session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def torch_lenet():
    torch.manual_seed(0)
    return TorchLeNet().eval()


@pytest.fixture(scope="module")
def lenet_onnx(torch_lenet, tmp_path_factory):
    return export_torch(torch_lenet, tmp_path_factory.mktemp("onnx") / "lenet.onnx")


@pytest.fixture(scope="module")
def batch():
    x, y = load_default("test").get_batch(np.arange(16))
    return np.asarray(x, np.float32), np.asarray(y, np.int64)


@pytest.mark.parametrize("opset", [13, 17])
def test_imported_lenet_gives_pytorchs_logits(torch_lenet, tmp_path, batch, opset):
    model = engine.load(export_torch(torch_lenet, tmp_path / "m.onnx", opset=opset))
    assert list(model.params) == [
        f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for kind in ("weight", "bias")
    ]
    assert model.input.shape == (None, 1, 28, 28) and model.metadata["onnx_opset"] == opset
    for x in (batch[0], batch[0][:3]):  # the batch axis stays dynamic
        expected = torch_lenet(torch.from_numpy(x)).detach().numpy()
        assert np.abs(logits(model, x) - expected).max() <= TOL


def test_imported_lenet_gives_pytorchs_loss_and_gradients(torch_lenet, lenet_onnx, batch):
    x, y = batch
    model = import_onnx(lenet_onnx)
    label = opr.host2device(model.graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    names = list(model.params)
    results = model.graph.compile([loss, *grad(loss, [model.params[n] for n in names])]).execute(x=x, label=y)
    torch_lenet.zero_grad()
    expected_loss = torch.nn.functional.cross_entropy(torch_lenet(torch.from_numpy(x)), torch.from_numpy(y))
    expected_loss.backward()
    assert abs(float(results[0]) - expected_loss.item()) <= TOL
    params = dict(torch_lenet.named_parameters())
    for name, g in zip(names, results[1:], strict=True):
        np.testing.assert_allclose(g, params[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_fine_tuned_model_exports_and_onnxruntime_agrees(lenet_onnx, tmp_path, batch):
    model = engine.load(lenet_onnx)
    before = model.state_dict()
    trainer = Trainer(model, optimizer=SGD(0.05, momentum=0.9), batch_size=32, seed=0)
    result = trainer.fit(Subset(load_default("train"), np.arange(256)), epochs=1)
    assert result["steps"] == 8
    assert not np.array_equal(before["fc3.weight"], model.params["fc3.weight"].value)
    export_onnx(model, tmp_path / "tuned.onnx")
    x = batch[0]
    ours = trainer.logits(x)
    assert np.abs(ort_logits(str(tmp_path / "tuned.onnx"), x) - ours).max() <= TOL
    again = engine.load(tmp_path / "tuned.onnx")  # and it comes back in with the same names and values
    assert list(again.params) == list(model.params)
    assert np.abs(logits(again, x) - ours).max() <= TOL


@pytest.mark.parametrize("fresh_stats", [True, False], ids=["aliased-initializers", "trained-stats"])
def test_batchnorm_dropout_avgpool_model_round_trips(tmp_path, fresh_stats):
    torch.manual_seed(1)
    tm = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(4 * 4 * 4, 5),
        torch.nn.Softmax(dim=1),
    )
    if not fresh_stats:
        with torch.no_grad():
            tm[1].running_mean.uniform_(-0.5, 0.5)
            tm[1].running_var.uniform_(0.5, 2.0)
    # without constant folding PyTorch keeps BatchNormalization instead of fusing it into the conv
    model = engine.load(export_torch(tm, tmp_path / "bn.onnx", in_shape=(3, 8, 8), fold=False))
    assert {"1.running_mean", "1.running_var"} <= set(model.params) - set(model.trainable)
    assert "1.weight" in model.trainable
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    assert np.abs(logits(model, x) - tm(torch.from_numpy(x)).detach().numpy()).max() <= TOL
    # training mode: batch statistics and dropout, and the running statistics move like PyTorch's
    trainer = Trainer(model, batch_size=6)
    trainer.step(x, np.arange(6) % 5)
    tm.train()
    tm(torch.from_numpy(x))
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(model.params[f"1.{name}"].value, getattr(tm[1], name).numpy(), atol=1e-6)
    assert not np.array_equal(model.params["1.weight"].value, model.params["1.running_var"].value)
    data = export_onnx(model)
    assert np.abs(ort_logits(data, x) - logits(model, x)).max() <= TOL


def test_engine_nn_model_with_embedding_exports(tmp_path):
    net = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3), nn.Tanh())
    model = net.build((3,), dtype="int64", input_name="tokens")
    tokens = np.array([[0, 6, 2], [5, 5, 1]], np.int64)
    expected = model.graph.compile(model.output, training=False).execute(tokens=tokens)
    assert np.abs(ort_logits(export_onnx(model), tokens) - expected).max() <= TOL


def test_unsupported_operator_names_op_and_node(tmp_path):
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Elu", ["x"], ["y"], name="my_elu")],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "elu.onnx")
    with pytest.raises(OnnxError, match=r"'my_elu' \(Elu\): unsupported ONNX operator 'Elu'"):
        engine.load(tmp_path / "elu.onnx")


def test_garbage_onnx_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(OnnxError, match="not a valid ONNX model"):
        engine.load(tmp_path / "bad.onnx")


def test_export_of_an_operator_without_onnx_form_is_a_clear_error():
    from engine import ComputingGraph, Model

    g = ComputingGraph()
    x = opr.host2device(g, (None, 4), name="x")
    y = opr.one_hot(opr.argmax(x), 4)
    with pytest.raises(OnnxError, match="cannot export operator OneHot"):
        export_onnx(Model(g, {"x": x}, {"y": y}, {}))


def test_cli_trains_an_onnx_model_and_evaluates_it(lenet_onnx, tmp_path, capsys):
    x, y = load_default("train").get_batch(np.arange(128))
    np.savez(tmp_path / "data.npz", x=np.asarray(x, np.float32), y=np.asarray(y))
    data = str(tmp_path / "data.npz")
    out_onnx, out_pf = str(tmp_path / "tuned.onnx"), str(tmp_path / "tuned.pfm")
    assert (
        train_main(
            [
                "--model",
                str(lenet_onnx),
                "--data",
                data,
                "--save",
                out_onnx,
                "--batch-size",
                "32",
                "--train-only",
                "fc",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["saved"] == out_onnx and summary["epochs"] == 1
    tuned = engine.load(out_onnx)
    original = engine.load(lenet_onnx)
    np.testing.assert_array_equal(tuned.params["conv1.weight"].value, original.params["conv1.weight"].value)
    assert not np.array_equal(tuned.params["fc3.weight"].value, original.params["fc3.weight"].value)
    assert train_main(["--model", out_onnx, "--data", data, "--save", out_pf, "--json", "--quiet"]) == 0
    capsys.readouterr()
    assert eval_main(["--model", out_pf, "--data", data, "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip())
    assert set(scored) == {"accuracy", "n"} and scored["n"] == 128 and 0 <= scored["accuracy"] <= 1
