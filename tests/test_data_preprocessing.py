"""Preprocessing travels with the model (issue 16, item 1): a model trained on [0, 1] pixels is
evaluated on [0, 1] pixels by default, `--normalize` overrides, `pf-train --save` records what it
trained with, ONNX files carry it, and a malformed record is refused when the file is loaded."""

import json

import numpy as np
import pytest

from engine import load, nn, save
from engine.cli import eval_main, train_main
from engine.data import MNIST, NONE, Preprocessing, load_default, preprocessing_for, record_preprocessing
from engine.data.mnist import MNIST_MEAN, MNIST_STD
from engine.serialize.container import dumps as dump_container
from engine.serialize.container import loads as load_container
from engine.serialize.modelfile import ModelFileError


def test_parse_describe_and_refuse():
    assert Preprocessing.parse("none") == NONE
    assert Preprocessing.parse("MNIST") == MNIST
    assert Preprocessing.parse("0.5,0.25") == Preprocessing((0.5,), (0.25,))
    assert Preprocessing.parse("0.4:0.5:0.6,0.2:0.2:0.3+pad2") == Preprocessing((0.4, 0.5, 0.6), (0.2, 0.2, 0.3), 2)
    for bad in ("zscore", "0.5", "0.5,0", "1,2,3", "mnist+padX"):
        with pytest.raises(ValueError):
            Preprocessing.parse(bad)
    assert "none" in NONE.describe() and "0.1307" in MNIST.describe()


def test_views_feed_what_apply_gives_in_the_models_input_shape():
    test = load_default("test", limit=32)
    pixels = load_default("test", limit=32, normalize=False).images  # [0, 1]
    idx = np.arange(8)
    for prep in (NONE, MNIST, Preprocessing((0.5,), (0.25,), pad=2)):
        x, y = prep.view(test).get_batch(idx)
        np.testing.assert_allclose(x, prep.apply(pixels[idx]), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(y, test.labels[:8])
    sequences = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).build((28, 28))  # a model fed (N, 28, 28)
    x, _ = NONE.view(test, sequences).get_batch(idx)
    assert x.shape == (8, 28, 28)
    np.testing.assert_allclose(x, pixels[idx, 0])


def _pixel_trained_onnx(tmp_path):
    """A small PyTorch classifier trained on [0, 1] pixels (ToTensor's scale), exported to ONNX."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    train = load_default("train", normalize=False)
    x, y = torch.tensor(train.images[:3000]), torch.tensor(train.labels[:3000])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for step in range(150):
        batch = slice((step * 100) % 3000, (step * 100) % 3000 + 100)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    path = tmp_path / "pixels.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    return path


def _eval(capsys, *args):
    assert eval_main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]


def test_pf_eval_feeds_an_onnx_model_the_pixels_it_was_trained_on(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    path = _pixel_trained_onnx(tmp_path)
    test = load_default("test", normalize=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = float(np.mean(session.run(None, {"x": test.images})[0].argmax(1) == test.labels))
    assert preprocessing_for(load(path)) == NONE
    assert _eval(capsys, "--model", str(path)) == pytest.approx(reference, abs=1e-9)
    mnist = _eval(capsys, "--model", str(path), "--normalize", "mnist")  # the old behaviour, now explicit
    assert mnist != pytest.approx(reference, abs=1e-9)
    assert reference > 0.7


def test_pf_train_records_what_it_trained_with_in_both_formats(tmp_path, capsys):
    pytest.importorskip("onnx")
    small = load_default("test", limit=256, normalize=False)
    np.savez(tmp_path / "small.npz", x=small.images, y=small.labels)
    data = ["--data", str(tmp_path / "small.npz")]
    spec = [*data, "--normalize", "0.25,0.5", "--epochs", "1", "--quiet", "--lr", "0.01"]
    saved = tmp_path / "tuned.pf"
    assert train_main([*spec, "--save", str(saved), "--json"]) == 0
    assert preprocessing_for(load(saved)) == Preprocessing((0.25,), (0.5,))
    onnx_path = tmp_path / "tuned.onnx"
    assert train_main([*data, "--model", str(saved), "--epochs", "1", "--quiet", "--save", str(onnx_path)]) == 0
    assert preprocessing_for(load(onnx_path)) == Preprocessing((0.25,), (0.5,))  # carried in metadata_props
    capsys.readouterr()
    a = _eval(capsys, *data, "--model", str(saved))
    b = _eval(capsys, *data, "--model", str(saved), "--normalize", "0.25,0.5")
    c = _eval(capsys, *data, "--model", str(saved), "--normalize", "none")
    assert a == b != c


def test_a_fresh_lenet_and_old_files_default_to_mnist(tmp_path):
    model = nn.lenet().build((1, 28, 28))
    assert preprocessing_for(model) == MNIST
    record_preprocessing(model, NONE)
    save(model, tmp_path / "m.pf")
    assert preprocessing_for(load(tmp_path / "m.pf")) == NONE
    assert (MNIST.mean[0], MNIST.std[0]) == (MNIST_MEAN, MNIST_STD)


@pytest.mark.parametrize(
    "record",
    [{"input": "pixels/255", "mean": [0.5], "std": [0.0]}, {"input": "raw"}, {"input": "pixels/255", "mean": "x"},
     {"input": "pixels/255", "mean": [], "std": [], "pad": 10**9}],
)  # fmt: skip
def test_a_malformed_preprocessing_record_is_refused_at_load(tmp_path, record):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).build((4,))
    save(model, tmp_path / "ok.pf")
    container = load_container((tmp_path / "ok.pf").read_bytes(), kind="model")
    metadata = {**container.metadata, "preprocessing": record}
    (tmp_path / "bad.pf").write_bytes(dump_container(container.tensors, metadata, kind="model"))
    with pytest.raises(ModelFileError, match="preprocessing"):
        load(tmp_path / "bad.pf")


def test_evaluate_model_bytes_applies_the_models_record_when_asked(tmp_path):
    """The coordinator's evaluation: `preprocessing="model"` feeds what the file records."""
    from engine.serialize.modelfile import dumps
    from engine.trainer import evaluate_model_bytes

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).build((1, 28, 28))
    record_preprocessing(model, Preprocessing((0.5,), (0.25,)))
    test = load_default("test", limit=64)  # an IDX dataset: MNIST-normalized unless told otherwise
    recorded = evaluate_model_bytes(dumps(model), test, preprocessing="model")
    explicit = evaluate_model_bytes(dumps(model), test, preprocessing="0.5,0.25")
    as_is = evaluate_model_bytes(dumps(model), test)
    assert recorded == explicit
    assert recorded["loss"] != as_is["loss"]
