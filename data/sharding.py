"""Which samples each rank reads in each epoch.

Train: one global permutation per epoch, drawn from (seed, epoch), identical on all ranks, read in global
micro-batches of batch_size x world_size samples: micro-batch m is permutation[m*B*W:(m+1)*B*W] and rank r reads
its r-th slice of B. Where a run stands in an epoch is therefore one global sample position, m*B*W, and any other
split of the same global batch (another world size, per-rank batch or accumulation) continues from it over the
rest of the same permutation, each sample once. The remainder past the last whole global micro-batch is dropped,
so every rank yields the same number of full batches. Val: rank r takes a fixed contiguous slice
[r*N/W, (r+1)*N/W), so across ranks every image is read exactly once.
"""
import numpy as np


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from several integers (DALI takes a non-negative int32)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def train_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, epoch)).permutation(num_samples)


def train_positions(num_samples: int, batch_size: int, rank: int, world_size: int, start: int = 0) -> np.ndarray:
    """Positions in the epoch's permutation that rank `rank` reads from its micro-batch `start` on, in order."""
    batches = train_batches(num_samples, batch_size, world_size)
    grid = np.arange(batches * world_size * batch_size).reshape(batches, world_size, batch_size)
    return grid[start:, rank].reshape(-1)


def train_shard(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                start: int = 0) -> np.ndarray:
    """Sample indices rank `rank` reads in `epoch` from its micro-batch `start` on, in reading order."""
    positions = train_positions(num_samples, batch_size, rank, world_size, start)
    return epoch_permutation(num_samples, seed, epoch)[positions]


def val_shard(num_samples: int, rank: int, world_size: int) -> range:
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)
