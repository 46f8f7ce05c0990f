"""The ResNet family of He et al., "Deep Residual Learning for Image Recognition" (2015), and its plain nets.

Module and attribute names follow torchvision.models.resnet, so an ImageNet net with shortcut option B has exactly
torchvision's state_dict keys and loads into torchvision.models.resnetXX() (and back) unchanged. The other options
change only the shortcut entries: option A adds no `downsample` keys (it has no parameters), option C adds a
`downsample.0/1` projection to every block, and plain nets have no `downsample` keys at all.

Two of the variants of He et al., "Bag of Tricks for Image Classification with Convolutional Neural Networks"
(CVPR 2019, section 4.1 and Figure 2), follow timm's names (timm/models/resnet.py), so that ResNet-C and ResNet-D
together are timm's `resnet50d`, key for key:
- ResNet-C, `deep_stem`: the 7x7 stem conv becomes three 3x3 convs (32, 32, 64 filters, the first with stride 2),
  `conv1.0/1/3/4/6` (conv, BN, ReLU, conv, BN, ReLU, conv); the stem's last BN stays `bn1`.
- ResNet-D, shortcut option D: where the shape changes, a 2x2 average pool with the block's stride, then the
  stride-1 1x1 projection, `downsample.1/2` (`downsample.0` is the pool, or an identity at stride 1): the
  strided 1x1 of option B reads only one pixel in four and ignores three quarters of its input.
"""
from typing import List, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C", "D")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity, subsampled by the stride, with the extra output channels filled with zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Taking every stride-th pixel picks the same positions a stride-s 1x1 projection would.
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


def make_shortcut(option: str, in_channels: int, out_channels: int, stride: int) -> Optional[nn.Module]:
    """The shortcut module for one block; None means the plain identity."""
    changes_shape = stride != 1 or in_channels != out_channels
    if option == "C" or (option == "B" and changes_shape):
        return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    if option == "D" and changes_shape:
        # timm's downsample_avg: ceil_mode keeps an odd side's last row, count_include_pad=False averages it alone.
        pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity())
        return nn.Sequential(pool, conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))
    if option == "A" and changes_shape:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs; `shortcut=None` makes the plain block (no addition of the input). It takes stride_in_1x1 only
    to share Bottleneck's signature: with no 1x1 conv, the stride is always in the first 3x3."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, shortcut: Optional[str],
                 stride_in_1x1: bool = False):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = shortcut is not None
        self.downsample = make_shortcut(shortcut, in_channels, out_channels, stride) if self.residual else None
        self.stride = stride

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 (reduce), 3x3, 1x1 (expand by 4); the stride sits in the 3x3 (v1.5) or, with stride_in_1x1, the
    first 1x1 (v1)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, shortcut: Optional[str],
                 stride_in_1x1: bool = False):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes, stride if stride_in_1x1 else 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1 if stride_in_1x1 else stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = shortcut is not None
        self.downsample = make_shortcut(shortcut, in_channels, out_channels, stride) if self.residual else None
        self.stride = stride

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


Block = Type[Union[BasicBlock, Bottleneck]]


def deep_stem_convs(out_channels: int) -> nn.Sequential:
    """ResNet-C's stem before its last BN: three 3x3 convs, half the output filters in the first two (timm's
    stem_width=32 for 64), as the 7x7 conv it replaces costs about as much."""
    width = out_channels // 2
    return nn.Sequential(
        conv3x3(3, width, stride=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        conv3x3(width, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        conv3x3(width, out_channels))


class ResNet(nn.Module):
    """A stem, stages of blocks (the first block of every stage after the first halves the map and doubles the
    filters), global average pooling and a fully connected classifier."""

    def __init__(
        self,
        block: Block,
        depths: Sequence[int],
        stem: str,
        num_classes: int,
        shortcut: Optional[str],
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        deep_stem: bool = False,
    ):
        super().__init__()
        if stem == "imagenet":
            widths = [64 * 2**i for i in range(len(depths))]
            self.conv1 = (deep_stem_convs(widths[0]) if deep_stem else
                          nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False))
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # The paper's CIFAR-10 design keeps the 32x32 map in the stem: a 3x3 conv, no pooling.
            widths = [16 * 2**i for i in range(len(depths))]
            self.conv1 = conv3x3(3, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        in_channels = widths[0]
        for index, (depth, planes) in enumerate(zip(depths, widths)):
            blocks: List[nn.Module] = []
            for i in range(depth):
                stride = 2 if index > 0 and i == 0 else 1
                blocks.append(block(in_channels, planes, stride, shortcut, stride_in_1x1))
                in_channels = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual block then starts as relu(shortcut(x)), which helps very deep nets early in training.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> List[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (stem, block, blocks per stage); the plain nets reuse these with their shortcuts removed.
ARCHITECTURES = {
    "resnet18": ("imagenet", BasicBlock, (2, 2, 2, 2)),
    "resnet34": ("imagenet", BasicBlock, (3, 4, 6, 3)),
    "resnet50": ("imagenet", Bottleneck, (3, 4, 6, 3)),
    "resnet101": ("imagenet", Bottleneck, (3, 4, 23, 3)),
    "resnet152": ("imagenet", Bottleneck, (3, 8, 36, 3)),
    # CIFAR nets have 6n+2 weighted layers: n basic blocks in each of three stages.
    "resnet20": ("cifar", BasicBlock, (3, 3, 3)),
    "resnet32": ("cifar", BasicBlock, (5, 5, 5)),
    "resnet44": ("cifar", BasicBlock, (7, 7, 7)),
    "resnet56": ("cifar", BasicBlock, (9, 9, 9)),
    "resnet110": ("cifar", BasicBlock, (18, 18, 18)),
}
RESNET_NAMES = tuple(ARCHITECTURES)
PLAIN_NAMES = tuple(name.replace("resnet", "plain") for name in RESNET_NAMES)
MODEL_NAMES = RESNET_NAMES + PLAIN_NAMES


def architecture(name: str):
    """(stem, block, depths, plain) for a model name from MODEL_NAMES."""
    plain = name.startswith("plain")
    stem, block, depths = ARCHITECTURES[name.replace("plain", "resnet", 1) if plain else name]
    return stem, block, depths, plain


def option_errors(name: str, shortcut: Optional[str], stride_in_1x1: bool, zero_init_residual: bool,
                  num_classes: Optional[int], deep_stem: bool = False) -> List[tuple]:
    """(field, message) for every invalid choice; shared by build_model and ModelConfig so both say the same."""
    if name not in MODEL_NAMES:
        return [("name", f"got {name!r}; allowed: {', '.join(MODEL_NAMES)}")]
    errors = []
    stem, block, _, plain = architecture(name)
    if shortcut is not None and shortcut not in SHORTCUTS:
        errors.append(("shortcut", f"got {shortcut!r}; allowed: A, B, C, D, or null for the family default"))
    if deep_stem and stem != "imagenet":
        errors.append(("deep_stem", f"{name} has the CIFAR stem, a single 3x3 conv already; only the ImageNet nets "
                                    "(18/34/50/101/152) take it"))
    if plain and shortcut is not None:
        errors.append(("shortcut", f"{name} is a plain net without shortcuts; leave it null"))
    if plain and zero_init_residual:
        errors.append(("zero_init_residual",
                       f"{name} has no residual branch; zeroing its last BN would zero every block"))
    if stride_in_1x1 and block is not Bottleneck:
        errors.append(("stride_in_1x1",
                       f"{name} has basic blocks without a 1x1 conv; only bottleneck nets (50/101/152) take it"))
    if num_classes is not None and num_classes < 1:
        errors.append(("num_classes", f"must be >= 1, got {num_classes}"))
    return errors


def default_shortcut(name: str) -> Optional[str]:
    """B for the ImageNet nets, A for the CIFAR nets (as in the paper), None for plain nets."""
    stem, _, _, plain = architecture(name)
    if plain:
        return None
    return "B" if stem == "imagenet" else "A"


def resnet(name: str, num_classes: int, shortcut: Optional[str], stride_in_1x1: bool,
           zero_init_residual: bool, deep_stem: bool = False) -> ResNet:
    stem, block, depths, plain = architecture(name)
    if shortcut is None:
        shortcut = default_shortcut(name)
    return ResNet(block, depths, stem, num_classes, None if plain else shortcut, stride_in_1x1, zero_init_residual,
                  deep_stem)
