"""The model component: its config and `build_model`, the one entry point the trainer uses."""
from dataclasses import dataclass
from typing import Optional

from torch import nn

from common.errors import ConfigError
from data.config import MAX_CLASSES
from trainer.models.blurpool import apply_blurpool
from trainer.models.resnet import MODEL_NAMES, option_errors, resnet

__all__ = ["MODEL_NAMES", "ModelConfig", "build_model", "model_options"]

OPTIONS = ("shortcut", "stride_in_1x1", "zero_init_residual", "blurpool", "deep_stem")


@dataclass
class ModelConfig:
    name: str = "resnet50"
    """Architecture: resnet18/34/50/101/152 (ImageNet), resnet20/32/44/56/110 (CIFAR), or plainNN for the same
    net without shortcuts."""
    shortcut: Optional[str] = None
    """Shortcut where the shape changes: A (zero-padded identity), B (1x1 projection), C (projection on every
    block), D (ResNet-D of He et al. 2019's Bag of Tricks: a 2x2 average pool, then a stride-1 1x1 projection);
    null keeps the family default, B for ImageNet nets and A for CIFAR nets. Plain nets take null only."""
    deep_stem: bool = False
    """ResNet-C (Bag of Tricks): three 3x3 convs (32, 32, 64 filters) instead of the 7x7 stem conv; ImageNet nets
    only. With shortcut=D it is timm's resnet50d, key for key."""
    stride_in_1x1: bool = False
    """Bottleneck nets: put the stride in the first 1x1 conv (v1, the paper and Keras) instead of the 3x3
    (v1.5, torchvision and NVIDIA)."""
    zero_init_residual: bool = False
    """Start the last BN scale of every residual block at 0, so each block begins as relu(shortcut(x))."""
    blurpool: bool = False
    """Blur ([1,2,1] x [1,2,1] / 16, per channel) the input of every strided conv with >= 16 input channels, against
    aliasing (Zhang 2019; FFCV's ResNet-50 recipe). Those convs' weights are then saved as `<name>.conv.weight`, so
    the weights no longer load into torchvision; off, the net is torchvision's."""
    num_classes: Optional[int] = None
    """Classifier outputs; null takes the number of classes from the dataset. At most 100000, like
    data.num_classes."""
    init_from: Optional[str] = None
    """Start from these weights: a torchvision state dict (.pt/.pth), a checkpoint of this trainer (its `model`) or
    a .safetensors export. Weights only: optimizer, schedule, step and data order start afresh. Ignored, with a
    notice, once run.dir has a checkpoint: resume wins."""
    init_head: bool = True
    """Take the classifier (fc) from model.init_from too; false starts it afresh, for fine-tuning on another
    dataset or class count."""

    def __post_init__(self):
        if self.num_classes is not None and self.num_classes > MAX_CLASSES:
            raise ConfigError("model.num_classes", f"must be <= {MAX_CLASSES}, got {self.num_classes}")
        errors = option_errors(self.name, self.shortcut, self.stride_in_1x1, self.zero_init_residual, self.num_classes,
                               self.deep_stem)
        if errors:
            field, message = errors[0]
            raise ConfigError(f"model.{field}", message)


def build_model(name: str, num_classes: int = 1000, **options) -> nn.Module:
    """The named net with `options` from OPTIONS (see ModelConfig for their meaning); ValueError for anything else."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; allowed: {', '.join(OPTIONS)}")
    shortcut = options.get("shortcut")
    stride_in_1x1 = bool(options.get("stride_in_1x1", False))
    zero_init_residual = bool(options.get("zero_init_residual", False))
    deep_stem = bool(options.get("deep_stem", False))
    errors = option_errors(name, shortcut, stride_in_1x1, zero_init_residual, num_classes, deep_stem)
    if errors:
        raise ValueError("; ".join(f"{field}: {message}" for field, message in errors))
    model = resnet(name, num_classes, shortcut, stride_in_1x1, zero_init_residual, deep_stem)
    return apply_blurpool(model) if options.get("blurpool", False) else model


def model_options(cfg: ModelConfig) -> dict:
    """build_model's options as a run's config sets them: what the trainer, evaluate and export build alike."""
    return {option: getattr(cfg, option) for option in OPTIONS}
