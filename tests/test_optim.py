import math

import pytest
import torch

from tl_core.config import ModelConfig, OptimConfig
from tl_core.models import build_model
from tl_core.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler, l1_penalty, lr_factor, param_groups

CLASSES = ["a", "b"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18"), CLASSES, image_size=32)


# An LR each optimizer is stable at: RMSprop at 0.01 moves every weight ~0.1 on its first steps (its square average
# starts at zero), and its loss then jumps by orders of magnitude and lands wherever rounding sends it.
STABLE_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3, "adagrad": 1e-3, "rmsprop": 1e-4}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18"), CLASSES, image_size=32)
    lr = STABLE_LR[name]
    opt = build_optimizer(model, OptimConfig(name=name, lr=lr, weight_decay=1e-4), backbone_lr_mult=0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4
    assert {g["name"]: g["lr"] for g in opt.param_groups}["backbone/decay"] == pytest.approx(lr / 2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_step_is_fused_where_torch_has_the_kernels_and_computes_what_the_loop_does(name):
    """On the CPU the fused step is several times faster (bench.optimizer_step) and must move the weights as the
    loop over tensors does."""
    torch.manual_seed(0)
    fused_model = build_model(ModelConfig(backbone="resnet18"), CLASSES, image_size=32)
    looped_model = build_model(ModelConfig(backbone="resnet18"), CLASSES, image_size=32)
    looped_model.load_state_dict(fused_model.state_dict())
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=1e-2)
    fused = build_optimizer(fused_model, cfg)
    assert bool(fused.defaults.get("fused")) is (name in ("adam", "adamw", "adagrad"))  # no fused RMSprop; SGD: see _sgd
    before = fused_model.conv1.weight.detach().clone()
    looped = build_optimizer(looped_model, cfg, fused=False)
    grads = [torch.randn_like(p) for p in fused_model.parameters()]
    for model, opt in ((fused_model, fused), (looped_model, looped)):
        for _ in range(3):  # the same gradients each step: the optimizers' arithmetic alone is compared
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for (key, a), b in zip(fused_model.state_dict().items(), looped_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(fused_model.conv1.weight, before)  # the steps moved the weights


def test_no_weight_decay_on_norms_and_biases_and_discriminative_lr(model):
    groups = {g["name"]: g for g in param_groups(model, lr=0.1, weight_decay=0.01, backbone_lr_mult=0.1)}
    assert set(groups) == {"backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["backbone/no_decay"]["params"]) >= ids([model.bn1.weight, model.bn1.bias, model.layer1[0].bn2.weight])
    assert ids(groups["head/no_decay"]["params"]) == ids([model.fc.linear.bias])
    assert ids(groups["head/decay"]["params"]) == ids([model.fc.linear.weight])
    assert groups["backbone/no_decay"]["weight_decay"] == 0 and groups["head/no_decay"]["weight_decay"] == 0
    assert groups["backbone/decay"]["weight_decay"] == 0.01
    assert groups["backbone/decay"]["lr"] == pytest.approx(0.01) and groups["head/decay"]["lr"] == 0.1
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_nesterov_momentum_reaches_sgd(model):
    opt = build_optimizer(model, OptimConfig(name="sgd", momentum=0.8, nesterov=True))
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.8


def f(step, schedule, **kw):
    args = dict(schedule=schedule, total_steps=100, warmup_steps=0, steps_per_epoch=10)
    return lr_factor(step, **{**args, **kw})


def test_linear_warmup_then_cosine():
    assert [f(s, "cosine", warmup_steps=10) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10, "cosine", warmup_steps=10) == pytest.approx(1.0)
    assert f(55, "cosine", warmup_steps=10) == pytest.approx(0.5)
    assert f(100, "cosine", warmup_steps=10) == pytest.approx(0.0)
    assert f(100, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_constant_step_and_onecycle():
    assert f(0, "constant") == f(99, "constant") == 1.0
    assert [f(s, "step", step_size=3, gamma=0.5) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    assert f(0, "onecycle") == pytest.approx(1 / 25)
    assert max(f(s, "onecycle") for s in range(100)) == pytest.approx(1.0)
    assert f(30, "onecycle") == pytest.approx(1.0) and f(99, "onecycle") < 0.01


def test_scheduler_steps_per_optimizer_step_and_restores(model):
    cfg = OptimConfig(lr=0.1, scheduler="cosine", warmup_epochs=1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[-1] < lrs[5]
    fresh_opt = build_optimizer(model, cfg)
    fresh = build_scheduler(fresh_opt, cfg, steps_per_epoch=4, epochs=3)
    fresh.load_state_dict(sched.state_dict())
    fresh_opt.load_state_dict(opt.state_dict())
    assert fresh_opt.param_groups[-1]["lr"] == pytest.approx(opt.param_groups[-1]["lr"])


def test_l1_penalty_covers_trainable_weights_only():
    lin = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    assert l1_penalty(lin).item() == pytest.approx(3.5)
    lin[0].weight.requires_grad_(False)
    assert l1_penalty(lin).item() == 0.0
    assert math.isfinite(l1_penalty(torch.nn.Linear(3, 3)).item())


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_is_a_valid_config_and_starts_at_the_base_lr_after_warmup(name):
    cfg = OptimConfig(name="sgd", lr=0.1, scheduler=name, warmup_epochs=1)
    model = torch.nn.Linear(2, 2)
    factors = [lr_factor(step, schedule=name, total_steps=100, warmup_steps=10, steps_per_epoch=10) for step in range(100)]
    assert all(0.0 <= f <= 1.0 + 1e-9 for f in factors)
    assert max(factors) == pytest.approx(1.0)
    scheduler = build_scheduler(torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg, steps_per_epoch=10, epochs=10)
    assert scheduler.get_last_lr()[0] <= cfg.lr
