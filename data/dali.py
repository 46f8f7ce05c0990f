"""DALI pipelines (one definition, decoding on the CPU or the GPU) and the resumable DALI loader.

Each train epoch gets its own pipeline over this rank's slices of that epoch's global permutation (files= /
labels=), seeded from (seed, rank, epoch): the order is a true per-epoch shuffle, and the pipeline's checkpoint
(reader position + every RNG) is all that is needed to continue an epoch mid-way on the same ranks. A checkpoint
cannot be re-split over other ranks: a loader restored under another world size or batch size instead starts a
pipeline over its slices of the rest of the epoch, seeded from (seed, rank, epoch, first batch).
"""
import base64
from functools import partial
from typing import Any, Dict, Iterator, Optional, Sequence

import torch
from nvidia.dali import fn, math, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from data.base import Loader
from data.config import DataConfig
from data.errors import DataError
from data.folder import ImageList
from data.sharding import derive_seed, train_shard, val_shard

READER = "reader"
# DALI has no bfloat16: such batches leave DALI as float32 and are cast by torch.
_DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}


def _centre(extent, size: int):
    """crop_pos (0..1) that puts the crop's first pixel at torchvision's round((extent - size) / 2)."""
    margin = extent - size
    half = margin // 2
    first = half + (half % 2) * (margin % 2)
    return fn.cast(first, dtype=types.FLOAT) / fn.cast(math.max(margin, 1), dtype=types.FLOAT)


def preprocess(jpegs, cfg: DataConfig, train: bool, gpu: bool, channels_last: bool, dtype: torch.dtype):
    """Encoded images to normalized crops, whatever reader produced them; `gpu` switches the decoder to `mixed`."""
    decoder = {"device": "mixed", "hw_decoder_load": cfg.hw_decoder_load} if gpu else {"device": "cpu"}
    size = cfg.image_size
    if train:
        # Decodes only the sampled window (RandomResizedCrop's area/aspect draw), not the whole JPEG.
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=cfg.crop_area,
                                               random_aspect_ratio=cfg.crop_aspect, num_attempts=10, **decoder)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR)
        mirror = fn.random.coin_flip(probability=0.5)
        crop_pos = {}
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        # Matches torchvision's Resize(int) + CenterCrop to the pixel: the long side is floored (DALI's
        # resize_shorter rounds it) and an odd margin is split with round-half-even, as Python's round().
        shape = fn.peek_image_shape(jpegs)
        height, width = shape[0], shape[1]
        shorter = math.min(height, width)
        out_height, out_width = height * cfg.val_resize // shorter, width * cfg.val_resize // shorter
        images = fn.resize(images, resize_x=fn.cast(out_width, dtype=types.FLOAT),
                           resize_y=fn.cast(out_height, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR)
        crop_pos = {"crop_pos_x": _centre(out_width, size), "crop_pos_y": _centre(out_height, size)}
        mirror = 0
    return fn.crop_mirror_normalize(
        images, crop=(size, size), mirror=mirror, **crop_pos, mean=cfg.mean, std=cfg.std or [1.0, 1.0, 1.0],
        dtype=_DALI_DTYPES[dtype], output_layout="HWC" if channels_last else "CHW",
    )


@pipeline_def(enable_checkpointing=True)
def image_pipeline(files, labels, cfg: DataConfig, train: bool, gpu: bool, channels_last: bool, dtype: torch.dtype):
    """Reads `files` in order and preprocesses them (`preprocess`)."""
    jpegs, labels = fn.readers.file(files=files, labels=labels, name=READER, pad_last_batch=not train)
    images = preprocess(jpegs, cfg, train, gpu, channels_last, dtype)
    return images, labels.gpu() if gpu else labels


def _to_torch(channels_last: bool, dtype: torch.dtype, outputs):
    batch = outputs[0]  # one pipeline
    images = batch["images"]
    if channels_last:
        images = images.permute(0, 3, 1, 2)  # logical NCHW over channels_last memory
    if images.dtype != dtype:
        images = images.to(dtype)
    return images, batch["labels"].view(-1).to(torch.int64)


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, cfg: DataConfig, split: str, images: ImageList, *, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int, channels_last: bool, dtype: torch.dtype):
        super().__init__(images.classes, split, len(images), batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.cfg = cfg
        self.device = device
        self.channels_last, self.dtype = channels_last, dtype
        self._to_torch = partial(_to_torch, channels_last, dtype)
        self._image_list = images
        self._paths = images.paths()
        self._labels = images.labels
        # DALI raised a decoding error with the batch that holds the file in the tests (CPU); the batches it
        # prefetches are checked too, in case another executor reports it earlier.
        self._decoded_ahead = cfg.prefetch
        self._gpu = device.type == "cuda"
        self._device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self._gpu else None
        self._iterator = None
        self._restore = None
        # The batch of the epoch the current pipeline's files begin at: 0, or where a re-split epoch resumed.
        self._first_batch = 0

    def _build(self, indices, seed: int, train: bool, checkpoint=None) -> DALIGenericIterator:
        pipe = image_pipeline(
            files=[self._paths[i] for i in indices], labels=[self._labels[i] for i in indices],
            cfg=self.cfg, train=train, gpu=self._gpu, channels_last=self.channels_last, dtype=self.dtype,
            batch_size=self.batch_size, num_threads=self.cfg.num_threads, device_id=self._device_id,
            seed=seed, prefetch_queue_depth=self.cfg.prefetch, checkpoint=checkpoint,
        )
        # DROP never triggers for train (the shard is whole batches); PARTIAL trims val's padded last batch.
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER, last_batch_policy=policy)

    def _order(self, epoch: Optional[int]) -> Sequence[int]:
        if epoch is None:
            return val_shard(self.num_samples, self.rank, self.world_size)
        return train_shard(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, epoch)

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        checkpoint, self._restore = self._restore, None
        # A checkpointed pipeline is rebuilt over the files it had; otherwise a new one begins at `start`.
        first = self._first_batch if checkpoint is not None else start
        self._first_batch = first
        indices = train_shard(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, epoch, first)
        seed = derive_seed(self.seed, self.rank, epoch, first) if first else derive_seed(self.seed, self.rank, epoch)
        self._iterator = self._build(indices, seed, True, checkpoint)
        return map(self._to_torch, self._iterator)

    def _close_source(self):
        super()._close_source()
        self._iterator = None

    def _val_epoch(self) -> Iterator:
        indices = self._order(None)
        if not indices:
            return
        yield from map(self._to_torch, self._build(indices, derive_seed(self.seed, self.rank), False))

    def _extra_state(self) -> Dict[str, Any]:
        # The checkpoint is this rank's (reader position and RNG states differ per rank): the trainer saves one
        # state per rank; loader.merge_states joins them for callers that keep a single dict.
        # base64 keeps the protobuf bytes a plain str for torch.load(weights_only=True).
        # Restored but not iterated since (a run resumed at its last step): the position is still the restored one.
        raw = self._restore if self._iterator is None else self._iterator.checkpoints()[0]
        if raw is None:  # restored under another split and not iterated since: there is only the position
            return {}
        return {"dali_checkpoints": {str(self.rank): base64.b64encode(raw).decode("ascii")},
                "dali_first_batch": self._first_batch}

    def _load_extra_state(self, state: Dict[str, Any]):
        if "dali_checkpoints" not in state:  # see _extra_state: the pipeline starts afresh at the position
            return
        checkpoints = state["dali_checkpoints"]
        if str(self.rank) not in checkpoints:
            raise DataError(
                f"the loader state holds DALI checkpoints for ranks {sorted(checkpoints, key=int)} but not for "
                f"rank {self.rank}: restore each rank from its own saved state "
                f"(or from data.loader.merge_states of all)"
            )
        self._restore = base64.b64decode(checkpoints[str(self.rank)])
        self._first_batch = state["dali_first_batch"]
