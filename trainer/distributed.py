"""Process group, ranks and devices, with timeouts so that a dead or stalled rank ends the job instead of hanging it."""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import CheckpointError, ConfigError, DataError, Diverged, UserInputError

BACKENDS = ("auto", "nccl", "gloo")
MAX_TIMEOUT_S = 24 * 3600


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """Collective backend: auto picks nccl on CUDA and gloo on CPU."""
    init_timeout_s: float = 600.0
    """Seconds every rank waits for the others to join the process group. At most a day (86400): longer is a
    hang, not a wait (and inf overflows the timedelta torch takes)."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for a peer before the job fails with an error instead of hanging. At most a
    day, like init_timeout_s."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError("distributed.backend", f"got {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        for key in ("init_timeout_s", "timeout_s"):
            if not 0 < getattr(self, key) <= MAX_TIMEOUT_S:
                raise ConfigError(f"distributed.{key}", f"must be in (0, {MAX_TIMEOUT_S}] seconds, "
                                                        f"got {getattr(self, key)}")


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control: object = None
    """A gloo group for host-side agreement (the stop flag) that never waits on the GPU stream."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a process trains on: its local rank among the node's GPUs (torchrun), or the only one it sees
    where the launcher gives each process its own (`srun --gpus-per-task=1`, a CUDA_VISIBLE_DEVICES per rank)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise UserInputError(f"LOCAL_RANK {local_rank} but this process sees {visible} GPUs "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                             f"{visible} processes per node, or show each process one GPU of its own")
    return local_rank


def init(cfg: DistributedConfig) -> Dist:
    """Joins the process group torchrun describes in RANK/LOCAL_RANK/WORLD_SIZE, or runs alone without them."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return Dist(rank, local_rank, world_size, device)

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl":
        # A rank that dies mid-collective must abort the others, not leave them spinning.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.init_timeout_s),
                            device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.timeout_s)) if backend != "gloo" else None
    dist.barrier(group=control) if control is not None else dist.barrier()
    # Joining may take long (nodes boot at different times); collectives after that may not.
    dist.set_timeout(timedelta(seconds=cfg.timeout_s))
    return Dist(rank, local_rank, world_size, device, control)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast_buffers(module: torch.nn.Module, d: Dist) -> None:
    """Gives every rank rank 0's buffers (BN statistics). DDP broadcasts them only at the start of a training
    forward, so after a step each rank holds the statistics of its own batch, while checkpoints hold rank 0's."""
    if d.world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is true on any; a host-side collective that does not sync the GPU."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return bool(t.item())


# What `agree` shares between ranks: errors a user can act on. Anything else is a bug, and its traceback
# (with torchrun's record of the failing rank) says more than a message would.
AGREED_ERRORS = (ConfigError, DataError, UserInputError, Diverged, CheckpointError)


def agree(fn, d: Dist):
    """Runs `fn` on every rank and returns its result; when it fails on any rank, every rank raises the error of
    the lowest failing rank (its `failed_rank` set), so all exit together with the same message and none is left
    waiting at a later collective."""
    try:
        result, error = fn(), None
    except AGREED_ERRORS as e:
        result, error = None, e
    for rank, failure in enumerate(all_gather(error, d)):
        if failure is not None:
            failure = error if rank == d.rank else failure  # this rank's own keeps its traceback
            failure.failed_rank = rank
            raise failure
    return result


def all_gather(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank (small objects: RNG and loader states)."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.control)
    return out


def broadcast_from_main(obj, d: Dist):
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=d.control)
    return box[0]
