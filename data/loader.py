"""The Loader contract every backend fulfils (len, iter, state) and the epoch bookkeeping they share."""
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

from common.errors import DataError, SplitTooSmall
from data.folder import ImageList
from data.image_files import bad_files_error, undecodable
from data.sharding import train_batches, val_shard

# 2: train batches interleave ranks over the epoch's permutation (data/sharding.py), and the state holds the
# global position; a version 1 state's position meant another order.
STATE_VERSION = 2


class Loader:
    """Len, iter and state on top of a backend's `_train_epoch` and `_val_epoch` generators.

    Subclasses set `backend` and implement `_train_epoch(epoch, start)` (an iterator over batches `start`.. of
    that epoch) and `_val_epoch()`; a backend with more state than the position adds it in
    `_extra_state`/`_load_extra_state`, saved at an epoch's end too (DALI's pipeline and its RNG states run on
    across epochs). That extra state is per rank and is only restored onto the same split
    (world size and batch size); a state saved under another split continues from its global position
    (`load_state_dict`), and the backend then starts the rest of the epoch afresh from batch `start`.

    The train iterator is kept between iter() calls, so it must not refer back to the loader: in a reference
    cycle an abandoned DataLoader iterator is only freed by the garbage collector, whose finalization order made
    shutting its workers down take seconds per worker.

    A backend that reads files sets `_image_list` and implements `_order`: when fetching a batch fails, the loader
    checks the files of that batch (and of the `_decoded_ahead` batches after it) and raises a DataError naming the
    bad ones.
    """

    backend = ""
    _image_list: Optional[ImageList] = None
    _decoded_ahead = 0

    def __init__(self, classes: List[str], split: str, num_samples: int, *, batch_size: int, rank: int,
                 world_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.classes = classes
        self.split = split
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        if split == "train" and len(self) == 0:
            raise SplitTooSmall(
                f"train split has {num_samples} images, fewer than one batch per rank "
                f"({world_size} ranks x batch size {batch_size})"
            )
        self._epoch = 0
        self._done = 0
        self._source: Optional[Iterator] = None

    def __len__(self) -> int:
        if self.split == "train":
            return train_batches(self.num_samples, self.batch_size, self.world_size)
        return -(-len(val_shard(self.num_samples, self.rank, self.world_size)) // self.batch_size)

    def __iter__(self):
        if self.split != "train":
            yield from self._val_batches()
            return
        if self._done == len(self):
            self._next_epoch()
        try:
            # Building the source can decode already: DALI's iterator fetches its first batch when made.
            if self._source is None:
                self._source = self._train_epoch(self._epoch, self._done)
            while self._done < len(self):
                batch = next(self._source)
                # Counted before the yield: a state_dict() taken while the trainer holds this batch resumes after it.
                self._done += 1
                yield batch
        except Exception as error:
            self._raise_for_bad_files(error, self._epoch, self._done)
            raise
        self._next_epoch()

    def _val_batches(self):
        position = 0
        try:
            for batch in self._val_epoch():
                yield batch
                position += 1
        except Exception as error:
            self._raise_for_bad_files(error, None, position)
            raise

    def _raise_for_bad_files(self, error: Exception, epoch: Optional[int], position: int):
        """Raises a DataError naming the bad files of batch `position` (or of the batches decoded ahead of it) when
        the failure to fetch it may come from one; returns if none is found, and the failure stands."""
        images = self._image_list
        if images is None or isinstance(error, (DataError, StopIteration)):
            return
        order = self._order(epoch)
        for batch in range(position, position + 1 + self._decoded_ahead):
            indices = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            bad = undecodable([os.path.join(images.split_dir, images.files[i]) for i in indices], str(error))
            if bad:
                where = f"epoch {epoch}" if epoch is not None else "the validation pass"
                raise bad_files_error(f"decoding {self.split} batch {batch} of {where} failed on", bad,
                                      images.split_dir) from error

    def _order(self, epoch: Optional[int]) -> Sequence[int]:
        """This rank's file indices in reading order, for train epoch `epoch`, or for validation (None)."""
        raise NotImplementedError

    def _next_epoch(self):
        self._epoch += 1
        self._done = 0
        self._close_source()

    def _close_source(self):
        self._source = None

    def _train_epoch(self, epoch: int, start: int) -> Iterator:
        raise NotImplementedError

    def _val_epoch(self) -> Iterator:
        raise NotImplementedError

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Dict[str, Any]):
        pass

    def state_dict(self) -> Dict[str, Any]:
        epoch, done = (self._epoch + 1, 0) if self._done == len(self) else (self._epoch, self._done)
        state = {"version": STATE_VERSION, "backend": self.backend, "world_size": self.world_size,
                 "num_samples": self.num_samples, "batch_size": self.batch_size, "seed": self.seed,
                 "epoch": epoch, "batches_done": done,
                 "samples_done": done * self.batch_size * self.world_size}
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: Dict[str, Any]):
        """Continues where `state` stopped. Under another world size or batch size the epoch goes on from the same
        global sample position over the rest of the same permutation, so every sample left in it is read exactly
        once across the new ranks; augmentation draws are then re-derived, not continued."""
        if self.split != "train":
            raise ValueError("only the train loader has a state to restore")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}: it was saved by a "
                            f"version of this code that ordered the data differently; start the data order afresh "
                            f"(drop the loader state)")
        for key, now in (("backend", self.backend), ("num_samples", self.num_samples), ("seed", self.seed)):
            if state[key] != now:
                raise DataError(f"the loader state was saved with {key}={state[key]!r}, this run has {now!r}: "
                                f"the data order would not continue where it stopped")
        same_split = (state["world_size"], state["batch_size"]) == (self.world_size, self.batch_size)
        per_batch = self.batch_size * self.world_size
        if state["samples_done"] % per_batch:
            raise DataError(
                f"the loader state stopped {state['samples_done']} samples into epoch {state['epoch']} (world size "
                f"{state['world_size']} x batch size {state['batch_size']}), which is not a whole number of this "
                f"run's global batches of {self.world_size} x {self.batch_size} = {per_batch}: the epoch cannot "
                f"continue at that position; pick a batch size that divides it")
        self._close_source()
        self._epoch = state["epoch"]
        self._done = state["samples_done"] // per_batch
        if same_split:
            self._load_extra_state(state)
