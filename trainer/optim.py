"""The recipe's optimizer side: SGD with parameter groups, the linear scaling rule, warmup + decay, EMA of weights."""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from data.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class OptimConfig:
    lr: float = 0.1
    """Learning rate per 256 images; the run uses lr x global_batch / 256 (Goyal et al.'s linear scaling rule)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay, applied to conv and linear weights only."""
    decay_bn_and_bias: bool = False
    """Also decay BN parameters and biases (off in the recipe)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights, evaluated separately; 0 turns it off."""

    def __post_init__(self):
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


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Decay after warmup: cosine (to 0 at the last step), step (x gamma at each milestone) or constant."""
    warmup_epochs: float = 5.0
    """Epochs of per-iteration linear warmup from 0 to the scaled lr."""
    milestones: List[int] = field(default_factory=lambda: [30, 60, 80])
    """Step decay: epochs at which the lr is multiplied by gamma."""
    gamma: float = 0.1
    """Step decay factor."""

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError("schedule.name", f"got {self.name!r}; allowed: {', '.join(SCHEDULES)}")
        if self.warmup_epochs < 0:
            raise ConfigError("schedule.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError("schedule.milestones", f"must be increasing positive epochs, got {list(self.milestones)}")
        if not 0 < self.gamma <= 1:
            raise ConfigError("schedule.gamma", f"must be in (0, 1], got {self.gamma}")


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # ndim <= 1: BN scales and shifts, biases. Decaying them only hurts accuracy (Goyal et al., Jia et al.).
            (no_decay if p.ndim <= 1 and not cfg.decay_bn_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused: one kernel per step, and it takes `found_inf`, so a step with non-finite gradients is skipped on the
    # device instead of the host asking the GPU first (trainer/nonfinite.py).
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    if cfg.momentum:
        # Fused SGD leaves a momentum buffer uninitialised when the first step is skipped (GradScaler's first
        # steps often are); zeros give the first real step exactly the lazy buffer's value, momentum x 0 + grad.
        for p in decay + no_decay:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the scaled lr at optimizer step `step` (0-based), changing every iteration."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.name == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))


def build_ema(model: nn.Module, decay: float, skipped: Optional[torch.Tensor] = None) -> AveragedModel:
    """An exponential moving average of `model`'s weights and buffers; a step whose `skipped` (a 0-dim device
    tensor, 1.0 for a skipped step) is set leaves it unchanged, without the host reading the flag."""

    @torch.no_grad()
    def update(ema: list, current: list, _) -> None:
        weight = 1 - decay if skipped is None else (1 - skipped) * (1 - decay)
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, weight)
        else:
            for e, c in zip(ema, current):
                e.copy_(e + (c - e) * weight)

    # use_buffers: BN running statistics are averaged too, so the EMA model evaluates without recalibration.
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
