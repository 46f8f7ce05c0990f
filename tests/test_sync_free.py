"""No host sync in the hot path, shown on the CPU: every aten op of real train steps is recorded under a
TorchDispatchMode, and none of them may be one that makes the host wait for a GPU.

The steps are the Trainer's own train_step (logging and stop-check steps are the loop's, outside it), over
accumulated micro-batches, one of them non-finite, with an EMA, for every optimizer and schedule. A case is a list
of config overrides: a new feature of the step is a new case.
"""
from itertools import cycle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data.config import DataConfig
from data.synthetic import SyntheticLoader
from trainer.config import load_config
from trainer.distributed import Dist
from trainer.optim import OPTIMIZERS, SCHEDULES
from trainer.trainer import Trainer, accumulation_groups

aten = torch.ops.aten
CPU = torch.device("cpu")
# Ops that read a value back to the host (.item(), int(), bool(), torch.equal), or whose output's shape depends on
# the values, so that the host must learn it before it can allocate the output.
READS_BACK = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose}
SHAPE_FROM_VALUES = {aten.nonzero, aten.argwhere, aten.masked_select, aten.bincount, aten.unique_consecutive,
                     aten.unique_dim, aten.unique_dim_consecutive, aten._unique, aten._unique2}
BOOLEAN_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def syncs(func, args, kwargs) -> bool:
    op = func.overloadpacket
    if op in READS_BACK or op in SHAPE_FROM_VALUES:
        return True
    if op is aten.repeat_interleave:
        return kwargs.get("output_size") is None
    if op in BOOLEAN_INDEXED:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


class HostSyncs(TorchDispatchMode):
    """Records every op dispatched while active (`ops`) and those of them that sync (`found`)."""

    def __init__(self):
        super().__init__()
        self.ops, self.found = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(func.overloadpacket)
        if syncs(func, args, kwargs):
            self.found.append(str(func))
        return func(*args, **kwargs)


def test_the_recorder_sees_a_sync_and_the_ops_it_must_not_flag():
    x = torch.arange(6.0)
    with HostSyncs() as recorder:
        x.sum().item()
        x[x > 2].sum()
        torch.where(x > 2, x, 0.0).sum()
    assert recorder.found == ["aten._local_scalar_dense.default", "aten.index.Tensor"]


SMALL = ["model.name=resnet20", "data.backend=synthetic", "data.num_classes=4", "data.synthetic_samples=64",
         "data.image_size=32", "data.val_resize=32", "train.batch_size=4", "train.grad_accum=2",
         "train.epochs=3", "schedule.warmup_epochs=0", "optim.ema_decay=0.9", "monitor.wandb=false",
         "monitor.progress=false", "monitor.every_steps=1000", "train.stop_check_every=1000"]
# Every schedule, with the optimizers in turn; then the precisions (fp16: GradScaler) with each optimizer.
CASES = [[f"optim.name={name}", f"schedule.name={schedule}"] for name, schedule in zip(cycle(OPTIMIZERS), SCHEDULES)]
CASES += [[f"optim.name={name}", f"train.precision={precision}"]
          for name in OPTIMIZERS for precision in ("bf16", "fp16")]
# Mixup and CutMix on the device: the draws are the host's, the box host integers.
CASES += [["train.mixup_alpha=0.2"], ["train.cutmix_alpha=1.0"]]
STEPS = 4


@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_train_steps_never_make_the_host_wait_for_the_device(tmp_path, overrides):
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path / 'run'}", *overrides])
    with Trainer(cfg, Dist(0, 0, 1, CPU)) as trainer:
        groups = accumulation_groups(trainer.train_loader, cfg.train.grad_accum)
        first, *steps = [next(groups) for _ in range(1 + STEPS)]
        images, labels = steps[1][1]
        poisoned = images.clone()
        poisoned[0] = torch.inf
        steps[1][1] = (poisoned, labels)  # its second micro-batch: the guard skips that step
        trainer.train_step(first)  # the EMA's first update only copies
        with HostSyncs() as recorder:
            for micro_batches in steps:
                trainer.train_step(micro_batches)
        assert int(trainer.guard.total) == 1
    assert not recorder.found, f"ops that wait for the device: {sorted(set(recorder.found))}"
    # The recorder saw the backward pass and the optimizer, not only the forward.
    assert aten.convolution_backward in recorder.ops and aten._foreach_add_ in recorder.ops


def test_a_synthetic_train_batch_is_made_with_its_epoch():
    """The labels of an epoch are drawn once, on the device: a step makes no tensor, so it copies none to the
    GPU (a blocking copy from pageable memory, which synchronises the stream)."""
    cfg = DataConfig(backend="synthetic", num_classes=4, synthetic_samples=64, image_size=32, val_resize=32)
    loader = SyntheticLoader(cfg, "train", batch_size=4, rank=0, world_size=1, device=CPU, seed=0,
                             channels_last=False, dtype=torch.float32, train_side=lambda epoch: 32)
    batches = iter(loader)
    next(batches)
    with HostSyncs() as recorder:
        for _ in range(3):
            next(batches)
    views = {aten.select, aten.slice, aten.alias, aten.view, aten.detach}
    assert recorder.ops <= views, sorted(map(str, recorder.ops - views))
