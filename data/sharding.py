"""Which samples each rank reads in each epoch.

Train: one global permutation per epoch, drawn from (seed, epoch), identical on all ranks; rank r takes the
r-th contiguous block of len(loader) * batch_size samples and the remainder is dropped, so every rank yields the
same number of full batches. Val: rank r takes a fixed contiguous slice [r*N/W, (r+1)*N/W), so across ranks
every image is read exactly once.
"""
import numpy as np


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from several integers (DALI takes a non-negative int32)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def train_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def train_shard(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Sample indices rank `rank` reads in `epoch`, in reading order."""
    permutation = np.random.default_rng(derive_seed(seed, epoch)).permutation(num_samples)
    per_rank = train_batches(num_samples, batch_size, world_size) * batch_size
    return permutation[rank * per_rank:(rank + 1) * per_rank]


def val_shard(num_samples: int, rank: int, world_size: int) -> range:
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)
