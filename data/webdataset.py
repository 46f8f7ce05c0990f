"""The webdataset loader (data.format=webdataset): the shards of data.make_shards, read by DALI's webdataset reader
and preprocessed by the folder pipeline's own `preprocess`.

Each loader keeps one pipeline for its whole life and the reader goes on from epoch to epoch by itself. DALI splits
the samples of all shards, in stored order, into world_size contiguous slices; train rank r reads slice (r + e) mod
world_size in its epoch e (the reader's shard rotation: stick_to_shard=False), through a shuffle buffer of
data.shuffle_buffer samples seeded per rank. make_shards shuffled the train samples once across the shards, so a
slice is a random part of the dataset, but there is no global permutation per epoch as with folders: samples far
apart in a slice never meet in one batch. (DALI's shuffle_after_epoch reorders the tar files instead but keeps each
rank's slice where it is, so with fewer tar files than ranks a rank would read the same samples every epoch.)

The pipeline's checkpoint (reader position, shuffle buffer, every RNG) continues an epoch bitwise on the same world
size and batch size. It cannot be re-split over other ranks, nor restored into a pipeline of another definition
(data.dali's `train_definition`: decoding on the GPU now, another output layout, ...): mid-epoch such a resume is
refused; at an epoch's start the new ranks start a fresh reader seeded from (seed, rank, epoch), exact in coverage.
"""
import base64
import math
import re
from functools import partial
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from common.errors import DataError
from common.log import log
from data.config import DataConfig
from data.dali import GRAPH_VERSION, _to_torch, pipeline_change, preprocess, rank_checkpoint, train_definition
from data.loader import Loader
from data.shard_format import LABEL_EXT, SplitShards, index_sample
from data.sharding import derive_seed

# Digits of the longest label a .cls may hold; 10**8 still fits the int32 sum below.
READER = "shards"
LABEL_DIGITS = 9
_PLACE_VALUES = np.array([10 ** (LABEL_DIGITS - 1 - i) for i in range(LABEL_DIGITS)], dtype=np.int32)
_INDEX_LINE = re.compile(r'index file at "([^"]+)" line (\d+)')


def parse_label(cls):
    """The ASCII decimal integer of each sample's .cls as an int32, or -1 where it is not one: DALI has no string to
    number operator, so the digits are left-padded with '0' to a fixed width and weighted by their place values."""
    length = cls.shape(dtype=types.INT32)[0]
    padded = fn.slice(cls, start=length - LABEL_DIGITS, shape=[LABEL_DIGITS], axes=[0],
                      out_of_bounds_policy="pad", fill_values=ord("0"))
    digits = fn.cast(padded, dtype=types.INT32) - ord("0")
    value = fn.reductions.sum(digits * types.Constant(_PLACE_VALUES), dtype=types.INT32)
    valid = ((fn.reductions.min(digits) >= 0) & (fn.reductions.max(digits) <= 9) & (length >= 1)
             & (length <= LABEL_DIGITS))
    return fn.cast(valid, dtype=types.INT32) * (value + 1) - 1


class _Sides:
    """The train pipeline's side source (data.resolution): DALI's iteration i reads the reader's epoch
    first_epoch + i // reader_batches, every reader epoch being reader_batches long; a restored pipeline calls it
    on from the checkpoint's iteration, as it does the folder pipeline's source."""

    def __init__(self, side: Callable[[int], int], first_epoch: int, reader_batches: int, batch_size: int):
        self.side, self.first_epoch, self.reader_batches = side, first_epoch, reader_batches
        self.batch_size = batch_size

    def __call__(self, info: types.BatchInfo):
        epoch = self.first_epoch + info.iteration // self.reader_batches
        return np.full(self.batch_size, self.side(epoch), dtype=np.float32)


@pipeline_def(enable_checkpointing=True)
def shard_pipeline(shards: SplitShards, cfg: DataConfig, train: bool, gpu: bool, channels_last: bool,
                   dtype: torch.dtype, shard_id: int, num_shards: int, sides: Optional[_Sides] = None):
    # pad_last_batch: every rank's epoch is ceil(N / world_size) samples (its last one repeated) in whole batches, and
    # no batch mixes two epochs. Val sticks to its slice, which is sharding.val_shard's.
    jpegs, cls = fn.readers.webdataset(
        paths=shards.tars, index_paths=shards.indexes, ext=["jpg;png", LABEL_EXT], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, stick_to_shard=not train,
        random_shuffle=train, initial_fill=cfg.shuffle_buffer, dont_use_mmap=not cfg.mmap, name=READER)
    if sides is not None:
        sides = fn.external_source(source=sides, batch=True, batch_info=True, dtype=types.FLOAT)
    # The labels stay on the CPU, where _checked_batch looks at them for free.
    return preprocess(jpegs, cfg, train, gpu, channels_last, dtype, sides), parse_label(cls)


def _named_error(error: Exception, shards: SplitShards) -> Optional[DataError]:
    """A DataError naming the shard and the sample DALI's message points at (None if it points at none)."""
    message = str(error)
    # DALI's message: where the operator was defined, then "encountered:" and the reason.
    lines = [line.strip() for line in message.split("encountered:")[-1].splitlines() if line.strip()]
    reason = lines[0] if lines else message
    found = _INDEX_LINE.search(message)
    if found:
        index, line = found[1], int(found[2])
        key, exts = index_sample(index, line)
        tar = shards.tar_of_index().get(index, index)
        if "Underful sample" in message:
            return DataError(f"shard {tar}: sample {key!r} (line {line} of {index}) has members {exts}: a sample "
                             f"needs an image (.jpg or .png) and a label (.{LABEL_EXT})")
        return DataError(f"shard {tar}: sample {key!r} (line {line} of {index}): {reason}")
    if "fn.decoders" in message:
        # DALI's decoders name no sample, and which samples a batch holds depends on the shuffle buffer.
        return DataError(f"decoding a {shards.split} batch from the shards in {shards.root} failed ({reason}): "
                         f"make_shards decoded every image it wrote, so a shard "
                         f"has changed since; `python -m data.make_shards --verify {shards.root}` names it")
    return None


def _reading(shards: SplitShards, make):
    """Calls make() with DALI's errors turned into DataErrors that name the shard and sample, where it names one."""
    try:
        return make()
    except StopIteration:
        raise
    except Exception as error:
        named = _named_error(error, shards)
        if named is None:
            raise
        raise named from error


def _checked_batch(convert, shards: SplitShards, device: torch.device, outputs):
    images, labels = convert(outputs)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(shards.classes)):
        raise DataError(f"a {shards.split} sample in {shards.root} has a .{LABEL_EXT} that is not a label in "
                        f"[0, {len(shards.classes)}): `python -m data.make_shards --verify {shards.root}` finds "
                        f"the shard that differs from what make_shards wrote")
    return images, labels.to(device, non_blocking=True)


def _train_batches(iterator, shards: SplitShards, batch, start: int, count: int, reader_batches: int) -> Iterator:
    """Batches start..count-1 of this epoch. The reader's epoch is reader_batches long, padding included: the rest of
    it is read and dropped before the last batch is yielded, so that the next epoch begins at the reader's next epoch
    and a state taken while the trainer holds the last batch is at that boundary already."""
    for position in range(start, count):
        outputs = _reading(shards, lambda: next(iterator))
        if position == count - 1:
            for _ in range(reader_batches - count):
                _reading(shards, lambda: next(iterator))
        yield batch(outputs)


class WebDatasetLoader(Loader):
    backend = "dali-webdataset"

    def __init__(self, cfg: DataConfig, split: str, shards: SplitShards, *, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int, channels_last: bool, dtype: torch.dtype,
                 train_side: Optional[Callable[[int], int]] = None):
        super().__init__(shards.classes, split, shards.num_samples, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self._side = train_side if cfg.resolution is not None else None
        if shards.num_samples < world_size:
            raise DataError(f"the {split} shards in {shards.root} hold {shards.num_samples} samples, fewer than the "
                            f"{world_size} ranks: run on fewer processes")
        self.cfg, self.shards, self.device = cfg, shards, device
        self.channels_last, self.dtype = channels_last, dtype
        self._batch = partial(_checked_batch, partial(_to_torch, channels_last, dtype), shards, device)
        self._gpu = device.type == "cuda"
        self._device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self._gpu else None
        # Every rank's reader epoch: ceil(N / world_size) samples padded to whole batches (pad_last_batch), at most
        # one more than the len(self) batches every rank yields.
        self._reader_batches = math.ceil(math.ceil(self.num_samples / world_size) / batch_size)
        self._restore = None
        self._definition = {"graph": GRAPH_VERSION, "mmap": cfg.mmap, "shuffle_buffer": cfg.shuffle_buffer,
                            **train_definition(cfg, self._gpu, channels_last, dtype)}
        # The epoch the reader started at (0, or where a resume on another split began a fresh one): its seed.
        self._first_epoch = 0
        # Built now, not at the first batch: DALI reads every index here, so a bad shard fails build_loader on every
        # rank alike instead of one rank in the middle of training.
        self._iterator = self._build(split == "train")
        self._val_at_start = True

    def _build(self, train: bool, checkpoint: Optional[bytes] = None) -> DALIGenericIterator:
        seed = derive_seed(self.seed, self.rank, self._first_epoch) if train else derive_seed(self.seed, self.rank)
        sides = None
        if train and self._side is not None:
            sides = _Sides(self._side, self._first_epoch, self._reader_batches, self.batch_size)
        pipe = shard_pipeline(
            shards=self.shards, cfg=self.cfg, train=train, gpu=self._gpu, channels_last=self.channels_last,
            dtype=self.dtype, shard_id=self.rank, num_shards=self.world_size, batch_size=self.batch_size,
            num_threads=self.cfg.num_threads, device_id=self._device_id, seed=seed,
            prefetch_queue_depth=self.cfg.prefetch, checkpoint=checkpoint, sides=sides,
        )
        if train:
            # size=-1: the iterator never ends an epoch by itself; _train_batches counts the reader's batches.
            make = partial(DALIGenericIterator, [pipe], ["images", "labels"], size=-1, prepare_first_batch=False)
        else:
            # PARTIAL trims the last batch's padding: every val image is counted once across ranks.
            make = partial(DALIGenericIterator, [pipe], ["images", "labels"], reader_name=READER,
                           last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True, prepare_first_batch=False)
        return _reading(self.shards, make)

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        if self._iterator is None:
            checkpoint, self._restore = self._restore, None
            self._iterator = self._build(True, checkpoint)
        return _train_batches(self._iterator, self.shards, self._batch, start, len(self), self._reader_batches)

    def _val_epoch(self) -> Iterator:
        if not self._val_at_start:  # a pass left mid-way (by an error) leaves the reader mid-epoch
            self._iterator = self._build(False)
        self._val_at_start = False
        iterator = self._iterator
        while True:
            try:
                outputs = _reading(self.shards, lambda: next(iterator))
            except StopIteration:  # auto_reset: the reader is at the start of its next epoch
                break
            yield self._batch(outputs)
        self._val_at_start = True

    def load_state_dict(self, state: Dict[str, Any]):
        same_split = (state.get("world_size"), state.get("batch_size")) == (self.world_size, self.batch_size)
        if not same_split and state.get("batches_done"):
            raise DataError(
                f"the loader state stopped mid-epoch (batch {state['batches_done']} of epoch {state['epoch']}) with "
                f"world size {state['world_size']} x batch size {state['batch_size']}; a webdataset reader's "
                f"position (its slice of the shards, its shuffle buffer) cannot be re-split over world size "
                f"{self.world_size} x batch size {self.batch_size}. Resume with {state['world_size']} processes "
                f"and train.batch_size={state['batch_size']}, or from a checkpoint at an epoch's end (one is saved "
                f"at every epoch's end); data.format=folder re-splits an epoch exactly")
        self._restore = None
        # Restores the checkpoint on the same split, at an epoch's start too: the reader does not start afresh
        # there but goes on to its next shard slice with its shuffle buffer and RNGs as they are.
        super().load_state_dict(state)
        self._iterator = None
        if self._restore is None:
            self._first_epoch = self._epoch

    def _extra_state(self) -> Dict[str, Any]:
        # Restored but not iterated since (a run resumed at its last step): the position is still the restored one.
        raw = self._restore if self._iterator is None else self._iterator.checkpoints()[0]
        if raw is None:  # a fresh reader starts at this epoch: (seed, rank, epoch) is all there is to it
            return {}
        return {"dali_checkpoints": {str(self.rank): base64.b64encode(raw).decode("ascii")},
                "webdataset_first_epoch": self._first_epoch, "dali_pipeline": self._definition}

    def _load_extra_state(self, state: Dict[str, Any]):
        if "dali_checkpoints" not in state:  # see _extra_state
            if self._done:
                raise DataError(f"the loader state is {self._done} batches into epoch {self._epoch} but holds no "
                                f"reader checkpoint: a fresh reader would not read the rest of that epoch")
            return
        change = pipeline_change(state.get("dali_pipeline"), self._definition)
        if change and not self._done:
            log.info(f"{change}: its checkpoint is not restored into this one; a new reader starts epoch "
                     f"{self._epoch}, each image of it read once (exact in coverage, not bitwise)")
            return
        if change and "dali_pipeline" in state:
            raise DataError(f"{change}. The reader's checkpoint cannot be restored into another pipeline, and a new "
                            f"reader cannot read the rest of epoch {self._epoch} from batch {self._done}: resume with "
                            f"what the pipeline was saved with, or from a checkpoint at an epoch's end (one is saved "
                            f"at every epoch's end)")
        if change:
            # A new reader would lose the rest of the epoch: restored as before states recorded their pipeline.
            log.warning(f"{change}: it is restored mid-epoch on trust; if the pipeline has changed since (GPU "
                        f"decoding, train.channels_last), resume from a checkpoint at an epoch's end instead")
        self._restore = rank_checkpoint(state, self.rank)
        self._first_epoch = state["webdataset_first_epoch"]
