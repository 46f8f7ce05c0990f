"""The recipe's optimizer side: SGD with parameter groups, the linear scaling rule, warmup + decay, EMA of weights."""
import math
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data.errors import ConfigError

SCHEDULES = ("cosine", "step", "poly", "constant")


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
    """Decay after warmup: cosine (to 0 at the last step), step (x gamma at each milestone), poly (polynomial, to
    end_lr_factor at the last step; MLPerf's LARS schedule) or constant."""
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


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # ndim <= 1: BN scales and shifts, biases. Decaying them only hurts accuracy (Goyal et al., Jia et al.).
            (no_decay if p.ndim <= 1 and not cfg.decay_bn_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the scaled lr at optimizer step `step` (0-based), changing every iteration."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "poly":
        return cfg.end_lr_factor + (1 - cfg.end_lr_factor) * (1 - progress) ** cfg.power
    if cfg.name == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    # use_buffers: BN running statistics are averaged too, so the EMA model evaluates without recalibration.
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
