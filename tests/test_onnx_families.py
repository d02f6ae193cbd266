"""ONNX import of today's small model families, exported in the test by PyTorch with both of its
exporters (TorchScript `dynamo=False`, opset 13/14 and 17; `dynamo=True`, which writes opset 17
or, where it cannot convert down, 18): a vision transformer, a MobileNetV2-style CNN (depthwise
convolutions, ReLU6) and a GRU classifier over Fashion-MNIST rows (sequential MNIST, 28 steps of
28 features: no labelled text corpus installs without a network hub).

Each imports with onnxruntime's logits within 1e-4 and exports back to a file onnxruntime runs
with the same logits; briefly pretrained, each fine-tunes with `pf-train --model x.onnx` and the
exported result scores the same in onnxruntime as in pocketfed."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch_families import FAMILIES, export  # noqa: E402

from engine.cli import eval_main, train_main  # noqa: E402
from engine.data import NONE, NpzDataset, load_default  # noqa: E402
from engine.onnx import OnnxError, export_onnx, import_onnx  # noqa: E402
from engine.serialize.modelfile import dumps  # noqa: E402
from engine.serialize.modelfile import loads as load_model_bytes  # noqa: E402
from engine.trainer import evaluate_model  # noqa: E402

TOL = 1e-4
EXPORTS = {  # (exporter, opset); PyTorch's TorchScript exporter needs opset 14 for attention
    "vit": [("legacy", 14), ("legacy", 17), ("dynamo", 17)],
    "mobilenetv2": [("legacy", 13), ("legacy", 17), ("dynamo", 17)],
    "gru": [("legacy", 13), ("legacy", 17), ("dynamo", 17)],
}


@pytest.fixture(scope="module")
def pixels():
    train = load_default("train", normalize=False)
    test = load_default("test", normalize=False)
    return train.images[:1536], train.labels[:1536], test.images[:256], test.labels[:256]


def _inputs(family, images):
    return images[:, 0] if family == "gru" else images


@pytest.fixture(scope="module")
def pretrained(pixels):
    """One short PyTorch training run per family (2 epochs on 1,024 images), so fine-tuning
    starts from a model that has learned something, as a user's would."""
    x, y = torch.tensor(pixels[0][:1024]), torch.tensor(pixels[1][:1024])
    models, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only contend (and other tests share the cores)
    for family, (cls, _) in FAMILIES.items():
        torch.manual_seed(0)
        module = cls()
        opt = torch.optim.AdamW(module.parameters(), 3e-3)
        for _ in range(2):
            for start in range(0, 1024, 64):
                batch = slice(start, start + 64)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(module(_inputs(family, x[batch])), y[batch]).backward()
                opt.step()
        models[family] = module.eval()
    torch.set_num_threads(threads)
    return models


def _ort_logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ours(model, x):
    return model.graph.compile(model.output, training=False).execute({model.input.name: x})


CASES = [  # the dynamo exporter alone takes seconds per model: marked slow
    pytest.param(f, e, o, id=f"{f}-{e}-{o}", marks=[pytest.mark.slow] if e == "dynamo" else [])
    for f, exports in EXPORTS.items()
    for e, o in exports
]


@pytest.mark.parametrize("family,exporter,opset", CASES)
def test_imports_with_onnxruntimes_logits_and_exports_back(family, exporter, opset, pretrained, pixels, tmp_path):
    path = tmp_path / f"{family}.onnx"
    export(pretrained[family], FAMILIES[family][1], path, dynamo=exporter == "dynamo", opset=opset)
    x = _inputs(family, pixels[2][:64])
    model = import_onnx(path)
    assert model.metadata["preprocessing"] == NONE.to_metadata()
    reference = _ort_logits(path, x)
    np.testing.assert_allclose(_ours(model, x), reference, rtol=TOL, atol=TOL)
    again = load_model_bytes(dumps(model))  # a pocketfed model file holds the new operators too
    np.testing.assert_allclose(_ours(again, x), reference, rtol=TOL, atol=TOL)
    back = tmp_path / "back.onnx"
    export_onnx(model, back)
    np.testing.assert_allclose(_ort_logits(back, x), reference, rtol=TOL, atol=TOL)
    with torch.no_grad():
        np.testing.assert_allclose(pretrained[family](torch.tensor(x)).numpy(), reference, rtol=TOL, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fine_tunes_with_pf_train_and_onnxruntime_agrees(family, pretrained, pixels, tmp_path, capsys):
    path = tmp_path / f"{family}.onnx"
    export(pretrained[family], FAMILIES[family][1], path, dynamo=False, opset=17)
    np.savez(tmp_path / "tune.npz", x=pixels[0][1024:], y=pixels[1][1024:])  # 512 images the model has not seen
    np.savez(tmp_path / "test.npz", x=pixels[2], y=pixels[3])
    tune = NONE.view(NpzDataset(tmp_path / "tune.npz"), import_onnx(path))
    before = evaluate_model(import_onnx(path), tune)

    tuned = tmp_path / "tuned.onnx"
    args = ["--model", str(path), "--data", str(tmp_path / "tune.npz"), "--epochs", "1", "--batch-size", "32"]
    assert train_main([*args, "--optimizer", "adamw", "--lr", "0.001", "--quiet", "--save", str(tuned), "--json"]) == 0
    capsys.readouterr()
    after = evaluate_model(import_onnx(tuned), tune)
    assert after["loss"] < before["loss"]  # it learned from the new data

    assert eval_main(["--model", str(tuned), "--data", str(tmp_path / "test.npz"), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    theirs = float(np.mean(_ort_logits(tuned, _inputs(family, pixels[2])).argmax(1) == pixels[3]))
    assert ours == pytest.approx(theirs, abs=1 / 256)  # at most one tie decided differently
    assert ours > 0.3


def test_a_missing_operator_is_refused_naming_the_node(tmp_path):
    h = onnx.helper
    node = h.make_node("Einsum", ["x", "x"], ["y"], name="my_einsum", equation="ij,ij->i")
    graph = h.make_graph(
        [node],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    with pytest.raises(OnnxError, match=r"'my_einsum' \(Einsum\): unsupported ONNX operator 'Einsum'"):
        import_onnx(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_unsupported_gru_variants_are_refused_naming_the_node(pretrained, tmp_path):
    path = tmp_path / "gru.onnx"
    export(pretrained["gru"], (28, 28), path, opset=17)
    proto = onnx.load(str(path))
    gru = next(n for n in proto.graph.node if n.op_type == "GRU")
    gru.attribute.append(onnx.helper.make_attribute("clip", 5.0))
    with pytest.raises(OnnxError, match=rf"{gru.name!r} \(GRU\): GRU with clip is not supported"):
        import_onnx(proto)


class _Recurrent(torch.nn.Module):
    def __init__(self, kind, bidirectional):
        super().__init__()
        self.rnn = getattr(torch.nn, kind)(6, 5, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = torch.nn.Linear(5 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind,bidirectional", [("LSTM", False), ("LSTM", True), ("GRU", True)])
def test_lstm_and_bidirectional_recurrences_import(kind, bidirectional, tmp_path):
    torch.manual_seed(4)
    module = _Recurrent(kind, bidirectional).eval()
    path = tmp_path / "rnn.onnx"
    export(module, (7, 6), path, opset=17)
    x = np.random.default_rng(0).standard_normal((4, 7, 6)).astype(np.float32)
    model = import_onnx(path)
    np.testing.assert_allclose(_ours(model, x), _ort_logits(path, x), rtol=TOL, atol=TOL)
    back = tmp_path / "back.onnx"
    export_onnx(model, back)
    np.testing.assert_allclose(_ort_logits(back, x), _ort_logits(path, x), rtol=TOL, atol=TOL)
