"""Random batches already on the device, for measuring the model without any input pipeline cost."""
from typing import Iterator

import torch

from data.config import DataConfig
from data.sharding import EpochLoader, derive_seed, val_shard


class SyntheticLoader(EpochLoader):
    """One random image batch made once and yielded every step, with labels drawn per batch.

    Labels come from a generator seeded by (seed, epoch, rank, batch), so a resumed loader yields the same ones.
    """

    backend = "synthetic"

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, rank: int, world_size: int,
                 device: torch.device, seed: int):
        classes = [f"class{i:04d}" for i in range(cfg.num_classes)]
        super().__init__(classes, split, cfg.synthetic_samples, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.device = device
        generator = torch.Generator().manual_seed(derive_seed(seed, rank))
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
        memory_format = torch.channels_last if cfg.layout == "NHWC" else torch.contiguous_format
        self._images = images.to(device=device, dtype=getattr(torch, cfg.dtype), memory_format=memory_format)

    def _labels(self, count: int, *key: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, *key))
        return torch.randint(len(self.classes), (count,), generator=generator).to(self.device)

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        for step in range(start, len(self)):
            yield self._images, self._labels(self.batch_size, epoch, step)

    def _val_epoch(self) -> Iterator:
        left = len(val_shard(self.num_samples, self.rank, self.world_size))
        step = 0
        while left > 0:
            count = min(left, self.batch_size)
            yield self._images[:count], self._labels(count, -1, step)
            left -= count
            step += 1
