"""Progressive resizing (data.resolution): the train crop's side as a pure function of the epoch, by FFCV's rule.

FFCV's ResNet-50 recipe trains at low resolution and ramps it up late in the run: `get_resolution` is min_res up to
start_ramp, np.interp to max_res at end_ramp, rounded to a multiple of 32, over 0-based epochs. Its six rn50 configs
(16 to 88 epochs) all put the ramp at start_ramp = 0.75 x epochs - 1 and end_ramp = 0.875 x epochs - 1 (11/13 of
16 ... 65/76 of 88). Here the ramp is a fraction of the run done at the end of the epoch, (epoch + 1) / epochs,
which is the same rule: start_ramp 0.75 and end_ramp 0.875 give FFCV's side at every epoch of all six, so one
preset stretches to any length. Every loader asks `train_side(epoch)` for the batches it makes, so the size
follows the epoch of the global batch being prepared, prefetching across an epoch boundary included, and no
pipeline is rebuilt when it changes.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional

import numpy as np

from common.errors import ConfigError

MAX_SIDE = 4096  # data.config.MAX_IMAGE_SIZE, kept here to avoid the import cycle


@dataclass
class ResolutionConfig:
    min_res: int = 160
    """Side of the train crop, in pixels, up to start_ramp (FFCV's rn50: 160)."""
    max_res: int = 192
    """Side of the train crop from end_ramp on (FFCV's rn50: 192). At least min_res."""
    start_ramp: float = 0.75
    """Fraction of the run done (at the end of an epoch) up to which the side is min_res: FFCV's rn50 configs, 0.75
    (their start_ramp = 0.75 x epochs - 1, in 0-based epochs)."""
    end_ramp: float = 0.875
    """Fraction of the run done from which the side is max_res: FFCV's rn50 configs, 0.875 (end_ramp = 0.875 x
    epochs - 1). At least start_ramp."""
    step: int = 32
    """Sides inside the ramp are rounded to a multiple of this (FFCV's 32). At most min_res."""

    def __post_init__(self):
        key = "data.resolution"
        if not 1 <= self.min_res <= MAX_SIDE:
            raise ConfigError(f"{key}.min_res", f"must be in [1, {MAX_SIDE}], got {self.min_res}")
        if not self.min_res <= self.max_res <= MAX_SIDE:
            raise ConfigError(f"{key}.max_res", f"must be in [min_res ({self.min_res}), {MAX_SIDE}], got "
                                                f"{self.max_res}")
        if not 0 <= self.start_ramp <= 1:
            raise ConfigError(f"{key}.start_ramp", f"is a fraction of train.epochs, in [0, 1], got {self.start_ramp}")
        if not self.start_ramp <= self.end_ramp <= 1:
            raise ConfigError(f"{key}.end_ramp", f"is a fraction of train.epochs, in [start_ramp "
                                                 f"({self.start_ramp}), 1], got {self.end_ramp}")
        if not 1 <= self.step <= self.min_res:
            raise ConfigError(f"{key}.step", f"must be in [1, min_res ({self.min_res})], got {self.step}")
        if int(np.round(self.max_res / self.step)) * self.step > MAX_SIDE:
            raise ConfigError(f"{key}.max_res", f"rounded to a multiple of step ({self.step}) it passes {MAX_SIDE}")


def train_side(epoch: int, *, epochs: int, resolution: Optional[ResolutionConfig], image_size: int) -> int:
    """The train crop's side in `epoch` (0-based) of a run of `epochs`: data.image_size without a schedule, else
    FFCV's get_resolution on the fraction of the run done at the epoch's end."""
    if resolution is None:
        return image_size
    done = (epoch + 1) / epochs
    if done <= resolution.start_ramp:
        return resolution.min_res
    if done >= resolution.end_ramp:
        return resolution.max_res
    side = np.interp(done, [resolution.start_ramp, resolution.end_ramp], [resolution.min_res, resolution.max_res])
    return int(np.round(side / resolution.step)) * resolution.step


def train_sides(cfg, epochs: Optional[int]) -> Callable[[int], int]:
    """epoch -> side for the data config `cfg` (picklable, for loader workers); `epochs` is the run's length, which
    data.resolution's ramp is a fraction of."""
    if cfg.resolution is not None and epochs is None:
        raise ValueError("data.resolution is set: build_loader needs the run's epochs (epochs=train.epochs)")
    return partial(train_side, epochs=epochs or 1, resolution=cfg.resolution, image_size=cfg.image_size)


def distinct_sides(cfg, epochs: int) -> List[int]:
    """Every side the run trains at, in order: one compiled graph each under train.compile."""
    side = train_sides(cfg, epochs)
    return sorted({side(epoch) for epoch in range(epochs)})
