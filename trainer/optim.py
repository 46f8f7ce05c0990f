"""The recipe's optimizer side: SGD or LARS with parameter groups, the linear scaling rule, warmup + decay, EMA of
weights."""
import copy
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError

OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "step", "poly", "constant", "triangular", "onecycle", "flat_cos")
# FFCV's get_cyclic_lr starts its ramp at 1e-4 x the peak lr, not at 0.
TRIANGULAR_START = 1e-4
# torch's OneCycleLR and fast.ai's fit_one_cycle: from lr / div_factor (25) up to lr, then down to
# lr / (div_factor x final_div_factor (1e4 in torch; fast.ai's div_final is 1e5)).
ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 25e4
# Schedules whose rise from a low lr is their own warmup.
RAMPED = ("triangular", "onecycle")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd (momentum SGD), lars (momentum SGD with a per-layer trust ratio, MLPerf's ResNet-50 optimizer for
    global batches beyond the ~8k that SGD's linear scaling rule is known to hold to) or adamw (Loshchilov and
    Hutter 2019: Adam with decoupled weight decay, beta1 = momentum, beta2 = adam_beta2; fast.ai's short
    Imagenette runs train with the Adam family)."""
    lr: float = 0.1
    """Learning rate per 256 images; the run uses lr x global_batch / 256 (Goyal et al.'s linear scaling rule)."""
    momentum: float = 0.9
    """Momentum (SGD and LARS)."""
    nesterov: bool = False
    """Nesterov momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay, applied to conv and linear weights only."""
    decay_bn_and_bias: bool = False
    """Also decay BN parameters and biases (off in the recipe); with lars, also scale their lr by the trust ratio."""
    lars_eta: float = 0.001
    """LARS trust coefficient eta: a layer's lr is multiplied by eta x ||w|| / (||g|| + weight_decay x ||w|| +
    lars_epsilon) (You et al. 2017; MLPerf's reference uses 0.001)."""
    lars_epsilon: float = 0.0
    """Added to the denominator of the LARS trust ratio; MLPerf's ResNet-50 runs log 0 (zero norms give a trust
    ratio of 1 regardless)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights, evaluated separately; 0 turns it off."""
    adam_beta2: float = 0.99
    """adamw: the decay of the squared-gradient average (torch's default 0.999; fast.ai's Adam uses 0.99, which
    follows a changing gradient scale faster in a short run)."""
    adam_eps: float = 1.0e-5
    """adamw: added to the root of the squared-gradient average (fast.ai's 1e-5; torch's default 1e-8)."""

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError("optim.name", f"got {self.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError("optim.lr", f"must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError("optim.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov", "needs optim.momentum > 0")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("optim.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.adam_beta2 < 1:
            raise ConfigError("optim.adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        if not self.adam_eps > 0:
            raise ConfigError("optim.adam_eps", f"must be positive, got {self.adam_eps}")
        if self.name == "adamw" and self.nesterov:
            raise ConfigError("optim.nesterov", "is SGD's and LARS's; adamw has no Nesterov variant here")
        if not self.lars_eta > 0:
            raise ConfigError("optim.lars_eta", f"must be positive, got {self.lars_eta}")
        if self.lars_epsilon < 0:
            raise ConfigError("optim.lars_epsilon", f"must be >= 0, got {self.lars_epsilon}")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Decay after warmup: cosine (to 0 at the last step), step (x gamma at each milestone), poly (polynomial, to
    end_lr_factor at the last step; MLPerf's LARS schedule), constant, triangular (FFCV's ResNet recipes:
    linear from 1e-4 x the lr up to the lr at peak_epoch, then linear down to 0 at the end of train.epochs),
    onecycle (Smith and Topin 2017 as torch's OneCycleLR and fast.ai's fit_one_cycle anneal it: a half cosine
    from lr / 25 up to the lr at peak_epoch, then one down to lr / 25e4 at the end), or flat_cos (fast.ai's
    fit_flat_cos: the lr held until decay_start of the run, then a half cosine to 0). triangular and onecycle
    ramp up on their own, so they take warmup_epochs=0."""
    warmup_epochs: float = 5.0
    """Epochs of per-iteration linear warmup from 0 to the scaled lr."""
    milestones: List[int] = field(default_factory=lambda: [30, 60, 80])
    """Step decay: epochs at which the lr is multiplied by gamma."""
    gamma: float = 0.1
    """Step decay factor."""
    power: float = 2.0
    """Poly decay: the exponent of (1 - progress); MLPerf's ResNet-50 LARS schedule uses 2."""
    end_lr_factor: float = 0.0
    """Poly decay: the lr reached at the end of the schedule, as a fraction of the scaled lr."""
    peak_epoch: float = 2.0
    """Triangular and onecycle: the epoch (fractional allowed) at which the lr peaks; in (0, train.epochs). FFCV's
    rn50 configs use 2; torch's OneCycleLR puts it at 0.3 of the run, fast.ai's fit_one_cycle at 0.25."""
    decay_start: float = 0.75
    """flat_cos: the fraction of the run after which the lr decays (fast.ai's fit_flat_cos pct_start, 0.75)."""

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError("schedule.name", f"got {self.name!r}; allowed: {', '.join(SCHEDULES)}")
        if self.warmup_epochs < 0:
            raise ConfigError("schedule.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError("schedule.milestones", f"must be increasing positive epochs, got {list(self.milestones)}")
        if not 0 < self.gamma <= 1:
            raise ConfigError("schedule.gamma", f"must be in (0, 1], got {self.gamma}")
        if not self.power > 0:
            raise ConfigError("schedule.power", f"must be positive, got {self.power}")
        if not 0 <= self.end_lr_factor < 1:
            raise ConfigError("schedule.end_lr_factor", f"must be in [0, 1), got {self.end_lr_factor}")
        if not self.peak_epoch > 0:
            raise ConfigError("schedule.peak_epoch", f"must be positive, got {self.peak_epoch}")
        if not 0 <= self.decay_start < 1:
            raise ConfigError("schedule.decay_start", f"must be in [0, 1), got {self.decay_start}")
        if self.name in RAMPED and self.warmup_epochs > 0:
            raise ConfigError("schedule.warmup_epochs", f"must be 0 with schedule.name={self.name}, got "
                                                        f"{self.warmup_epochs}: its ramp up to schedule.peak_epoch "
                                                        f"is the warmup")

    def check_epochs(self, epochs: int) -> None:
        """What needs train.epochs, which this config does not hold: the root config calls it."""
        if self.name in RAMPED and not self.peak_epoch < epochs:
            raise ConfigError("schedule.peak_epoch", f"must be below train.epochs={epochs} for the lr to come "
                                                     f"down again, got {self.peak_epoch}")


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / 256


class LARS(torch.optim.Optimizer):
    """Momentum SGD with layer-wise adaptive rate scaling, as in MLPerf's ResNet-50 reference.

    For each parameter w with gradient g in a group with `lars_adapt` (conv and linear weights):
        trust = eta * ||w|| / (||g|| + weight_decay * ||w|| + epsilon), or 1 where ||w|| or ||g|| is 0
        v <- momentum * v + lr * trust * (g + weight_decay * w)
        w <- w - v                      (nesterov: w <- w - (momentum * v + lr * trust * (g + weight_decay * w)))
    and the same without the trust ratio in the other groups (BN and bias, which the reference neither adapts nor
    decays). Unlike torch.optim.SGD, the buffer holds lr-scaled updates, as in the reference's TF and MXNet
    momentum: a new lr applies to new gradients, not to the velocity already gathered.

    Followed: mlcommons/training, image_classification/tensorflow2/lars_optimizer.py (LARSOptimizer.compute_lr,
    _resource_apply_dense) with the skip list of common.get_optimizer; You, Gitman and Ginsburg, "Large Batch
    Training of Convolutional Networks", arXiv:1708.03888.

    `step()` never reads a tensor's value on the host (zero norms are handled with torch.where), so it does not
    wait for the device; under GradScaler (fp16) it takes the scaler's found_inf and scale over as fused SGD does,
    instead of GradScaler reading found_inf with .item() to decide on the host.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
                 eta: float = 1e-3, epsilon: float = 0.0, lars_adapt: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      eta=eta, epsilon=epsilon, lars_adapt=lars_adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by the trainer (trainer/nonfinite.py), or by GradScaler.step under fp16: 1.0 when this step's
        # gradients are not finite. The step then changes nothing, decided on the device: the new values are
        # computed and the old ones put back.
        found_inf = getattr(self, "found_inf", None)
        # Set by GradScaler.step when the gradients come still scaled (no unscale_ first).
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            buffers = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(self.state[p]["momentum_buffer"])
            if found_inf is not None:
                before = [t.clone() for t in params + buffers]
            grads = [p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            # torch._foreach_*: a few kernels per group instead of several per tensor, as torch.optim's own
            # optimizers and clip_grad_norm_ do.
            if group["lars_adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["epsilon"])
                scale = list((lr * torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)).unbind())
            else:
                scale = lr
            updates = torch._foreach_add(grads, params, alpha=wd)  # new tensors: the gradients stay as they are
            torch._foreach_mul_(updates, scale)
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, updates)
            if group["nesterov"]:
                torch._foreach_add_(updates, buffers, alpha=momentum)
            torch._foreach_sub_(params, updates if group["nesterov"] else buffers)
            if found_inf is not None:
                skipped = found_inf.bool()
                for now, then in zip(params + buffers, before):
                    torch.where(skipped, then, now, out=now)
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # ndim <= 1: BN scales and shifts, biases. Decaying them only hurts accuracy (Goyal et al., Jia et al.).
            (no_decay if p.ndim <= 1 and not cfg.decay_bn_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "lars":
        # What the reference leaves undecayed it also leaves unadapted (its skip list: batch_normalization, bias).
        groups[0]["lars_adapt"], groups[1]["lars_adapt"] = True, False
        return LARS(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, eta=cfg.lars_eta,
                    epsilon=cfg.lars_epsilon)
    # Fused: one kernel per step, and it takes `found_inf`, so a step with non-finite gradients is skipped on the
    # device instead of the host asking the GPU first (trainer/nonfinite.py). AdamW's fused step takes it too, and
    # keeps its step count on the device.
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    if cfg.momentum:
        # Fused SGD leaves a momentum buffer uninitialised when the first step is skipped (GradScaler's first
        # steps often are); zeros give the first real step exactly the lazy buffer's value, momentum x 0 + grad.
        for p in decay + no_decay:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


class BatchLimit(NamedTuple):
    images: int
    """The largest global batch at which the optimizer is known to reach full ResNet-50 accuracy on ImageNet."""
    source: str
    advice: str


GLOBAL_BATCH_LIMITS = {
    "sgd": BatchLimit(8192, "Goyal et al. 2017, 'Accurate, Large Minibatch SGD': lr 0.1 x batch/256 with 5 warmup "
                            "epochs matches the 256-image accuracy up to 8k images",
                      "for larger batches use LARS: --config configs/resnet50_imagenet_lars.yaml, or optim.name=lars "
                      "with schedule.name=poly"),
    "lars": BatchLimit(67840, "MLPerf Training's ResNet-50 reference convergence points, mlcommons/logging "
                              "rcps_resnet.json, reach the target with LARS at up to 65536 and 67840 images",
                       "expect lower accuracy unless the lr, warmup, momentum and epochs are retuned"),
    "adamw": BatchLimit(2048, "Wightman et al. 2021, 'ResNet strikes back': its Adam-family ResNet-50 recipes (LAMB) "
                              "train at 2048 images; no AdamW ResNet-50 run at a larger batch is known to this "
                              "service",
                        "for larger batches use sgd with the linear scaling rule, or lars"),
}


def large_batch_warning(cfg: OptimConfig, global_batch: int) -> Optional[str]:
    """The warning for a `global_batch` beyond what optim.name is known to handle; None within the limit."""
    limit = GLOBAL_BATCH_LIMITS[cfg.name]
    if global_batch <= limit.images:
        return None
    return (f"a global batch of {global_batch} images is beyond the {limit.images} that optim.name={cfg.name} is "
            f"known to train ResNet-50 at ({limit.source}); {limit.advice}")


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the scaled lr at optimizer step `step` (0-based), changing every iteration. A pure function
    of the step: a resumed scheduler (its state is the step) goes on exactly where it stopped."""
    if cfg.name == "triangular":
        # FFCV's get_cyclic_lr at the step's fractional epoch. FFCV itself interpolates within each epoch between
        # that epoch's end points, which is the same wherever peak_epoch is a whole epoch.
        epochs = total_steps / steps_per_epoch
        return float(np.interp(step / steps_per_epoch, [0, cfg.peak_epoch, epochs], [TRIANGULAR_START, 1, 0]))
    if cfg.name == "onecycle":
        # torch's OneCycleLR's phases, which peak at step peak_epoch x steps_per_epoch - 1 (a float).
        peak, last = cfg.peak_epoch * steps_per_epoch - 1, total_steps - 1
        if step <= peak:
            return _cosine_between(ONECYCLE_START, 1.0, step / peak)
        return _cosine_between(1.0, ONECYCLE_END, min(1.0, (step - peak) / (last - peak)))
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "flat_cos":
        decay_start = max(warmup, round(cfg.decay_start * total_steps))
        return _cosine_between(1.0, 0.0, max(0.0, (step - decay_start) / max(1, total_steps - decay_start)))
    if cfg.name == "poly":
        return cfg.end_lr_factor + (1 - cfg.end_lr_factor) * (1 - progress) ** cfg.power
    if cfg.name == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def _cosine_between(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at 1 along a half cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))


class EMA(nn.Module):
    """An exponential moving average of a model's weights and buffers (BN statistics too, so the average evaluates
    without recalibration), laid out as torch's AveragedModel (`module.*` and `n_averaged`).

    Unlike AveragedModel, an update never makes the host wait for the device: whether it is the first (which
    copies) is known on the host, and a step the `skipped` flag (a 0-dim device tensor, 1.0 for a skipped step)
    marks leaves the average unchanged through the weight of the blend, not through a branch. That weight stays on
    the device, a Tensor operand of the foreach ops: _foreach_lerp_ has no Tensor-weight overload, and PyTorch's
    argument parser reads a 0-dim weight with .item().
    """

    def __init__(self, model: nn.Module, decay: float, skipped: Optional[torch.Tensor] = None):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=next(model.parameters()).device))
        self.decay, self.skipped = decay, skipped
        self._started = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if not self._started:
            torch._foreach_copy_(ours, theirs)
            self._started = True
        else:
            weight = 1 - self.decay if self.skipped is None else (1 - self.skipped) * (1 - self.decay)
            # average += weight x (model - average): a lerp, spelled out for the Tensor weight.
            floats = [(e, c) for e, c in zip(ours, theirs) if e.is_floating_point()]
            averages = [e for e, _ in floats]
            steps = torch._foreach_sub([c for _, c in floats], averages)
            torch._foreach_mul_(steps, weight)
            torch._foreach_add_(averages, steps)
            for e, c in zip(ours, theirs):
                if not e.is_floating_point():  # BN's num_batches_tracked
                    e.copy_(e + (c - e) * weight)
        self.n_averaged += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._started = bool(self.n_averaged > 0)  # once, on resume


def build_ema(model: nn.Module, decay: float, skipped: Optional[torch.Tensor] = None) -> EMA:
    return EMA(model, decay, skipped)
