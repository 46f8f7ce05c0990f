"""The recipe: parameter groups, the linear scaling rule, per-iteration warmup and decay, EMA; LARS against its
definition, the large-batch preset and warning."""
import math

import pytest
import torch

from data.errors import ConfigError
from trainer.models import build_model
from trainer.optim import (
    OptimConfig,
    ScheduleConfig,
    build_ema,
    build_optimizer,
    build_scheduler,
    lr_factor,
    scaled_lr,
)


def test_no_weight_decay_on_bn_and_bias():
    model = build_model("resnet18", num_classes=10)
    opt = build_optimizer(model, OptimConfig(weight_decay=1e-4), lr=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    bn_and_bias = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} | {id(model.fc.bias)}
    assert bn_and_bias <= {id(p) for p in plain["params"]}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_linear_scaling_rule():
    assert scaled_lr(OptimConfig(lr=0.1), 256) == pytest.approx(0.1)
    assert scaled_lr(OptimConfig(lr=0.1), 8 * 2 * 256) == pytest.approx(1.6)


def test_warmup_then_cosine_per_iteration():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=5)
    spe, total = 100, 90 * 100
    assert lr_factor(cfg, 0, spe, total) == pytest.approx(1 / 500)
    assert lr_factor(cfg, 249, spe, total) == pytest.approx(0.5)
    assert lr_factor(cfg, 499, spe, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 500 + 4250, spe, total) == pytest.approx(0.5)
    assert lr_factor(cfg, total - 1, spe, total) == pytest.approx(0, abs=1e-6)


def test_step_decay_at_milestones():
    cfg = ScheduleConfig(name="step", warmup_epochs=0, milestones=[30, 60, 80], gamma=0.1)
    f = [lr_factor(cfg, epoch * 10, 10, 900) for epoch in (0, 29, 30, 59, 60, 80, 89)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])


def test_scheduler_drives_the_optimizer_and_round_trips():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(), lr=0.4)
    sched = build_scheduler(opt, ScheduleConfig(warmup_epochs=1), steps_per_epoch=4, total_steps=40)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[5] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 36)))
    opt2 = build_optimizer(model, OptimConfig(), lr=0.4)
    sched2 = build_scheduler(opt2, ScheduleConfig(warmup_epochs=1), steps_per_epoch=4, total_steps=40)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_ema_tracks_weights_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = build_ema(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
        model[1].running_mean.fill_(4.0)
    ema.update_parameters(model)  # the first update copies
    ema.update_parameters(model)
    assert torch.allclose(ema.module[0].weight, start + 2.0)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module[0].weight, start + 3.0)  # halfway between +2 and +4
    assert torch.allclose(ema.module[1].running_mean, torch.full((3,), 4.0))



def test_warmup_then_polynomial_decay():
    cfg = ScheduleConfig(name="poly", warmup_epochs=2, power=2.0, end_lr_factor=0.01)
    spe, total = 10, 20 * 10
    assert lr_factor(cfg, 0, spe, total) == pytest.approx(1 / 20)
    assert lr_factor(cfg, 19, spe, total) == pytest.approx(1.0)  # the last warmup step reaches the peak
    assert lr_factor(cfg, 20, spe, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 20 + 90, spe, total) == pytest.approx(0.01 + 0.99 * 0.5 ** 2)
    assert lr_factor(cfg, total - 1, spe, total) == pytest.approx(0.01 + 0.99 / 180 ** 2)
    assert lr_factor(cfg, total, spe, total) == pytest.approx(0.01)


@pytest.mark.parametrize("override, key", [(dict(power=0.0), "schedule.power"),
                                           (dict(end_lr_factor=1.0), "schedule.end_lr_factor")])
def test_bad_poly_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        ScheduleConfig(name="poly", **override)
    assert e.value.key == key
