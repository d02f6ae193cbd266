"""The training step as plain ONNX: 20 steps in onnxruntime match 20 engine steps on the same real
batches (weights and loss within 1e-5 relative at every step), for LeNet and each model family of
issue 16 (ViT, MobileNetV2, GRU) with each optimizer, and for models that between them use every
operator the step lowers; what cannot be lowered is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import training_step_models as models  # noqa: E402

from engine import Model, opr  # noqa: E402
from engine.graph import ComputingGraph  # noqa: E402
from engine.loss import BCEWithLogitsLoss, L1Loss, MSELoss  # noqa: E402
from engine.models import build  # noqa: E402
from engine.onnx import EMITTERS, LOWERINGS, OnnxError, export_training_step, import_onnx  # noqa: E402
from engine.onnx import lowerings as lowering_module  # noqa: E402
from engine.opr.base import Operator  # noqa: E402
from engine.optimizer import SGD, Adam, make_optimizer  # noqa: E402
from engine.serialize.modelfile import save  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

RTOL = 1e-5  # weights and loss
UPDATE_RTOL = STATE_RTOL = 1e-4  # the total change of each weight; optimizer state


def images(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x, "label": y}


def one_hot(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x, "label": np.eye(10, dtype=np.float32)[y]}


def tokens(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": models.tokens(x), "label": y}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||; infinite when either holds a NaN or infinity (training diverged)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    scale = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (scale if scale else 1.0)


def check_file(data: bytes) -> None:
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert {n.domain for n in proto.graph.node} == {""}


def parity(model: Model, optimizer, loss="cross_entropy", feeds=images, steps=20, **options) -> float:
    """Train a copy in onnxruntime and the model in the engine on the same batches; the worst
    relative difference seen over every step in the loss and every model tensor.

    Weights barely moved by a small step would agree however wrong its gradient, so the total
    change of every tensor over the steps must agree too (within UPDATE_RTOL of that change),
    and so must the optimizer state at every step (STATE_RTOL: momentum buffers are sums of
    gradients, whose float32 summation order shows ~1e-6 relative, against ~1e-7 in weights)."""
    data = export_training_step(model, optimizer=optimizer, loss=loss, **options)
    check_file(data)
    start = model.state_dict()
    step = models.OnnxStep(data, start, optimizer.lr)
    trainer = Trainer(model, loss, optimizer, options.get("trainable"), options.get("prox_mu", 0.0))
    worst = 0.0
    for x, y in models.batches(steps):
        feed = feeds(x, y)
        engine_loss = float(trainer.train_fn.execute(feed)[0])
        onnx_loss = step.step(feed)
        worst = max(worst, relative(onnx_loss, engine_loss))
        for name, value in model.state_dict().items():
            worst = max(worst, relative(step.tensors[name], value))
        for key, var in optimizer.state.items():
            weight, slot = key.rsplit(".", 1)
            state = relative(step.tensors[f"state/{weight}/{slot}"], var.value)
            assert state < STATE_RTOL, f"{key}: the ONNX step's optimizer state differs by {state:.2g} relative"
    for name, value in model.state_dict().items():
        change = relative(step.tensors[name] - start[name], value - start[name])
        assert change < UPDATE_RTOL, f"{name}: the ONNX step's total change differs by {change:.2g} relative"
    return worst


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "adam"])
def test_lenet_twenty_steps_match_the_engine(name):
    optimizer = make_optimizer(name, 1e-3 if name == "adam" else 0.05)
    assert parity(build("lenet", seed=0), optimizer) < RTOL


@pytest.mark.parametrize(
    "loss, feeds, lr",
    [
        ("cross_entropy", images, 0.05),
        (MSELoss(), one_hot, 0.05),
        (L1Loss(), one_hot, 0.05),
        (BCEWithLogitsLoss(), one_hot, 0.2),
        (models.OneHotMSE(), images, 0.5),
    ],
    ids=["cross_entropy", "mse", "l1", "bce", "one_hot_mse"],
)
def test_mlp_losses_match_the_engine(loss, feeds, lr):
    assert parity(models.mlp(), SGD(lr, momentum=0.9), loss, feeds) < RTOL


@pytest.mark.parametrize(
    "optimizer",
    [SGD(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), Adam(1e-3, weight_decay=1e-4, amsgrad=True)],
    ids=["nesterov_weight_decay", "adam_amsgrad_weight_decay"],
)
def test_mlp_optimizer_variants_match_the_engine(optimizer):
    assert parity(models.mlp(), optimizer) < RTOL


def test_fedprox_term_matches_the_engine():
    assert parity(models.mlp(), SGD(0.05, momentum=0.9), prox_mu=0.5) < RTOL


def test_personalization_trains_only_the_head():
    """Frozen weights are inputs with no new/ output and no optimizer state."""
    head = ["fc3.weight", "fc3.bias"]
    assert parity(build("lenet"), SGD(0.05, momentum=0.9), trainable=head) < RTOL
    inputs, outputs, meta = interface(export_training_step(build("lenet"), optimizer="sgd-momentum", trainable=head))
    assert "conv1.weight" in [i[0] for i in inputs] and meta["weights"] == head
    assert [o[0] for o in outputs] == ["loss", *[f"new/{n}" for n in head], *[f"new_state/{n}/momentum" for n in head]]


def test_the_batch_size_may_change_between_steps():
    model = build("lenet")
    step = models.OnnxStep(export_training_step(model, optimizer="sgd-momentum"), model.state_dict(), 0.05)
    trainer = Trainer(model, optimizer=SGD(0.05, momentum=0.9))
    for batch in (32, 7, 1, 64):
        x, y = next(models.batches(1, batch=batch, start=batch))
        assert relative(step.step({"x": x, "label": y}), trainer.step(x, y)[0]) < RTOL
    assert all(relative(step.tensors[n], v) < RTOL for n, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_batch_norm_dropout_and_average_pooling_match_the_engine(name):
    """Running statistics are new/<name> outputs; dropout masks are inputs drawn as the engine draws."""
    assert parity(models.conv_net(), make_optimizer(name, 1e-3 if name == "adam" else 0.05)) < RTOL


@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_every_other_operator_matches_the_engine(name):
    optimizer = make_optimizer(name, 1e-3 if name == "adam" else 0.02)
    assert parity(models.kitchen_sink(), optimizer, models.KitchenLoss()) < RTOL


def test_embedding_matches_the_engine():
    assert parity(models.embedding_bag(), SGD(0.5, momentum=0.9), feeds=tokens) < RTOL


@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_modern_operators_match_the_engine(name):
    optimizer = make_optimizer(name, 1e-3 if name == "adam" else 0.02)
    assert parity(models.modern_sink(), optimizer) < RTOL


# ----- the model families (issue 16), tiny, exported by PyTorch and imported as users do -----


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Tiny members of each family (tests/torch_families.py), exported as tests/test_onnx_families.py
    does (batch norm folded into the convolutions by PyTorch's export). The ViT's attention has no
    biases: softmax ignores the key bias, so its gradient is zero up to float noise, which Adam
    scales to full-size steps that no two implementations agree on (test_vit_with_biases_...)."""
    torch = pytest.importorskip("torch")
    from torch_families import RowGRU, TinyMobileNetV2, TinyViT, export

    torch.manual_seed(0)
    built = {
        "vit": (TinyViT(dim=8, depth=1, heads=2, mlp=16, bias=False), (1, 28, 28)),
        "vit_biases": (TinyViT(dim=8, depth=1, heads=2, mlp=16), (1, 28, 28)),
        "mobilenetv2": (TinyMobileNetV2(widths=(8, 12), expand=2), (1, 28, 28)),
        "gru": (RowGRU(hidden=8), (28, 28)),
    }
    folder = tmp_path_factory.mktemp("families")
    for name, (module, shape) in built.items():
        export(module, shape, folder / f"{name}.onnx")
    return {name: folder / f"{name}.onnx" for name in built}


def rows(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x[:, 0], "label": y}  # the GRU reads each image's 28 rows as 28 steps


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "adam"])
@pytest.mark.parametrize("family", ["vit", "mobilenetv2", "gru"])
def test_model_families_twenty_steps_match_the_engine(family, name, families):
    optimizer = make_optimizer(name, 1e-3 if name == "adam" else 0.05)
    feeds = rows if family == "gru" else images
    assert parity(import_onnx(families[family]), optimizer, feeds=feeds) < RTOL


def test_vit_with_biases_matches_the_engine_with_momentum(families):
    assert parity(import_onnx(families["vit_biases"]), SGD(0.05, momentum=0.9)) < RTOL


def test_a_model_imported_from_pytorch_matches_the_engine(tmp_path):
    """PyTorch's ONNX export with ceil-mode pooling and asymmetric padding, which the importer
    turns into explicit pad blocks (concat, slice, broadcast) in front of the engine's operators."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, ceil_mode=True),  # 28 -> 14
        torch.nn.ZeroPad2d((1, 0, 1, 0)),
        torch.nn.Conv2d(6, 8, 3, stride=2),  # 15 -> 7
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 7 * 7, 10),
    ).eval()
    path = tmp_path / "net.onnx"
    dynamic = {"x": {0: "batch"}, "logits": {0: "batch"}}
    example = (torch.zeros(2, 1, 28, 28),)
    torch.onnx.export(
        net,
        example,
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes=dynamic,
        opset_version=17,
    )
    assert parity(import_onnx(path), SGD(0.05, momentum=0.9)) < RTOL


def test_the_test_models_exercise_every_lowering(monkeypatch, families):
    """Every operator with a lowering (or an inference emitter) appears in some model above."""
    seen: set[type] = set()
    lower = lowering_module.Lowerer.lower

    def spy(self, node, ins, out):
        seen.add(type(node.op))
        return lower(self, node, ins, out)

    monkeypatch.setattr(lowering_module.Lowerer, "lower", spy)
    exports = [
        (build("lenet"), "cross_entropy"),
        (models.mlp(), L1Loss()),
        (models.mlp(), BCEWithLogitsLoss()),
        (models.mlp(), models.OneHotMSE()),
        (models.conv_net(), "cross_entropy"),
        (models.kitchen_sink(), models.KitchenLoss()),
        (models.embedding_bag(), "cross_entropy"),
        (models.modern_sink(), "cross_entropy"),
        *[(import_onnx(path), "cross_entropy") for path in families.values()],
    ]
    for model, loss in exports:
        export_training_step(model, optimizer="adam", loss=loss)
    missing = {cls.type_name for cls in [*LOWERINGS, *EMITTERS]} - {cls.type_name for cls in seen}
    assert not missing, f"lowered but never exercised: {sorted(missing)}"


# ----- the interface -----


def interface(data: bytes) -> tuple[list, list, dict]:
    proto = onnx.load_from_string(data)

    def describe(values):
        return [
            (v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, shape(v)) for v in values
        ]

    def shape(v):
        return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)

    meta = json.loads({p.key: p.value for p in proto.metadata_props}["pocketfed.training_step"])
    return describe(proto.graph.input), describe(proto.graph.output), meta


def test_interface_names_shapes_and_dtypes_are_exactly_the_contract():
    model = build("lenet")
    weights = [(n, "float32", v.shape) for n, v in model.state_dict().items()]
    inputs, outputs, meta = interface(export_training_step(model, optimizer="adam"))
    slots = [("exp_avg", None), ("exp_avg_sq", None), ("step", ())]
    state = [
        (f"state/{n}/{slot}", "float32", shape if s is None else s) for n, _, shape in weights for slot, s in slots
    ]
    assert inputs == [
        ("x", "float32", ("N", 1, 28, 28)),
        ("label", "int64", ("N",)),
        *weights,
        *state,
        ("lr", "float32", ()),
    ]
    assert outputs == [
        ("loss", "float32", ()),
        *[(f"new/{n}", d, s) for n, d, s in weights],
        *[(f"new_{n}", d, s) for n, d, s in state],
    ]
    assert meta["format"] == "pocketfed-training-step" and meta["optimizer"]["type"] == "Adam"
    assert meta["inputs"] == [i[0] for i in inputs] and meta["outputs"] == [o[0] for o in outputs]

    inputs, outputs, meta = interface(export_training_step(models.conv_net(), optimizer="sgd"))
    names = [i[0] for i in inputs]
    assert names[-2:] == ["dropout_mask/0", "lr"] and "1.running_mean" in names
    assert "new/1.running_var" in [o[0] for o in outputs] and not any(n.startswith("state/") for n in names)
    assert meta["dropout_masks"] == [{"name": "dropout_mask/0", "p": 0.25, "seed": 7}]


def test_initial_values_make_a_self_contained_file():
    """With initial_values the file holds the weights, zero state and lr as defaults: x and label suffice."""
    model = build("lenet", seed=3)
    optimizer = SGD(0.05, momentum=0.9)
    data = export_training_step(model, optimizer=optimizer, initial_values=True)
    bare = export_training_step(model, optimizer=optimizer)
    assert len(data) > len(bare) + 4 * model.num_parameters() * 2  # weights and momentum, float32
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (x, y), names = next(models.batches(1)), [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, {"x": x, "label": y})))
    trainer = Trainer(model, optimizer=optimizer)
    loss, _ = trainer.step(x, y)
    assert abs(float(results["loss"]) - loss) <= RTOL * loss
    for name, value in model.state_dict().items():
        assert relative(results[f"new/{name}"], value) < RTOL


def test_export_leaves_the_model_and_optimizer_untouched():
    model = build("lenet")
    optimizer = SGD(0.05, momentum=0.9)
    nodes, before = len(model.graph.nodes), model.state_dict()
    export_training_step(model, optimizer=optimizer)
    assert len(model.graph.nodes) == nodes and "label" not in model.graph
    assert optimizer.state == {}  # a Trainer built now owns the state, as without the export
    Trainer(model, optimizer=optimizer).step(*next(models.batches(1)))
    assert sorted(optimizer.state) == sorted(f"{n}.momentum" for n in before)


# ----- refusals -----


class UnloweredSoftplus(Operator):
    """An operator this module defines, with no ONNX lowering."""

    n_inputs = 1

    def infer(self, x):
        return x.shape, x.dtype

    def forward(self, x):
        return np.logaddexp(x, 0).astype(x.dtype)

    def grad(self, out, dout):
        return [opr.mul(dout, opr.sigmoid(out.inputs[0]))]


def test_an_operator_without_a_lowering_is_refused_by_name():
    model = models.mlp()
    model.outputs["logits"] = UnloweredSoftplus.make(model.output, name="smooth")
    with pytest.raises(
        OnnxError, match=r"operator UnloweredSoftplus has no ONNX lowering \(node .*'smooth'.*UnloweredSoftplus"
    ):
        export_training_step(model)


def test_names_the_interface_claims_are_refused():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 4), name="x")
    w = opr.shared(graph, np.ones((4, 2), np.float32), "lr")
    model = Model(graph, {"x": x}, {"logits": opr.matrix_mul(x, w)}, {"lr": w})
    with pytest.raises(OnnxError, match=r"\['lr'\] clash with the training-step interface"):
        export_training_step(model)


# ----- the command line -----


@pytest.mark.parametrize("source", ["lenet", "file"])
def test_pf_train_exports_a_step_that_trains(tmp_path, source):
    model = build("lenet", seed=0)
    spec = "lenet" if source == "lenet" else str(tmp_path / "lenet.pf")
    if source == "file":
        save(model, spec)
    out = tmp_path / "step.onnx"
    cmd = [sys.executable, "-m", "engine", "--model", spec, "--export-training-step", str(out)]
    done = subprocess.run([*cmd, "--optimizer", "adam", "--lr", "0.001", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary == {"training_step": str(out), "bytes": out.stat().st_size, "optimizer": "adam"}
    check_file(out.read_bytes())
    step = models.OnnxStep(out.read_bytes(), model.state_dict(), 1e-3)
    trainer = Trainer(model, optimizer=Adam(1e-3))
    for x, y in models.batches(3):
        assert abs(step.step({"x": x, "label": y}) - trainer.step(x, y)[0]) < RTOL * 3
    assert all(relative(step.tensors[n], v) < RTOL for n, v in model.state_dict().items())
