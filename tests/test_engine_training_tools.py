"""Training tools against PyTorch: cross entropy with class weights, ignore_index and
reduction="none" (float64, values and gradients), AdamW, global-norm clipping, LR schedules."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from engine import ComputingGraph, CrossEntropyLoss, grad, nn, opr  # noqa: E402
from engine.optimizer import SGD, AdamW, CosineLR, StepLR, Warmup, clip_by_global_norm  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

rng = np.random.default_rng(3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,ignore", [(True, None), (False, 2), (True, 2)])
def test_cross_entropy_weights_and_ignore_index(reduction, weighted, ignore):
    logits = rng.standard_normal((8, 4))
    labels = np.array([0, 2, 1, 3, 2, 0, 1, 2])
    weight = np.array([0.5, 2.0, 1.0, 3.0]) if weighted else None
    g = ComputingGraph()
    x = opr.shared(g, logits, "logits")
    y = opr.host2device(g, (None,), "int64", name="label")
    loss = CrossEntropyLoss(weight=weight, ignore_index=ignore, reduce_mode=reduction)(x, y)
    total = opr.sum(loss) if reduction == "none" else loss
    value, dx = g.compile([loss, grad(total, x)]).execute(label=labels)

    xt = torch.tensor(logits, requires_grad=True)
    kwargs = {"weight": torch.tensor(weight) if weighted else None, "reduction": reduction}
    expected = F.cross_entropy(xt, torch.tensor(labels), ignore_index=-100 if ignore is None else ignore, **kwargs)
    expected.sum().backward()
    np.testing.assert_allclose(value, expected.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_cross_entropy_refuses_a_wrong_number_of_class_weights():
    g = ComputingGraph()
    with pytest.raises(ValueError, match="3 class weights for 4 classes"):
        CrossEntropyLoss(weight=[1, 1, 1])(opr.host2device(g, (None, 4)), opr.host2device(g, (None,), "int64", "y"))


def _regression_pair(seed=0):
    torch.manual_seed(seed)
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ours = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


def test_adamw_and_global_norm_clipping_follow_pytorch_for_20_steps():
    ours, theirs = _regression_pair()
    x = rng.standard_normal((32, 5)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    model = ours.build((5,))
    trainer = Trainer(model, optimizer=AdamW(0.01, weight_decay=0.1), clip_grad_norm=0.3, batch_size=32)
    opt = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1)
    norms = []
    for _ in range(20):
        ours_loss, _ = trainer.step(x, y)
        opt.zero_grad()
        loss = F.cross_entropy(theirs(torch.tensor(x)), torch.tensor(y))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.3)))
        opt.step()
        assert abs(ours_loss - loss.item()) < 2e-5
    assert max(norms) > 0.3  # the clipping did act
    for name, value in theirs.state_dict().items():
        np.testing.assert_allclose(model.params[name].value, value.numpy(), rtol=2e-4, atol=2e-5, err_msg=name)


def test_clip_by_global_norm_scales_only_when_above():
    g = ComputingGraph()
    a, b = g.constant(np.array([3.0, 0.0])), g.constant(np.array([[4.0]]))
    small, big = (g.compile(clip_by_global_norm([a, b], m), training=False).execute() for m in (1.0, 10.0))
    np.testing.assert_allclose(small[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(small[1], [[0.8]], rtol=1e-6)
    np.testing.assert_allclose(big[0], [3.0, 0.0])


def test_schedules_match_pytorch_schedulers():
    def torch_lrs(make, n=11):  # CosineAnnealingLR rises again after T_max; CosineLR stays at min_lr
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    lrs = torch.optim.lr_scheduler
    cases = [
        (StepLR(0.1, 4, 0.5), lambda o: lrs.StepLR(o, 4, 0.5)),
        (CosineLR(0.1, 10), lambda o: lrs.CosineAnnealingLR(o, 10)),
        (Warmup(StepLR(0.1, 100), 5), lambda o: lrs.LinearLR(o, start_factor=1 / 5, total_iters=4)),
    ]
    for ours, make in cases:
        np.testing.assert_allclose([ours(k) for k in range(11)], torch_lrs(make), rtol=1e-12, atol=1e-15)


def test_trainer_applies_the_schedule_per_step_and_checkpoints_the_step(tmp_path):
    ours, _ = _regression_pair()
    optimizer = SGD(0.1)
    trainer = Trainer(ours.build((5,)), optimizer=optimizer, schedule=StepLR(0.1, 2, 0.5), batch_size=4)
    x, y = rng.standard_normal((4, 5)).astype(np.float32), np.array([0, 1, 2, 0])
    for _ in range(5):
        trainer.step(x, y)
    assert optimizer.lr == pytest.approx(0.025)  # step 4: 0.1 * 0.5**2
    trainer.save_checkpoint(tmp_path / "ckpt")
    again = Trainer(ours.build((5,)), optimizer=SGD(0.1), schedule=StepLR(0.1, 2, 0.5), batch_size=4)
    again.load_checkpoint(tmp_path / "ckpt")
    assert again.global_step == 5
