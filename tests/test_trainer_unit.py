"""The Trainer in this process, on the synthetic backend: the step, skips, cadence and clean exits.

Real processes add nothing to these; the multi-process behaviour is in test_trainer_ddp.py.
"""
import copy
import json

import pytest
import torch

from common.errors import ConfigError, DataError, Diverged
from trainer import distributed, optim
from trainer.config import load_config
from trainer.distributed import Dist
from trainer.optim import build_optimizer
from trainer.trainer import EpochEnd, Trainer, accumulation_groups

ALONE = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# 64 samples at batch 8: 8 steps per epoch.
SMALL = ["model.name=resnet20", "data.backend=synthetic", "data.num_classes=4", "data.synthetic_samples=64",
         "data.image_size=32", "data.val_resize=32", "train.batch_size=8", "train.precision=fp32",
         "train.epochs=2", "train.label_smoothing=0", "schedule.name=constant", "schedule.warmup_epochs=0",
         "monitor.wandb=false", "monitor.progress=false", "monitor.every_steps=1", "checkpoint.every_steps=3"]


def make_trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(load_config(None, [*SMALL, f"run.dir={tmp_path / 'run'}", *overrides]), ALONE)


def test_a_step_is_forward_loss_backward_update(tmp_path):
    with make_trainer(tmp_path) as trainer:
        reference = copy.deepcopy(trainer.raw_model)
        optimizer = build_optimizer(reference, trainer.cfg.optim, trainer.optimizer.param_groups[0]["lr"])
        images, labels = next(iter(trainer.train_loader))

        output = reference(images)
        loss = torch.nn.functional.cross_entropy(output, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        loss_sum, correct, samples = trainer.train_step([(images, labels)])
    assert int(trainer.guard.skipped) == 0 and samples == 8 and torch.equal(loss_sum, loss.detach() * 8)
    for (name, ours), theirs in zip(trainer.raw_model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("precision, optimizer", [("fp32", "sgd"), ("bf16", "sgd"), ("fp16", "sgd"),
                                                  ("fp32", "lars"), ("fp32", "adamw"), ("bf16", "adamw")])
def test_a_non_finite_step_leaves_the_model_as_it_was_and_is_counted(tmp_path, precision, optimizer):
    # fp16 trains with a GradScaler: its skipped steps count too (on the CPU here, as torch supports it).
    with make_trainer(tmp_path, f"train.precision={precision}", f"optim.name={optimizer}",
                      "optim.ema_decay=0.9") as trainer:
        batches = iter(trainer.train_loader)
        trainer.train_step([next(batches)])  # momentum buffers and the EMA are under way
        images, labels = next(batches)
        before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        # Momentum buffers; AdamW's moments and its step count.
        optimizer_before = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
        poisoned = images.clone()
        poisoned[0] = float("inf")
        trainer.train_step([(poisoned, labels)])
        assert int(trainer.guard.skipped) == 1 and int(trainer.guard.total) == 1
        after = trainer.raw_model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), \
            [k for k, v in before.items() if not torch.equal(after[k], v)][:3]
        # The averaged weights and buffers; the EMA's own call counter, n_averaged, does not enter the average.
        assert all(torch.equal(trainer.ema.state_dict()[k], v) for k, v in ema_before.items() if k != "n_averaged")
        assert all(torch.equal(s[k], v) for s, saved in zip(trainer.optimizer.state.values(), optimizer_before)
                   for k, v in saved.items())
        trainer.train_step([(images, labels)])  # a good step after it trains and resets the run of bad ones
        assert int(trainer.guard.skipped) == 0 and int(trainer.guard.consecutive) == 0
        assert not torch.equal(trainer.raw_model.state_dict()["fc.weight"], before["fc.weight"])


def test_accumulation_groups_read_a_partial_group_but_do_not_yield_it():
    batches = iter(range(7))
    assert list(accumulation_groups(batches, 3)) == [[0, 1, 2], [3, 4, 5]]
    assert next(batches, None) is None  # 6 was read, so the epoch's iterator is exhausted


def test_the_checkpointer_saves_on_its_cadence_and_at_epoch_ends(tmp_path):
    with make_trainer(tmp_path, "train.max_steps=10") as trainer:
        assert trainer.train() == 0
    steps = sorted(int(p.stem.split("-")[1]) for p in trainer.checkpointer.dir.glob("ckpt-*.pt"))
    # every 3 steps (3, 6, 9), the end of epoch 1 (8) and the last step (10); keep=3 leaves the newest three.
    assert steps == [8, 9, 10]
    assert (trainer.checkpointer.dir / "latest").read_text().strip() == "ckpt-000000010.pt"
    state = torch.load(trainer.checkpointer.path_for(10), weights_only=True)
    # What a user of the weights needs, without the config: the classes and the preprocessing.
    assert state["classes"] == trainer.classes
    assert state["preprocessing"] == {"pixel_range": [0, 255], "channels": "RGB", "mean": [123.68, 116.78, 103.94],
                                      "std": None, "image_size": 32, "val_resize": 32, "val_image_size": 32}


def test_train_one_epoch_says_why_it_returned(tmp_path):
    with make_trainer(tmp_path, "train.max_steps=10") as trainer:
        trainer.stop.install()
        assert trainer.train_one_epoch() is EpochEnd.EPOCH and trainer.step == 8 and trainer.epoch == 1
        assert trainer.train_one_epoch() is EpochEnd.LAST_STEP and trainer.step == 10
    with make_trainer(tmp_path / "stopped", "train.stop_check_every=2") as trainer:
        trainer.stop.install()
        trainer.stop.signum = 10  # as the SIGUSR1 handler would
        assert trainer.train_one_epoch() is EpochEnd.STOP and trainer.step == 2


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    with make_trainer(tmp_path) as trainer:
        with torch.no_grad():
            trainer.raw_model.fc.weight[0, 0] = float("inf")
        with pytest.raises(Diverged, match="refusing to write a checkpoint with non-finite weights at step 0 "
                                           r"\(e.g. fc.weight\)"):
            trainer.save(force=True)
    assert not list(trainer.checkpointer.dir.iterdir())


def test_the_monitor_is_closed_when_training_diverges(tmp_path):
    trainer = make_trainer(tmp_path, "optim.lr=1e30", "train.max_nonfinite_steps=2", "checkpoint.every_steps=0")
    with pytest.raises(Diverged, match="non-finite for 2 consecutive steps"):
        with trainer:
            trainer.train()
    assert trainer.monitor.file.closed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["split"] == "train" for r in records)


def test_the_train_record_has_the_peak_memory_a_batch_is_sized_by_and_the_allocated_peak_beside_it(tmp_path):
    with make_trainer(tmp_path, "train.max_steps=1") as trainer:
        trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in records if r["split"] == "train"]
    assert train["max_mem_mb"] >= train["max_mem_allocated_mb"] > 0  # on the CPU, both the peak resident set


def test_a_train_split_smaller_than_a_global_batch_is_named(tmp_path):
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        make_trainer(tmp_path, "train.grad_accum=16")


def test_a_batch_larger_than_the_train_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch per rank .*lower train.batch_size") as e:
        make_trainer(tmp_path, "train.batch_size=128")  # 64 samples
    assert e.value.key == "train.batch_size"


def test_a_global_batch_beyond_the_optimizer_s_known_limit_is_warned_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(optim.GLOBAL_BATCH_LIMITS, "sgd", optim.GLOBAL_BATCH_LIMITS["sgd"]._replace(images=4))
    make_trainer(tmp_path).close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "global batch" in line]
    assert len(warnings) == 1 and "of 8 images" in warnings[0]


def _fail_on_rank_1(rank, port, results):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    d = distributed.init(distributed.DistributedConfig(timeout_s=60))

    def fail():
        if d.rank == 1:
            raise DataError("shard 7 of /data/x is unreadable")
        return "fine"

    try:
        distributed.agree(fail, d)
        results.put((rank, None, None))
    except DataError as e:
        results.put((rank, str(e), e.failed_rank))
    distributed.shutdown()


def test_every_rank_raises_the_error_of_the_rank_that_failed():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_fail_on_rank_1, args=(port, results), nprocs=2, start_method="spawn")
    got = sorted(results.get(timeout=10) for _ in range(2))
    assert got == [(0, "shard 7 of /data/x is unreadable", 1), (1, "shard 7 of /data/x is unreadable", 1)]


def test_a_one_rank_process_group_gets_ddp_around_the_compiled_model_and_accumulation_skips_its_sync(tmp_path):
    # The GPU check's way to the multi-GPU path at world size 1.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with make_trainer(tmp_path, "train.compile=true", "train.grad_accum=2") as trainer:
            assert isinstance(trainer.model, DistributedDataParallel)
            assert trainer.model.module._orig_mod is trainer.raw_model  # compiled, then wrapped
            with trainer._gradient_sync(last=False):
                assert trainer.model.require_backward_grad_sync is False
            with trainer._gradient_sync(last=True):
                assert trainer.model.require_backward_grad_sync is True
    finally:
        dist.destroy_process_group()
