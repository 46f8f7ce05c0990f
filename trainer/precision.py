"""train.precision: the names it takes, what each means for autocast and for the images the loader delivers, and
the one check that this machine can run it. The trainer, the evaluation tool and the benchmarks all read it here."""
import contextlib

import torch

from common.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
# fp32 runs without autocast.
AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The images the loader hands over: fp32 for fp32 training, the autocast dtype otherwise (half the bytes moved,
# and the first convolution would cast them anyway).
INPUT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The context the forward pass runs in."""
    dtype = AUTOCAST_DTYPE[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def check_device(precision: str) -> None:
    """fp16 trains with GradScaler, which needs CUDA; checked before any process group or data is touched."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision", "fp16 needs a CUDA device (GradScaler); on CPU use bf16 or fp32")
