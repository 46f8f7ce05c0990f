"""Random batches already on the device, for measuring the model without any input pipeline cost."""
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from data.config import DataConfig
from data.loader import Loader
from data.sharding import derive_seed, val_shard


def _images(count: int, seed: int, device: torch.device, dtype: torch.dtype, memory_format, side: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, side, side, generator=generator)
    return images.to(device=device, dtype=dtype, memory_format=memory_format)


def _labels(num_classes: int, device: torch.device, *key: int, count: int) -> torch.Tensor:
    """Drawn on the device: a copy from host memory would make the host wait for the GPU's stream."""
    generator = torch.Generator(device).manual_seed(derive_seed(*key))
    return torch.randint(num_classes, (count,), generator=generator, device=device)


class SyntheticLoader(Loader):
    """One random image batch made once (per side, with data.resolution) and yielded every step, with labels
    drawn once per epoch (and per evaluation), so that a step makes nothing: its labels are a view of the epoch's.

    Labels come from a generator seeded by (seed, rank, epoch), so a resumed loader yields the same ones.
    """

    backend = "synthetic"

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, rank: int, world_size: int,
                 device: torch.device, seed: int, channels_last: bool, dtype: torch.dtype,
                 train_side: Optional[Callable[[int], int]] = None):
        classes = [f"class{i:04d}" for i in range(cfg.num_classes)]
        super().__init__(classes, split, cfg.synthetic_samples, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.device = device
        self._made = partial(_images, batch_size, derive_seed(seed, rank), device, dtype,
                             torch.channels_last if channels_last else torch.contiguous_format)
        self._side = train_side
        self._by_side = {}
        self._val_side = cfg.val_crop

        self._labels = partial(_labels, cfg.num_classes, device, seed, rank)

    def _images_of(self, side: int) -> torch.Tensor:
        if side not in self._by_side:
            self._by_side[side] = self._made(side)
        return self._by_side[side]

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        images = self._images_of(self._side(epoch))
        labels = self._labels(epoch, count=len(self) * len(images)).view(len(self), len(images))
        return ((images, labels[step]) for step in range(start, len(self)))

    def _val_epoch(self) -> Iterator:
        labels = self._labels(-1, count=len(val_shard(self.num_samples, self.rank, self.world_size)))
        for batch in labels.split(self.batch_size):
            yield self._images_of(self._val_side)[:len(batch)], batch
