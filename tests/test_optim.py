"""The recipe: parameter groups, the linear scaling rule, per-iteration warmup and decay, EMA; LARS against its
definition, the large-batch preset and warning."""
import io
import math

import pytest
import torch

from common.errors import ConfigError
from tests.helpers import ROOT
from trainer.config import load_config
from trainer.models import build_model
from trainer.optim import (
    OptimConfig,
    ScheduleConfig,
    build_ema,
    build_optimizer,
    build_scheduler,
    large_batch_warning,
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


def test_sgd_is_the_default_and_steps_as_before():
    model, reference = lars_model(), lars_model()
    opt = build_optimizer(model, OptimConfig(), lr=0.1)
    assert OptimConfig().name == "sgd" and type(opt) is torch.optim.SGD
    assert all("lars_adapt" not in group for group in opt.param_groups)  # the checkpoint's optimizer is unchanged
    decay = [p for p in reference.parameters() if p.ndim > 1]
    no_decay = [p for p in reference.parameters() if p.ndim <= 1]
    by_hand = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=0.1, momentum=0.9, nesterov=False, fused=True)  # fused: skips on the device
    for seed in (1, 2):
        for m, o in ((model, opt), (reference, by_hand)):
            set_grads(m, seed)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def lars_model():
    """A weight to adapt (ndim 2) next to a bias and a BN scale and shift (ndim 1), the same on every call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def lars_by_hand(w, g, v, lr, momentum, wd, eta, adapt, nesterov=False):
    """One step of MLPerf's LARS: trust = eta ||w|| / (||g|| + wd ||w||) scales lr on the decayed gradient, and
    the momentum buffer holds lr-scaled updates (TF's and MXNet's form); BN and bias are plain momentum SGD."""
    if adapt:
        trust = eta * w.norm() / (g.norm() + wd * w.norm())
        update = lr * trust * (g + wd * w)
    else:
        update = lr * g
    v = momentum * v + update
    return w - (momentum * v + update if nesterov else v), v


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_two_steps_match_its_definition(nesterov):
    cfg = OptimConfig(name="lars", momentum=0.9, nesterov=nesterov, weight_decay=5e-3, lars_eta=0.02)
    model = lars_model()
    opt = build_optimizer(model, cfg, lr=3.0)
    expected = {name: (p.detach().clone(), torch.zeros_like(p)) for name, p in model.named_parameters()}
    for seed, lr in ((1, 3.0), (2, 1.5)):  # a new lr on the second step: it scales the update, not the buffer
        set_grads(model, seed)
        for group in opt.param_groups:
            group["lr"] = lr
        for name, p in model.named_parameters():
            w, v = expected[name]
            expected[name] = lars_by_hand(w, p.grad, v, lr, 0.9, 5e-3 if name == "0.weight" else 0.0, 0.02,
                                          adapt=name == "0.weight", nesterov=nesterov)
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name][0], rtol=1e-6, atol=1e-7, msg=name)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected[name][1], rtol=1e-6, atol=1e-7)


def test_lars_leaves_bn_and_bias_unadapted_and_undecayed():
    model = lars_model()
    opt = build_optimizer(model, OptimConfig(name="lars", weight_decay=1e-4), lr=0.5)
    adapted, plain = opt.param_groups
    assert adapted["lars_adapt"] and adapted["weight_decay"] == 1e-4 and all(p.ndim > 1 for p in adapted["params"])
    assert not plain["lars_adapt"] and plain["weight_decay"] == 0 and all(p.ndim == 1 for p in plain["params"])
    set_grads(model, 3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for name in ("0.bias", "1.weight", "1.bias"):  # first step: the plain gradient step
        p = model.get_parameter(name)
        torch.testing.assert_close(p.detach(), before[name] - 0.5 * p.grad, rtol=0, atol=1e-7)


def test_lars_trust_ratio_is_one_where_a_norm_is_zero():
    layer = torch.nn.Linear(4, 2, bias=False)
    opt = build_optimizer(layer, OptimConfig(name="lars", momentum=0.0, weight_decay=0.1, lars_eta=1e-3), lr=2.0)
    with torch.no_grad():
        layer.weight.zero_()
    layer.weight.grad = torch.ones(2, 4)
    opt.step()  # ||w|| = 0: trust 1, the update is lr * (g + wd * 0)
    assert torch.equal(layer.weight.detach(), torch.full((2, 4), -2.0))
    layer.weight.grad = torch.zeros(2, 4)
    opt.step()  # ||g|| = 0: trust 1, only the decay acts
    torch.testing.assert_close(layer.weight.detach(), torch.full((2, 4), -2.0 * (1 - 2.0 * 0.1)))
    with torch.no_grad():
        layer.weight.zero_()
    opt.step()  # both zero: nothing moves, and no 0/0
    assert torch.equal(layer.weight.detach(), torch.zeros(2, 4))


def test_lars_step_needs_no_host_sync():
    # Meta tensors have no values: an .item(), a bool() or a Python `if` on a tensor raises. So a step that runs on
    # them never waits for the device, and a device-side skip of non-finite steps can wrap it later.
    model = lars_model().to("meta")
    opt = build_optimizer(model, OptimConfig(name="lars", nesterov=True), lr=0.5)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    assert all(opt.state[p]["momentum_buffer"].device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("unscaled_first", [True, False])
def test_gradscaler_hands_lars_the_skip_and_the_scale(unscaled_first):
    # GradScaler reads found_inf with .item() (a host sync, tests/test_sync_free.py) unless the optimizer takes
    # found_inf, and the scale where the gradients come to it still scaled, over itself; LARS does.
    model, reference = lars_model(), lars_model()
    opt = build_optimizer(model, OptimConfig(name="lars"), lr=0.5)
    reference_opt = build_optimizer(reference, OptimConfig(name="lars"), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    images = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        reference(images).pow(step + 1).sum().backward()
        reference_opt.step()
        reference_opt.zero_grad()
        scaler.scale(model(images).pow(step + 1).sum()).backward()
        if unscaled_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(images * torch.inf).sum()).backward()
    scaler.step(opt)  # skipped on the device
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 512.0


def test_lars_state_round_trips_through_a_checkpoint():
    model = lars_model()
    opt = build_optimizer(model, OptimConfig(name="lars"), lr=1.0)
    for seed in (1, 2):
        set_grads(model, seed)
        opt.step()
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)  # as the trainer loads checkpoints
    restored = lars_model()
    restored.load_state_dict(state["model"])
    restored_opt = build_optimizer(restored, OptimConfig(name="lars"), lr=1.0)
    restored_opt.load_state_dict(state["optimizer"])
    for m, o in ((model, opt), (restored, restored_opt)):
        set_grads(m, 3)
        o.step()
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("override, key", [
    (dict(name="adam"), "optim.name"), (dict(name="lars", lars_eta=0.0), "optim.lars_eta"),
    (dict(name="lars", lars_epsilon=-1.0), "optim.lars_epsilon"),
])
def test_bad_lars_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        OptimConfig(**override)
    assert e.value.key == key


def test_a_global_batch_beyond_what_sgd_is_known_to_handle_is_warned():
    assert large_batch_warning(OptimConfig(), 8192) is None
    warning = large_batch_warning(OptimConfig(), 4 * 8 * 512)
    assert "16384" in warning and "8192" in warning and "Goyal" in warning
    assert "--config configs/resnet50_imagenet_lars.yaml" in warning and "optim.name=lars" in warning


def test_a_global_batch_beyond_what_lars_is_known_to_handle_is_warned():
    assert large_batch_warning(OptimConfig(name="lars"), 65536) is None
    warning = large_batch_warning(OptimConfig(name="lars"), 131072)
    assert "131072" in warning and "67840" in warning and "MLPerf" in warning
    assert "use LARS" not in warning


def test_large_batch_preset_is_mlperfs_32k_lars():
    cfg = load_config(ROOT / "configs/resnet50_imagenet_lars.yaml", ["data.root=/x"])
    assert (cfg.optim.name, cfg.schedule.name, cfg.schedule.power) == ("lars", "poly", 2.0)
    # MLPerf's reference convergence point at 32768 images: lr 21.2, 16 warmup epochs, momentum 0.94, wd 2.5e-5.
    assert scaled_lr(cfg.optim, 32768) == pytest.approx(21.2)
    assert scaled_lr(cfg.optim, 32768) * cfg.schedule.end_lr_factor == pytest.approx(1e-4)
    assert (cfg.schedule.warmup_epochs, cfg.optim.momentum, cfg.optim.weight_decay) == (16, 0.94, 2.5e-5)
    assert (cfg.optim.lars_eta, cfg.optim.lars_epsilon, cfg.train.label_smoothing) == (1e-3, 0.0, 0.1)
    assert not cfg.optim.decay_bn_and_bias
    assert large_batch_warning(cfg.optim, 32768) is None


def triangular(peak_epoch=2.0) -> ScheduleConfig:
    return ScheduleConfig(name="triangular", warmup_epochs=0, peak_epoch=peak_epoch)


def test_triangular_rises_to_the_peak_epoch_then_falls_to_zero_at_the_end():
    """FFCV's get_cyclic_lr: np.interp(epoch, [0, peak, epochs], [1e-4, 1, 0]), evaluated at every iteration."""
    cfg, spe, total = triangular(2), 10, 16 * 10
    assert lr_factor(cfg, 0, spe, total) == pytest.approx(1e-4)
    assert lr_factor(cfg, 5, spe, total) == pytest.approx(1e-4 + (1 - 1e-4) * 0.25)  # a quarter up, mid-epoch 0
    assert lr_factor(cfg, 20, spe, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 20 + 70, spe, total) == pytest.approx(0.5)
    assert lr_factor(cfg, total - 1, spe, total) == pytest.approx(1 / 140)
    assert lr_factor(cfg, total, spe, total) == 0.0
    rising = [lr_factor(cfg, s, spe, total) for s in range(21)]
    falling = [lr_factor(cfg, s, spe, total) for s in range(20, total + 1)]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)


@pytest.mark.parametrize("epochs", [4, 16, 88])
def test_triangular_stretches_over_any_epoch_count(epochs):
    cfg, spe = triangular(2), 8
    total = epochs * spe
    assert lr_factor(cfg, 2 * spe, spe, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 2 * spe + (total - 2 * spe) // 2, spe, total) == pytest.approx(0.5)
    assert lr_factor(cfg, total, spe, total) == 0.0
    # A fractional peak lands between iterations.
    assert lr_factor(triangular(0.5), 2, spe, total) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)


def test_triangular_resumes_mid_schedule_with_the_same_lr():
    model = torch.nn.Linear(2, 2)
    spe, total = 4, 40

    def scheduler():
        opt = build_optimizer(model, OptimConfig(), lr=0.4)
        return opt, build_scheduler(opt, triangular(2), steps_per_epoch=spe, total_steps=total)

    opt, sched = scheduler()
    uninterrupted = []
    for _ in range(total):
        uninterrupted.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert uninterrupted == pytest.approx([0.4 * lr_factor(triangular(2), s, spe, total) for s in range(total)])
    assert max(uninterrupted) == pytest.approx(0.4) and uninterrupted.index(max(uninterrupted)) == 2 * spe

    opt, sched = scheduler()
    for _ in range(13):  # past the peak, mid-epoch
        opt.step()
        sched.step()
    opt2, sched2 = scheduler()  # as the trainer resumes: both state dicts, then the lr from the step alone
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 13 and 0.4 * sched2.lr_lambdas[0](sched2.last_epoch) == pytest.approx(uninterrupted[13])
    resumed = []
    for _ in range(13, total):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == uninterrupted[13:]


@pytest.mark.parametrize("overrides, key", [
    (["schedule.peak_epoch=0"], "schedule.peak_epoch"),
    (["schedule.peak_epoch=90"], "schedule.peak_epoch"),  # train.epochs is 90: the lr would never come down
    (["train.epochs=2"], "schedule.peak_epoch"),  # the default peak, 2, is no longer inside the run
    (["schedule.warmup_epochs=5"], "schedule.warmup_epochs"),
])
def test_bad_triangular_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["schedule.name=triangular", "schedule.warmup_epochs=0", *overrides])
    assert e.value.key == key


def test_triangular_with_ffcvs_peak_loads():
    cfg = load_config(None, ["schedule.name=triangular", "schedule.warmup_epochs=0", "train.epochs=16"])
    assert (cfg.schedule.name, cfg.schedule.peak_epoch) == ("triangular", 2.0)


@pytest.mark.parametrize("steps_per_epoch, epochs, peak_epoch", [(147, 5, 1.25), (10, 20, 6.0), (7, 3, 0.9)])
def test_onecycle_is_torchs_one_cycle_lr(steps_per_epoch, epochs, peak_epoch):
    total = steps_per_epoch * epochs
    cfg = ScheduleConfig(name="onecycle", warmup_epochs=0, peak_epoch=peak_epoch)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.4, total_steps=total, cycle_momentum=False,
                                                    pct_start=peak_epoch / epochs)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    ours = [0.4 * lr_factor(cfg, step, steps_per_epoch, total) for step in range(total)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_flat_cos_holds_then_anneals_to_zero_after_warmup():
    cfg = ScheduleConfig(name="flat_cos", warmup_epochs=1, decay_start=0.5)
    factors = [lr_factor(cfg, step, 10, 100) for step in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10:51] == [1.0] * 41
    assert factors[75] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(factors[50:], factors[51:]))
    assert lr_factor(cfg, 100, 10, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("overrides, key", [
    (["schedule.name=onecycle", "schedule.warmup_epochs=1"], "schedule.warmup_epochs"),
    (["schedule.name=onecycle", "schedule.warmup_epochs=0", "train.epochs=2"], "schedule.peak_epoch"),
    (["schedule.name=flat_cos", "schedule.decay_start=1"], "schedule.decay_start"),
])
def test_short_run_schedules_refuse_what_cannot_be(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.key == key


def test_adamw_decays_weights_only_decoupled_with_the_recipes_betas():
    cfg = load_config(None, ["optim.name=adamw", "optim.weight_decay=0.05", "optim.momentum=0.9"]).optim
    model = build_model("resnet20", num_classes=10)
    optimizer = build_optimizer(model, cfg, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["betas"] == (0.9, 0.99) and decay["eps"] == 1e-5 and decay["fused"]
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


def test_adamw_refuses_nesterov():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.name=adamw", "optim.nesterov=true"])
    assert e.value.key == "optim.nesterov"
