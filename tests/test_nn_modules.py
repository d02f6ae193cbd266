"""engine.nn: names, state, freezing, train/eval mode, and agreement with PyTorch's layers."""

import numpy as np
import pytest
from gradcheck import check_gradients

from engine import GraphError, grad, nn, opr
from engine.data import ArrayDataset
from engine.loss import CrossEntropyLoss
from engine.trainer import Trainer

rng = np.random.default_rng(0)


def images(n=4, c=1, h=28, w=28):
    return rng.standard_normal((n, c, h, w)).astype(np.float32)


def run_eval(model, x):
    return model.graph.compile(model.output, training=False).execute({model.input.name: x})


def op_types(model, training):
    func = model.graph.compile(model.output, training=training)
    return {node.op.type_name for node in func.program.nodes}


def test_lenet_in_three_lines_names_and_shapes():
    lenet = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )
    model = lenet.build((1, 28, 28))
    assert list(model.params) == [
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
        "7.weight",
        "7.bias",
        "9.weight",
        "9.bias",
        "11.weight",
        "11.bias",
    ]
    assert model.params["7.weight"].shape == (120, 400)  # PyTorch layout (out, in)
    assert model.num_parameters() == 61706  # LeNet-5's well-known count
    assert run_eval(model, images(3)).shape == (3, 10)


def test_nested_module_names_and_state_dict_round_trip():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.head(opr.flatten(self.features(x)))

    net = Net()
    names = [n for n, _ in net.named_tensors()]
    assert names == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
        "features.1.running_mean",
        "features.1.running_var",
        "head.weight",
        "head.bias",
    ]
    assert [n for n, _ in net.named_buffers()] == ["features.1.running_mean", "features.1.running_var"]
    model = net.build((1, 8, 8))
    assert "features.1.running_mean" not in model.trainable  # buffers are never trained
    state = {k: v + 1 for k, v in net.state_dict().items()}
    net.load_state_dict(state)  # in place: the built model sees it
    np.testing.assert_array_equal(model.params["head.bias"].value, state["head.bias"])
    with pytest.raises(GraphError, match="missing"):
        net.load_state_dict({"head.bias": state["head.bias"]})
    with pytest.raises(GraphError, match="head.weight has shape"):
        net.load_state_dict({**state, "head.weight": np.zeros((2, 2))})


def test_module_state_follows_training():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = net.build((2, 2))
    before = net.state_dict()
    x = rng.standard_normal((16, 2, 2)).astype(np.float32)
    Trainer(model, batch_size=8).fit(ArrayDataset(x, rng.integers(0, 3, 16)), epochs=1)
    assert not np.array_equal(before["1.weight"], net.state_dict()["1.weight"])
    np.testing.assert_array_equal(net.state_dict()["1.weight"], model.params["1.weight"].value)


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
    net = nn.lenet()
    model = net.build((1, 28, 28))
    net.freeze("0", "3", "7.weight")
    assert model.trainable == ["7.bias", "9.weight", "9.bias", "11.weight", "11.bias"]
    frozen = {n: model.params[n].value.copy() for n in ("0.weight", "3.bias", "7.weight")}
    trainer = Trainer(model, batch_size=4)
    assert all(not name.startswith(("0.", "3.", "7.weight")) for name in trainer.optimizer.state)
    # the training function computes no gradient for frozen weights: no backward-filter kernel for conv
    kernels = {node.op.type_name for node in trainer.train_fn.program.nodes}
    assert "ConvolutionBackwardFilter" not in kernels and "ConvolutionBackwardData" not in kernels
    for _ in range(2):
        trainer.step(images(4), rng.integers(0, 10, 4))
    for name, value in frozen.items():
        np.testing.assert_array_equal(model.params[name].value, value)
    net.unfreeze("0")
    assert model.trainable[:2] == ["0.weight", "0.bias"]
    with pytest.raises(KeyError, match="no sub-module or parameter 'conv9'"):
        net.freeze("conv9")


def test_train_mode_builds_both_branches_eval_mode_only_inference():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 2))
    trained = net.build((1, 4, 4))
    assert {"DropoutMask", "AddUpdate"} <= op_types(trained, training=True) | {
        u.op.type_name for v in trained.graph.nodes for u in v.side_updates
    }
    assert "DropoutMask" not in op_types(trained, training=False)
    inference = net.eval().build((1, 4, 4))
    training_only = ("ModeSelect", "DropoutMask", "AddUpdate")
    assert not any(v.op.type_name in training_only for v in inference.graph.nodes)
    x = images(3, 1, 4, 4)
    np.testing.assert_allclose(run_eval(trained, x), run_eval(inference, x), rtol=1e-6)


def test_parameter_outside_build_is_a_clear_error():
    from engine import ComputingGraph

    g = ComputingGraph()
    with pytest.raises(GraphError, match=r"Module.build"):
        nn.Linear(3, 2)(opr.host2device(g, (None, 3)))


def test_layers_match_pytorch():
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    ours = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2, padding=1),
        nn.Conv2d(4, 6, 1, bias=False),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
        nn.Sigmoid(),
    )
    theirs = tnn.Sequential(
        tnn.Conv2d(3, 4, 3, stride=2, padding=1),
        tnn.BatchNorm2d(4),
        tnn.ReLU(),
        tnn.AvgPool2d(2, padding=1),
        tnn.Conv2d(4, 6, 1, bias=False),
        tnn.Tanh(),
        tnn.MaxPool2d(2),
        tnn.Flatten(),
        tnn.Linear(6 * 2 * 2, 5),
        tnn.Sigmoid(),
    )
    state = {k: v + np.float32(0.1) * rng.standard_normal(v.shape, np.float32) for k, v in ours.state_dict().items()}
    state["1.running_var"] = np.abs(state["1.running_var"]) + 0.5
    ours.load_state_dict(state)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    model = ours.build((3, 12, 12))
    x = images(5, 3, 12, 12)
    theirs.eval()
    np.testing.assert_allclose(run_eval(model, x), theirs(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    # training mode: batch statistics, and the running statistics move as PyTorch's do
    theirs.train()
    train_fn = model.graph.compile(model.output, training=True)
    np.testing.assert_allclose(train_fn.execute(x=x), theirs(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    for name in ("running_mean", "running_var"):
        expected = getattr(theirs[1], name).numpy()
        np.testing.assert_allclose(model.params[f"1.{name}"].value, expected, atol=1e-6)


def test_embedding_lookup_forward_training_and_gradient():
    table = nn.Embedding(6, 3)
    net = nn.Sequential(table, nn.Flatten(), nn.Linear(2 * 3, 2))
    model = net.build((2,), dtype="int64", input_name="tokens")
    idx = np.array([[0, 5], [2, 2]])
    weight = model.params["0.weight"].value.copy()
    assert model.graph.compile(model.output, training=False).execute(tokens=idx).shape == (2, 2)
    looked_up = next(v for v in model.graph.nodes if v.op.type_name == "EmbeddingLookup")
    lookup = model.graph.compile(looked_up, training=False)
    np.testing.assert_array_equal(lookup.execute(tokens=idx).reshape(2, 2, 3), weight[idx])
    # gradient: rows 2 (used twice) and 0, 5 get gradient; unused rows stay zero
    loss = CrossEntropyLoss()(model.output, opr.host2device(model.graph, (None,), "int64", "label"))
    d_fn = model.graph.compile(grad(loss, model.params["0.weight"]))
    d_table = d_fn.execute(tokens=idx, label=np.array([0, 1]))
    assert np.all(d_table[[1, 3, 4]] == 0) and np.any(d_table[[0, 2, 5]] != 0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        lookup.execute(tokens=np.array([[0, 6], [0, 0]]))


def test_embedding_gradient_finite_differences():
    index = np.array([[1, 3, 1], [0, 3, 3]])
    check_gradients(lambda w: opr.embedding(w, w.graph.constant(index)), [rng.standard_normal((5, 4))])
