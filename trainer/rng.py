"""Per-rank RNG state in the types a weights_only checkpoint accepts (no numpy arrays, no arbitrary objects)."""
import random

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    """This process's streams; on a GPU, only the generator of `device`, the one this rank draws from."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device, rank: int) -> None:
    """Restores what rng_state saved on rank `rank`. A state saved on the CPU leaves the GPU generator as seeded."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(own_cuda_state(state["cuda"], rank), device)


def own_cuda_state(saved, rank: int) -> torch.Tensor:
    """The state of the generator rank `rank` drew from, out of a saved `cuda` entry: that state itself, or, in
    checkpoints written before, the list of every device the saving process saw (get_rng_state_all)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if not saved:
        raise ValueError(f"the RNG state of rank {rank} lists no CUDA generator state")
    # That rank drew from cuda:LOCAL_RANK and saw its whole node, one process per GPU (launch/, torchrun numbers
    # ranks node by node), so its local rank was rank % devices. This run's own local rank is no guide: a resume
    # on another node shape (2x8 as 4x4) gives the same rank another local rank, or fewer visible devices.
    return saved[rank % len(saved)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
