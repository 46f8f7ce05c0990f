"""DALI pipelines (one definition, decoding on the CPU or the GPU) and the resumable DALI loader.

A loader builds one train pipeline, and one val pipeline at its first evaluation, and keeps both: a new pipeline
costs decoder start-up, allocations and an empty prefetch queue, paid again at every epoch and evaluation
otherwise. A Python source hands DALI the paths and labels of each batch and DALI's threads read the files. The
train source never ends: DALI's iteration i is the run's global batch `base + i`, i.e. batch g % len of epoch
g // len, over this rank's slice of that epoch's global permutation (data/sharding.py), so prefetching runs on
across epoch boundaries. The pipeline is seeded from (seed, rank); its checkpoint (iteration + every RNG) and
`base` are all that is needed to continue on the same ranks, mid-epoch or at an epoch's end. A checkpoint cannot
be re-split over other ranks: a loader restored under another world size or batch size instead starts a pipeline
at its global position, seeded from (seed, rank, position). Nor is it restored into a pipeline of another definition
(DALI's documentation calls that undefined behaviour): the state records its pipeline's (`train_definition`), and a
loader whose pipeline differs (decoding on the GPU now, another output layout, ...) or a state that records none
starts a pipeline at its global position too, and says so.
"""
import base64
import os
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from nvidia.dali import fn, math, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from common.errors import DataError
from common.log import log
from data.config import DataConfig
from data.folder import ImageList
from data.loader import Loader
from data.sharding import derive_seed, train_batches, train_shard, val_shard

# Goes up when this file changes the train pipeline's operators: a checkpoint of the previous graph is not restored.
GRAPH_VERSION = 1
# DALI has no bfloat16: such batches leave DALI as float32 and are cast by torch.
_DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}
# The train decoder's nvJPEG and hardware-decoder buffers sized once for ImageNet's largest image, so that no later
# batch reallocates them: the values of DALI's ResNet-50 example (docs/examples/use_cases/pytorch/resnet50/main.py;
# DeepLearningExamples' ConvNets pass the same paddings). They cost 0.2 GB of device memory and 0.28 GB of pinned
# host memory per decoding thread, so, as in both examples, the val decoder (idle between evaluations) keeps
# DALI's defaults. Passed to the mixed decoder only (DALI 2.4's CPU decoders accept and ignore them).
_GPU_TRAIN_DECODER_BUFFERS = {"device_memory_padding": 211025920, "host_memory_padding": 140544512,
                              "preallocate_width_hint": 5980, "preallocate_height_hint": 6430}


def _centre(extent, size: int):
    """crop_pos (0..1) that puts the crop's first pixel at torchvision's round((extent - size) / 2)."""
    margin = extent - size
    half = margin // 2
    first = half + (half % 2) * (margin % 2)
    return fn.cast(first, dtype=types.FLOAT) / fn.cast(math.max(margin, 1), dtype=types.FLOAT)


def _pad_crop(images, jpegs, cfg: DataConfig):
    """torchvision's RandomCrop(image_size, padding=pad): a window of image_size at a uniform offset of the image
    zero-padded by `pad` on every side (He et al.'s CIFAR augmentation), without building the padded copy."""
    shape = fn.peek_image_shape(jpegs)
    starts = []
    for extent in (shape[0], shape[1]):
        margin = math.max(fn.cast(extent, dtype=types.INT32) + (2 * cfg.pad - cfg.image_size), 0)
        offset = math.floor(fn.random.uniform(range=[0.0, 1.0]) * fn.cast(margin + 1, dtype=types.FLOAT))
        starts.append(fn.cast(offset, dtype=types.INT32) - cfg.pad)
    return fn.slice(images, start=fn.stack(*starts), shape=[cfg.image_size, cfg.image_size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def _decoder(cfg: DataConfig, gpu: bool, train: bool) -> Dict[str, Any]:
    if not gpu:
        return {"device": "cpu"}
    return {"device": "mixed", "hw_decoder_load": cfg.hw_decoder_load, **(_GPU_TRAIN_DECODER_BUFFERS if train else {})}


def _normalize(cfg: DataConfig, channels_last: bool, dtype: torch.dtype) -> Dict[str, Any]:
    return {"mean": list(cfg.mean), "std": list(cfg.std or [1.0, 1.0, 1.0]), "dtype": _DALI_DTYPES[dtype],
            "output_layout": "HWC" if channels_last else "CHW"}


def _train_crop(jpegs, cfg: DataConfig, decoder: dict, side):
    if cfg.train_crop == "pad_crop":
        return _pad_crop(fn.decoders.image(jpegs, output_type=types.RGB, **decoder), jpegs, cfg)
    # Decodes only the sampled window (RandomResizedCrop's area/aspect draw), not the whole JPEG.
    images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=cfg.crop_area,
                                           random_aspect_ratio=cfg.crop_aspect, num_attempts=10, **decoder)
    return fn.resize(images, resize_x=side, resize_y=side, interp_type=types.INTERP_LINEAR,
                     antialias=cfg.train_antialias)


def preprocess(jpegs, cfg: DataConfig, train: bool, gpu: bool, channels_last: bool, dtype: torch.dtype, sides=None):
    """Encoded images to normalized crops, whatever reader produced them; `gpu` switches the decoder to `mixed`.
    `sides`: the train crop's side per sample (data.resolution), an input of the pipeline, so that one pipeline
    serves every side; None is data.image_size."""
    decoder = _decoder(cfg, gpu, train)
    size = cfg.val_crop
    if train:
        images = _train_crop(jpegs, cfg, decoder, cfg.image_size if sides is None else sides)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        # Matches torchvision's Resize(int) + CenterCrop to the pixel: the long side is floored (DALI's
        # resize_shorter rounds it) and an odd margin is split with round-half-even, as Python's round().
        shape = fn.peek_image_shape(jpegs)
        height, width = shape[0], shape[1]
        shorter = math.min(height, width)
        out_height, out_width = height * cfg.val_resize // shorter, width * cfg.val_resize // shorter
        # One fused op resizes only the centre window that is kept, not the whole image: 1.3x cheaper on
        # photographs, and 0.008% of the values move by one level (docs/performance.md).
        images = fn.resize_crop_mirror(
            images, resize_x=fn.cast(out_width, dtype=types.FLOAT), resize_y=fn.cast(out_height, dtype=types.FLOAT),
            interp_type=types.INTERP_LINEAR, crop=(size, size), crop_pos_x=_centre(out_width, size),
            crop_pos_y=_centre(out_height, size))
        mirror = 0
    return fn.crop_mirror_normalize(images, mirror=mirror, **_normalize(cfg, channels_last, dtype))


def train_definition(cfg: DataConfig, gpu: bool, channels_last: bool, dtype: torch.dtype) -> Dict[str, Any]:
    """What `preprocess` makes of the train images, as the arguments of its operators: with the reader's, what
    defines a train pipeline, which a pipeline checkpoint is only restored into. Flat, plain values (saved in a
    loader state); the side is an input of the pipeline with data.resolution."""
    if cfg.train_crop == "pad_crop":
        crop = {"train_crop": "pad_crop", "pad": cfg.pad}
    else:
        crop = {"train_crop": "random_resized", "crop_area": list(cfg.crop_area),
                "crop_aspect": list(cfg.crop_aspect), "antialias": cfg.train_antialias}
    normalize = _normalize(cfg, channels_last, dtype)
    return {**{f"decoder.{k}": v for k, v in _decoder(cfg, gpu, True).items()}, **crop,
            "side": "per sample" if cfg.resolution is not None else cfg.image_size,
            **normalize, "dtype": normalize["dtype"].name}


def pipeline_change(saved: Optional[Dict[str, Any]], current: Dict[str, Any]) -> Optional[str]:
    """What differs between the pipeline a loader state recorded (None: one saved before states recorded it) and
    this loader's, in words; None when they are the same, and only then may its checkpoint be restored."""
    if saved is None:
        return "the loader state does not record its DALI pipeline (it was saved by an earlier version)"
    keys = [k for k in {**saved, **current} if saved.get(k) != current.get(k)]
    if not keys:
        return None
    listed = ", ".join(f"{k} {saved.get(k)!r} (now {current.get(k)!r})" for k in keys)
    return f"the DALI train pipeline differs from the one the loader state was saved with: {listed}"


@pipeline_def
def image_pipeline(source, cfg: DataConfig, train: bool, gpu: bool, channels_last: bool, dtype: torch.dtype):
    """Reads the files `source` names (called with a BatchInfo, it returns a batch of encoded paths and labels)
    and preprocesses them (`preprocess`)."""
    sides = None
    if train and cfg.resolution is not None:  # the source adds each sample's side (_TrainFiles)
        paths, labels, sides = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                  dtype=[types.UINT8, types.INT32, types.FLOAT])
    else:
        paths, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                           dtype=[types.UINT8, types.INT32])
    jpegs = fn.io.file.read(paths, dont_use_mmap=not cfg.mmap)
    images = preprocess(jpegs, cfg, train, gpu, channels_last, dtype, sides)
    return images, labels.gpu() if gpu else labels


def _files(paths: List[str], labels: np.ndarray, indices: np.ndarray):
    return [np.frombuffer(os.fsencode(paths[i]), dtype=np.uint8) for i in indices], labels[indices]


class _TrainFiles:
    """The train pipeline's source: DALI's iteration i is the run's global batch `base + i`. A pipeline restored
    from a checkpoint calls it on from the checkpoint's iteration (fn.external_source's documentation), so the
    checkpoint and `base` place it. Holds the file list, never the loader (see Loader's docstring on cycles).
    With `side` (data.resolution: epoch -> side) each batch also carries its epoch's side, so a batch prefetched
    across an epoch boundary has the next epoch's, and the checkpoint's iteration places the side too."""

    def __init__(self, paths: List[str], labels: np.ndarray, num_samples: int, batch_size: int, rank: int,
                 world_size: int, seed: int, base: int, side: Optional[Callable[[int], int]] = None):
        self.paths, self.labels, self.base, self.side = paths, labels, base, side
        self.shard = partial(train_shard, num_samples, batch_size, rank, world_size, seed)
        self.batches, self.batch_size = train_batches(num_samples, batch_size, world_size), batch_size
        self.epoch, self.order = None, None

    def __call__(self, info: types.BatchInfo):
        epoch, batch = divmod(self.base + info.iteration, self.batches)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, self.shard(epoch)
        files = _files(self.paths, self.labels, self.order[batch * self.batch_size:(batch + 1) * self.batch_size])
        if self.side is None:
            return files
        return (*files, np.full(len(files[1]), self.side(epoch), dtype=np.float32))


class _ValFiles:
    """The val pipeline's source: this rank's val slice in batches, the last one shorter, then the pass's end."""

    def __init__(self, paths: List[str], labels: np.ndarray, indices: Sequence[int], batch_size: int):
        self.paths, self.labels, self.indices, self.batch_size = paths, labels, np.asarray(indices), batch_size

    def __call__(self, info: types.BatchInfo):
        indices = self.indices[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        if not len(indices):
            raise StopIteration
        return _files(self.paths, self.labels, indices)


def _to_torch(channels_last: bool, dtype: torch.dtype, outputs):
    batch = outputs[0]  # one pipeline
    images = batch["images"]
    if channels_last:
        images = images.permute(0, 3, 1, 2)  # logical NCHW over channels_last memory
    if images.dtype != dtype:
        images = images.to(dtype)
    return images, batch["labels"].view(-1).to(torch.int64)


def rank_checkpoint(state: Dict[str, Any], rank: int) -> bytes:
    """This rank's pipeline checkpoint from a loader state's `dali_checkpoints` (one per rank, base64, so that the
    protobuf bytes stay a plain str for torch.load(weights_only=True))."""
    checkpoints = state["dali_checkpoints"]
    if str(rank) not in checkpoints:
        raise DataError(
            f"the loader state holds DALI checkpoints for ranks {sorted(checkpoints, key=int)} but not for "
            f"rank {rank}: restore each rank from its own saved state (or from data.build.merge_states of all)"
        )
    return base64.b64decode(checkpoints[str(rank)])


def _take(iterator: DALIGenericIterator, count: int, to_torch) -> Iterator:
    for _ in range(count):
        yield to_torch(next(iterator))


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, cfg: DataConfig, split: str, images: ImageList, *, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int, channels_last: bool, dtype: torch.dtype,
                 train_side: Optional[Callable[[int], int]] = None):
        super().__init__(images.classes, split, len(images), batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.cfg = cfg
        self._side = train_side if cfg.resolution is not None else None
        self.device = device
        self.channels_last, self.dtype = channels_last, dtype
        self._to_torch = partial(_to_torch, channels_last, dtype)
        self._image_list = images
        self._paths = images.paths()
        self._labels = np.asarray(images.labels, dtype=np.int32)
        # DALI raised a decoding error with the batch that holds the file in the tests (CPU); the batches it
        # prefetches are checked too, in case another executor reports it earlier.
        self._decoded_ahead = cfg.prefetch
        self._gpu = device.type == "cuda"
        self._device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self._gpu else None
        # The train pipeline, kept across epochs; it reads on from where the loader stands: the epoch's end
        # closes the loader's source only after every batch of it was taken, and load_state_dict drops it.
        self._train: Optional[DALIGenericIterator] = None
        self._base = 0  # the global batch the train pipeline's iteration 0 reads
        self._restore: Optional[bytes] = None  # a checkpoint to build the train pipeline from
        self._definition = {"graph": GRAPH_VERSION, "mmap": cfg.mmap,
                            **train_definition(cfg, self._gpu, channels_last, dtype)}
        self._val: Optional[DALIGenericIterator] = None
        self._val_pass_open = False

    def _iterator(self, source, train: bool, seed: int, checkpoint: Optional[bytes] = None) -> DALIGenericIterator:
        pipe = image_pipeline(
            source=source, cfg=self.cfg, train=train, gpu=self._gpu, channels_last=self.channels_last,
            dtype=self.dtype, batch_size=self.batch_size, num_threads=self.cfg.num_threads,
            device_id=self._device_id, seed=seed, prefetch_queue_depth=self.cfg.prefetch,
            enable_checkpointing=train, checkpoint=checkpoint,
        )
        # Without a reader the iterator runs until the source ends (val: the pass; train: never) and passes each
        # batch as the source made it, val's shorter last one included. auto_reset readies the next pass at once.
        return DALIGenericIterator([pipe], ["images", "labels"], auto_reset=not train)

    def _order(self, epoch: Optional[int]) -> Sequence[int]:
        if epoch is None:
            return val_shard(self.num_samples, self.rank, self.world_size)
        return train_shard(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, epoch)

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        if self._train is None:
            checkpoint, self._restore = self._restore, None
            if checkpoint is None:  # a new pipeline begins where the loader stands
                self._base = epoch * len(self) + start
            seed = derive_seed(self.seed, self.rank, self._base) if self._base else derive_seed(self.seed, self.rank)
            files = _TrainFiles(self._paths, self._labels, self.num_samples, self.batch_size, self.rank,
                                self.world_size, self.seed, self._base, self._side)
            self._train = self._iterator(files, True, seed, checkpoint)
        return _take(self._train, len(self) - start, self._to_torch)

    def _val_epoch(self) -> Iterator:
        indices = self._order(None)
        if not indices:
            return
        if self._val is None or self._val_pass_open:
            # A pass left before its end (the trainer shows one val batch on W&B) leaves DALI mid-epoch, where its
            # iterator cannot be reset: a new pipeline starts the next pass.
            files = _ValFiles(self._paths, self._labels, indices, self.batch_size)
            self._val = self._iterator(files, False, derive_seed(self.seed, self.rank))
        self._val_pass_open = True
        yield from map(self._to_torch, self._val)
        self._val_pass_open = False

    def load_state_dict(self, state: Dict[str, Any]):
        self._train, self._restore = None, None  # it read on from another position
        super().load_state_dict(state)

    def _extra_state(self) -> Dict[str, Any]:
        # The checkpoint is this rank's (RNG states differ per rank): the trainer saves one state per rank;
        # loader.merge_states joins them for callers that keep a single dict. base64 keeps the protobuf bytes a
        # plain str for torch.load(weights_only=True). Restored but not iterated since (a run resumed at its last
        # step): the checkpoint is still the restored one.
        raw = self._restore if self._train is None else self._train.checkpoints()[0]
        if raw is None:  # not iterated yet, or restored under another split since: there is only the position
            return {}
        return {"dali_checkpoints": {str(self.rank): base64.b64encode(raw).decode("ascii")},
                "dali_base": self._base, "dali_pipeline": self._definition}

    def _load_extra_state(self, state: Dict[str, Any]):
        # Without dali_base: no checkpoint (see _extra_state), or one of a per-epoch pipeline over
        # fn.readers.file (before this loader kept its pipelines), which this pipeline cannot restore. The
        # pipeline then starts afresh at the position: the same samples, other augmentation draws. So it does
        # when the checkpoint is another pipeline's.
        if "dali_base" not in state:
            return
        change = pipeline_change(state.get("dali_pipeline"), self._definition)
        if change:
            log.info(f"{change}: its checkpoint is not restored into this one; a new pipeline reads on from the "
                     f"saved position (epoch {self._epoch}, batch {self._done}), each remaining image once, with "
                     f"other augmentation draws than an uninterrupted run (exact in coverage, not bitwise)")
            return
        self._restore = rank_checkpoint(state, self.rank)
        self._base = state["dali_base"]
