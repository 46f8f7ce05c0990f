"""The torchvision backend: ImageFolder-style samples in the order of data/sharding.py, a torch DataLoader.

Every train sample's augmentation is drawn from its own seed (seed, epoch, position in the epoch's permutation),
not from the worker processes' RNG streams, so the batches do not depend on the worker count, a resumed loader
repeats them, and a sample draws the same augmentation whichever rank reads it.
"""
import multiprocessing
from functools import partial
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from data.config import DataConfig
from data.folder import ImageList
from data.loader import Loader
from data.sharding import derive_seed, epoch_permutation, train_positions, train_shard, val_shard

# Workers start from a forkserver (see the DataLoader below); preloading this module there makes each worker a
# cheap fork of a process that has already imported torch and torchvision, instead of a fresh interpreter.
multiprocessing.set_forkserver_preload(["data.torchvision_loader"])


def _transforms(cfg: DataConfig, train: bool, side: Optional[int] = None) -> v2.Compose:
    """`side`: the train crop's (data.resolution's side for the epoch; None is data.image_size)."""
    if train and cfg.train_crop == "pad_crop":
        geometry = [v2.RandomCrop(cfg.image_size, padding=cfg.pad, fill=0), v2.RandomHorizontalFlip()]
    elif train:
        geometry = [v2.RandomResizedCrop(side or cfg.image_size, scale=tuple(cfg.crop_area),
                                         ratio=tuple(cfg.crop_aspect), antialias=cfg.train_antialias),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(cfg.val_resize), v2.CenterCrop(cfg.val_crop)]
    to_tensor = [v2.PILToTensor()] if cfg.torchvision_decoder == "pil" else []
    return v2.Compose(geometry + to_tensor + [
        v2.ToDtype(torch.float32), v2.Normalize(mean=cfg.mean, std=cfg.std or [1.0, 1.0, 1.0]),
    ])


class _Images(Dataset):
    """Items are a file index (val) or (file index, augmentation seed, side) (train): the sampler, which runs in
    the main process, names the epoch's side, so the persistent workers need no word of the epoch."""

    def __init__(self, paths: List[str], labels: List[int], cfg: DataConfig, train: bool):
        self.paths, self.labels, self.cfg, self.train, self.decoder = paths, labels, cfg, train, cfg.torchvision_decoder
        self.val_transform = None if train else _transforms(cfg, False)
        self._by_side = {}  # train: one Compose per side, built in the worker that first meets it

    def _train_transform(self, side: int) -> v2.Compose:
        if side not in self._by_side:
            self._by_side[side] = _transforms(self.cfg, True, side)
        return self._by_side[side]

    def __len__(self):
        return len(self.paths)

    def _load(self, index: int):
        if self.decoder == "pil":
            with open(self.paths[index], "rb") as f:
                return Image.open(f).convert("RGB")
        # decode_image, not decode_jpeg: the loaders take PNG files too (ImageNet has one named .JPEG).
        return decode_image(read_file(self.paths[index]), mode=ImageReadMode.RGB)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed, side = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._train_transform(side)(self._load(index)), self.labels[index]
        return self.val_transform(self._load(item)), self.labels[item]


class _ResumableSampler(Sampler):
    """This rank's order for one epoch from batch `start` on, each index with its augmentation seed and the
    epoch's train side."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 side: Callable[[int], int]):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.side = seed, side
        self.epoch, self.start = 0, 0

    def __iter__(self):
        permutation = epoch_permutation(self.num_samples, self.seed, self.epoch)
        side = self.side(self.epoch)
        for position in train_positions(self.num_samples, self.batch_size, self.rank, self.world_size, self.start):
            yield int(permutation[position]), derive_seed(self.seed, self.epoch, position), side

    def __len__(self):
        return len(train_positions(self.num_samples, self.batch_size, self.rank, self.world_size, self.start))


def _to_device(device, dtype, memory_format, batch):
    images, labels = batch
    images = images.to(device, non_blocking=True).to(dtype=dtype, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


class TorchvisionLoader(Loader):
    backend = "torchvision"

    def __init__(self, cfg: DataConfig, split: str, images: ImageList, *, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int, channels_last: bool, dtype: torch.dtype,
                 train_side: Optional[Callable[[int], int]] = None):
        super().__init__(images.classes, split, len(images), batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.cfg = cfg
        self.device = device
        self._image_list = images
        paths, labels = images.paths(), images.labels
        train = split == "train"
        if train:
            self._sampler = _ResumableSampler(len(paths), batch_size, rank, world_size, seed, train_side)
            sampler = self._sampler
        else:
            sampler = list(self._order(None))
        workers = cfg.num_threads
        self._loader = DataLoader(
            _Images(paths, labels, cfg, train), batch_size=batch_size,
            sampler=sampler, drop_last=train, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=cfg.prefetch if workers else None,
            # fork() copies whatever locks other threads (DALI's, CUDA's) hold at that moment and can hang the
            # worker (it did in the tests); forkserver forks from a clean single-threaded process instead.
            multiprocessing_context="forkserver" if workers else None,
        )

        self._to_device = partial(_to_device, device, dtype,
                                  torch.channels_last if channels_last else torch.contiguous_format)

    def _order(self, epoch: Optional[int]) -> Sequence[int]:
        if epoch is None:
            return val_shard(self.num_samples, self.rank, self.world_size)
        return train_shard(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, epoch)

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        self._sampler.epoch, self._sampler.start = epoch, start
        return map(self._to_device, self._loader)

    def _val_epoch(self) -> Iterator:
        return map(self._to_device, self._loader)
