"""Model files and checkpoints: save -> load keeps the computation; resuming is bit-identical."""

import numpy as np
import pytest

import engine
from engine import SGD, Adam, nn
from engine.data import ArrayDataset, Subset, load_default
from engine.serialize.container import ContainerError
from engine.serialize.container import load as load_container
from engine.trainer import Trainer

rng = np.random.default_rng(1)


def small_net(dropout=0.25):
    nn.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout, seed=7),
        nn.Linear(4 * 14 * 14, 10),
    )


def fashion_subset(n=96):
    return Subset(load_default("train"), np.arange(n))


def logits(model, x):
    return model.graph.compile(model.output, training=False).execute({model.input.name: x})


def test_save_load_same_logits_names_and_metadata(tmp_path):
    model = small_net().build((1, 28, 28))
    digest = engine.save(model, tmp_path / "m.pfm")
    loaded = engine.load(tmp_path / "m.pfm")
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(logits(loaded, x), logits(model, x))
    assert list(loaded.params) == list(model.params) and loaded.trainable == model.trainable
    meta = loaded.metadata
    assert meta["format"] == "pocketfed-model" and meta["format_version"] == 1 and meta["created_at"]
    assert len(meta["graph_sha256"]) == 64 and len(digest) == 64
    assert meta["inputs"] == [{"name": "x", "shape": [None, 1, 28, 28], "dtype": "float32"}]
    # the training-time parts survive: running-stat updates and dropout
    assert any(v.side_updates for v in loaded.graph.nodes)
    assert any(v.op.type_name == "DropoutMask" for v in loaded.graph.nodes)


def test_inference_only_drops_training_parts(tmp_path):
    model = small_net().build((1, 28, 28))
    Trainer(model, batch_size=32).fit(fashion_subset(64))  # move the running statistics
    engine.save(model, tmp_path / "full.pfm")
    engine.save(model, tmp_path / "infer.pfm", inference_only=True)
    slim = engine.load(tmp_path / "infer.pfm")
    kinds = {v.op.type_name for v in slim.graph.nodes}
    assert not kinds & {"ModeSelect", "DropoutMask", "AddUpdate", "CountRatio"}
    assert slim.metadata["inference_only"] is True
    assert (tmp_path / "infer.pfm").stat().st_size < (tmp_path / "full.pfm").stat().st_size
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(logits(slim, x), logits(model, x))


def test_loaded_model_trains_like_the_original(tmp_path):
    a = small_net().build((1, 28, 28))
    engine.save(a, tmp_path / "m.pfm")
    b = engine.load(tmp_path / "m.pfm")
    data = fashion_subset(64)
    ra = Trainer(a, optimizer=SGD(0.05, momentum=0.9), batch_size=16, seed=5).fit(data)
    rb = Trainer(b, optimizer=SGD(0.05, momentum=0.9), batch_size=16, seed=5).fit(data)
    assert ra == rb
    for name in a.params:
        np.testing.assert_array_equal(a.params[name].value, b.params[name].value, err_msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize(
    "make_optimizer",
    [lambda: SGD(0.05, momentum=0.9, weight_decay=1e-4), lambda: Adam(1e-3)],
    ids=["sgd-momentum", "adam"],
)
def test_checkpoint_resume_is_bit_identical(tmp_path, make_optimizer, dropout):
    data = fashion_subset()
    # uninterrupted: two epochs in one process
    straight = small_net(dropout).build((1, 28, 28))
    t1 = Trainer(straight, optimizer=make_optimizer(), batch_size=32, seed=11, prox_mu=0.01)
    t1.fit(data)
    t1.fit(data)
    # interrupted: one epoch, checkpoint, a fresh process (other initial weights), one more epoch
    first = small_net(dropout).build((1, 28, 28))
    t2 = Trainer(first, optimizer=make_optimizer(), batch_size=32, seed=11, prox_mu=0.01)
    t2.fit(data)
    engine.save(first, tmp_path / "model.pfm")
    t2.save_checkpoint(tmp_path / "ckpt")
    nn.manual_seed(99)
    resumed = engine.load(tmp_path / "model.pfm")
    for v in resumed.params.values():
        v.value[...] = 0  # prove the checkpoint, not the model file, restores the state
    t3 = Trainer(resumed, optimizer=make_optimizer(), batch_size=32, seed=0, prox_mu=0.01)
    t3.load_checkpoint(tmp_path / "ckpt")
    t3.fit(data)
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name].value, straight.params[name].value, err_msg=name)
    assert load_container(tmp_path / "ckpt").kind == "checkpoint"


def test_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    model = small_net().build((1, 28, 28))
    Trainer(model, optimizer=SGD(0.1, momentum=0.9)).save_checkpoint(tmp_path / "sgd.ckpt")
    other = small_net().build((1, 28, 28))
    adam = Trainer(other, optimizer=Adam())
    before = other.state_dict()
    with pytest.raises(ContainerError, match="does not fit this trainer"):
        adam.load_checkpoint(tmp_path / "sgd.ckpt")
    with pytest.raises(ContainerError, match="expected a 'checkpoint' container"):
        engine.save(model, tmp_path / "m.pfm")
        adam.load_checkpoint(tmp_path / "m.pfm")
    for name, value in before.items():
        np.testing.assert_array_equal(other.params[name].value, value)


def test_checkpoint_with_a_bad_dropout_generator_state_changes_nothing():
    model = small_net().build((1, 28, 28))
    trainer = Trainer(model, optimizer=SGD(0.1, momentum=0.9), batch_size=32)
    tensors, metadata = trainer.checkpoint_state()
    tensors = {n: np.full_like(v, 0.5) for n, v in tensors.items()}
    (mask,) = [v.op for v in model.graph.nodes if isinstance(v.op, engine.opr.DropoutMask)]
    state = mask.rng_state()
    bad = {**metadata, "dropout_rng": [{**state, "bit_generator": "NoSuchGenerator"}]}
    before = model.state_dict()
    with pytest.raises(ContainerError, match="dropout generator state is invalid"):
        trainer.load_checkpoint_state(tensors, bad)
    assert mask.rng_state() == state
    for name, value in before.items():
        np.testing.assert_array_equal(model.params[name].value, value)


def test_dropout_mask_resumes_its_sequence_from_a_saved_state():
    model = small_net(0.5).build((1, 28, 28))
    (var,) = [v for v in model.graph.nodes if isinstance(v.op, engine.opr.DropoutMask)]
    x = np.ones([2 if d is None else d for d in var.inputs[0].shape], np.float32)
    saved = var.op.rng_state()
    first = [var.op.forward(x) for _ in range(3)]
    assert not np.array_equal(first[0], first[1])  # a fresh mask each step
    var.op.set_rng_state(saved)
    np.testing.assert_array_equal(np.stack([var.op.forward(x) for _ in range(3)]), np.stack(first))


def test_frozen_flags_survive_the_file(tmp_path):
    net = small_net()
    model = net.build((1, 28, 28))
    net.freeze("0", "1")
    engine.save(model, tmp_path / "m.pfm")
    loaded = engine.load(tmp_path / "m.pfm")
    assert loaded.trainable == ["6.weight", "6.bias"]
    assert loaded.metadata["trainable"] == ["6.weight", "6.bias"]
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    Trainer(loaded, batch_size=8).fit(ArrayDataset(x, rng.integers(0, 10, 8)))
    np.testing.assert_array_equal(loaded.params["0.weight"].value, model.params["0.weight"].value)
