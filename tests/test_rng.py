"""The per-rank RNG state: a round trip on the CPU, and which saved CUDA generator state a rank takes back.

CUDA is absent here, so the choice of a saved state is tested on its own (trainer.rng.own_cuda_state), with
tensors standing for the generator states a checkpoint holds.
"""
import random

import numpy as np
import pytest
import torch

from common.errors import UserInputError
from tests.helpers import roundtrip
from trainer.distributed import gpu_index
from trainer.rng import own_cuda_state, rng_state, set_rng_state

CPU = torch.device("cpu")


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_saved_state_restores_every_stream_and_holds_no_cuda_entry_on_the_cpu():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    draws()
    state = roundtrip(rng_state(CPU))
    expected = draws()
    draws()
    set_rng_state(state, CPU, rank=0)
    assert draws() == expected
    assert "cuda" not in state


def device_states(count: int) -> list:
    """Stand-ins for one process's torch.cuda.get_rng_state_all(): a distinct ByteTensor per device."""
    return [torch.full((16,), device, dtype=torch.uint8) for device in range(count)]


def test_a_checkpoint_of_one_device_state_per_rank_gives_each_rank_its_own():
    own = device_states(1)[0]
    assert own_cuda_state(own, rank=13) is own


@pytest.mark.parametrize("rank, saved_local_rank", [(0, 0), (3, 3), (5, 5), (11, 3), (13, 5)])
def test_an_older_checkpoint_gives_a_rank_the_state_of_the_device_it_trained_on(rank, saved_local_rank):
    # Saved by 2 nodes x 8 GPUs, every process seeing all 8; resumed as 4 nodes x 4 GPUs, where rank 13 is local
    # rank 1 and sees 4 devices: the generator it continues is the one rank 13 drew from, cuda:5 of its node.
    saved = device_states(8)
    assert torch.equal(own_cuda_state(saved, rank=rank), saved[saved_local_rank])


def test_an_older_checkpoint_of_one_gpu_per_node_serves_any_node_shape():
    saved = device_states(1)
    assert torch.equal(own_cuda_state(saved, rank=6), saved[0])


def test_an_older_checkpoint_without_device_states_is_an_error_not_an_index_error():
    with pytest.raises(ValueError, match="no CUDA generator state"):
        own_cuda_state([], rank=2)


# The other half of a launcher that shows each process fewer GPUs: which one the process trains on.
@pytest.mark.parametrize("local_rank, visible, expected", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (0, 1, 0), (3, 4, 3)])
def test_each_process_trains_on_its_local_rank_or_on_the_only_gpu_it_sees(local_rank, visible, expected):
    assert gpu_index(local_rank, visible) == expected


def test_more_local_ranks_than_visible_gpus_is_refused_naming_both():
    with pytest.raises(UserInputError, match="LOCAL_RANK 5 but this process sees 4 GPUs"):
        gpu_index(5, 4)
