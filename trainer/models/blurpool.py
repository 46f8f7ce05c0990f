"""Anti-aliased downsampling (model.blurpool): a fixed low-pass blur before every strided convolution.

Zhang, "Making Convolutional Networks Shift-Invariant Again" (ICML 2019): subsampling without a low-pass filter
aliases, so the output jumps when the input shifts by a pixel. We follow FFCV's ResNet-50 (ffcv-imagenet,
train_imagenet.py: BlurPoolConv2d, apply_blurpool), not Zhang's full version: every nn.Conv2d with a stride > 1 and
at least 16 input channels gets a depthwise [1, 2, 1] x [1, 2, 1] / 16 blur (stride 1, zero padding 1) in front of
it. The stem conv (3 input channels), the max pool and option A's subsampling shortcut stay as they are.

The blur is a constant, not a weight: a non-persistent buffer, so a state dict holds only the wrapped conv's
weight, renamed `<name>.conv.weight`. That renaming makes a blurpool net's weights unloadable into torchvision's
ResNets (and torchvision's into it); with blurpool off nothing is wrapped and the keys are torchvision's.
"""
import torch
import torch.nn.functional as F
from torch import nn

MIN_IN_CHANNELS = 16  # FFCV's threshold; it leaves the 3-channel stem unblurred


def blur_kernel(channels: int) -> torch.Tensor:
    """The binomial [1, 2, 1] x [1, 2, 1] / 16 filter, once per channel, shaped for a depthwise conv2d."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(row, row) / 16).expand(channels, 1, 3, 3).clone()


class BlurPoolConv2d(nn.Module):
    """`conv` applied to its input blurred per channel; the same output shape as `conv` alone."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.register_buffer("blur_filter", blur_kernel(conv.in_channels).to(conv.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def needs_blur(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and max(module.stride) > 1 and module.in_channels >= MIN_IN_CHANNELS


def apply_blurpool(model: nn.Module) -> nn.Module:
    """Wraps, in place, every conv `needs_blur` picks; the conv keeps its weights, so a net built with the same
    seed has the same values with blurpool on or off."""
    for name, child in model.named_children():
        if needs_blur(child):
            setattr(model, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)
    return model
