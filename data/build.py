"""build_loader: the one interface the trainer sees; it picks the backend named by cfg.backend (and cfg.format).

A Loader (data/loader.py) has `classes`, `__len__` (batches per epoch), `__iter__` (the rest of the current
epoch, as (images, labels) on the device) and, for train, `state_dict()`/`load_state_dict()`.
"""
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from data.config import DataConfig
from data.folder import ImageList, list_split
from data.image_files import bad_files_error, screen
from data.loader import Loader
from data.resolution import train_sides
from data.sharding import val_shard

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ensure_demo_data(cfg: DataConfig) -> None:
    """With data.demo, generates the demo dataset (or its shards) at data.root unless it is already there."""
    if cfg.demo and cfg.format == "webdataset":
        from data.make_shards import ensure_demo_shards
        ensure_demo_shards(Path(cfg.root))
    elif cfg.demo:
        from data.make_demo_dataset import ensure_demo_dataset
        ensure_demo_dataset(Path(cfg.root), seed=0)


def build_loader(cfg: DataConfig, split: str, *, batch_size: int, rank: int, world_size: int,
                 device: torch.device, seed: int, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, epochs: Optional[int] = None) -> Loader:
    """`channels_last` and `dtype` are the consumer's choice (the model's memory format and precision), so
    they are arguments, not data settings: images come out as NCHW tensors of `dtype` whose memory is
    channels_last (NHWC) when asked. `epochs` is the run's length, which data.resolution's ramp is a fraction of
    (needed with it only)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    placement = dict(batch_size=batch_size, rank=rank, world_size=world_size, device=device, seed=seed,
                     channels_last=channels_last, dtype=dtype,
                     train_side=train_sides(cfg, epochs) if split == "train" else None)
    if cfg.backend == "synthetic":
        from data.synthetic import SyntheticLoader
        return SyntheticLoader(cfg, split, **placement)
    if cfg.format == "webdataset":  # make_shards verified every image: no screen
        from data.shard_format import check_split
        from data.webdataset import WebDatasetLoader
        return WebDatasetLoader(cfg, split, check_split(cfg.root, split), **placement)
    images = list_split(cfg.root, split, cfg.file_list)
    _screen(images, split, rank, world_size, verified=split == "train" and cfg.file_list is not None)
    if cfg.backend == "torchvision":
        from data.torchvision_loader import TorchvisionLoader
        return TorchvisionLoader(cfg, split, images, **placement)
    from data.dali import DaliLoader
    return DaliLoader(cfg, split, images, **placement)


def _screen(images: ImageList, split: str, rank: int, world_size: int, verified: bool):
    """Raises a DataError naming the files the decoders must never see (not a JPEG or PNG, empty, unreadable).

    Each rank screens a share (every world_size-th train file, its own val slice), so a bad file fails one rank's
    build_loader: callers share the error between ranks (the trainer's `agree` does). The files of data.file_list
    passed data.verify's full check, and are not read again; a file truncated since then still fails on decoding,
    and the loader names it then.
    """
    if verified:
        return
    share = range(rank, len(images), world_size) if split == "train" else val_shard(len(images), rank, world_size)
    bad = screen([os.path.join(images.split_dir, images.files[i]) for i in share])
    if bad:
        raise bad_files_error(f"{images.split_dir} holds {len(bad)} file(s) the loader cannot use", bad,
                              images.split_dir)


def merge_states(states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Joins the train loader states of all ranks (e.g. from all_gather_object) into one dict every rank loads.

    Only the dali backend keeps per-rank state (its pipelines' checkpoints); the position is the same on all ranks.
    """
    merged = dict(states[0])
    checkpoints = {}
    for state in states:
        checkpoints.update(state.get("dali_checkpoints", {}))
    if checkpoints:
        merged["dali_checkpoints"] = checkpoints
    return merged
