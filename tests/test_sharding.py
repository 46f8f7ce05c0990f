"""The train order of data/sharding.py: any split of a global batch continues any other from a global position."""
import numpy as np
import pytest

from data.sharding import epoch_permutation, train_batches, train_shard

N, SEED, EPOCH = 103, 7, 3


def shards(batch_size, world_size, start=0):
    return [train_shard(N, batch_size, r, world_size, SEED, EPOCH, start) for r in range(world_size)]


def global_order(batch_size, world_size, start=0):
    """The samples of all ranks micro-batch by micro-batch, ranks in order: the order the epoch is consumed in."""
    per_rank = [s.reshape(-1, batch_size) for s in shards(batch_size, world_size, start)]
    return np.concatenate([np.concatenate(batches) for batches in zip(*per_rank)]) if per_rank[0].size else []


@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (4, 2), (3, 5), (8, 1), (2, 4)])
def test_an_epoch_reads_its_permutation_in_global_batches_each_sample_once(batch_size, world_size):
    permutation = epoch_permutation(N, SEED, EPOCH)
    used = train_batches(N, batch_size, world_size) * batch_size * world_size
    assert np.array_equal(global_order(batch_size, world_size), permutation[:used])
    assert len({len(s) for s in shards(batch_size, world_size)}) == 1


@pytest.mark.parametrize("old, new", [((4, 2), (8, 1)), ((8, 1), (4, 2)), ((2, 4), (1, 8)), ((2, 6), (3, 4)),
                                      ((4, 2), (2, 2)), ((6, 1), (1, 3))])
@pytest.mark.parametrize("stopped_after", [0, 1, 2, 5])
def test_another_split_continues_at_the_global_position_and_covers_the_rest_once(old, new, stopped_after):
    """(batch size, world size) before and after a resume; the position is a whole number of both splits' global
    micro-batches, as it is at every optimizer step of the same global batch."""
    (b0, w0), (b1, w1) = old, new
    position = stopped_after * b0 * w0
    assert position % (b1 * w1) == 0
    read_before = np.concatenate([s[:stopped_after * b0] for s in shards(b0, w0)])
    read_after = np.concatenate(shards(b1, w1, start=position // (b1 * w1)))
    permutation = epoch_permutation(N, SEED, EPOCH)
    epoch_end = train_batches(N, b1, w1) * b1 * w1
    assert sorted(np.concatenate([read_before, read_after])) == sorted(permutation[:epoch_end])
    assert np.array_equal(global_order(b1, w1, position // (b1 * w1)), permutation[position:epoch_end])


def test_epochs_and_seeds_reshuffle():
    assert not np.array_equal(train_shard(N, 4, 0, 2, SEED, 0), train_shard(N, 4, 0, 2, SEED, 1))
    assert not np.array_equal(train_shard(N, 4, 0, 2, SEED, 0), train_shard(N, 4, 0, 2, SEED + 1, 0))
