"""A resume may split the same global batch differently (per-rank batch, accumulation): the split chosen for another
world size, and the trainer in process on synthetic data. Real processes on another world size are in
test_trainer_ddp.py. A resume may change the layout DALI writes (train.channels_last): the trainer in process on
DALI."""
import pytest

from common.errors import ConfigError
from tests.helpers import TINY, final_checkpoint, main_in_process
from tests.test_trainer_unit import ALONE, SMALL
from trainer.config import load_config
from trainer.resume import keep_global_batch
from trainer.trainer import Trainer


def make(run_dir, *overrides) -> Trainer:
    return Trainer(load_config(None, [*SMALL, f"run.dir={run_dir}", *overrides]), ALONE)


@pytest.fixture
def three_steps(tmp_path):
    """8 images a step (batch 8): stopped and saved at step 3, 24 images into the epoch."""
    run_dir = tmp_path / "run"
    with make(run_dir, "train.max_steps=3") as t:
        assert t.train() == 0
    return run_dir


@pytest.mark.parametrize("saved, now, world_size, expected", [
    ((256, 8, 1), (256, 1), 4, (256, 2)),    # fewer ranks: the per-device batch stays, accumulation makes it up
    ((256, 4, 2), (256, 2), 8, (256, 1)),    # more ranks: the accumulation goes first
    ((8, 1, 1), (8, 1), 2, (4, 1)),          # more ranks than the accumulation can absorb: the batch halves
    ((256, 8, 1), (128, 4), 4, (128, 4)),    # a split given by hand that keeps 2048 is taken as it is
    ((256, 8, 1), (256, 1), 8, (256, 1)),    # the same world size: nothing to do here (changes are checked later)
])
def test_the_split_for_another_world_size_keeps_the_global_batch(saved, now, world_size, expected):
    batch_size, ranks, accum = saved
    split = {"batch_size": batch_size, "world_size": ranks, "grad_accum": accum}
    assert keep_global_batch(split, *now, world_size) == expected


def test_a_global_batch_the_new_ranks_cannot_share_is_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"train.batch_size: the checkpoint's global batch of 2048 \(256 x 8 ranks "
                                          r"x 1 accumulated\) cannot be kept on 7 ranks"):
        keep_global_batch({"batch_size": 256, "world_size": 8, "grad_accum": 1}, 256, 1, 7)


@pytest.mark.slow  # a short run to resume from: about 20 s on 2 busy cores
def test_the_same_global_batch_split_otherwise_continues_at_the_same_sample(three_steps, capsys):
    with make(three_steps, "train.batch_size=4", "train.grad_accum=2") as t:
        assert (t.step, t.global_batch, t.steps_per_epoch) == (3, 8, 8)
        state = t.train_loader.state_dict()
        assert (state["batches_done"], state["samples_done"]) == (6, 24)
    out = capsys.readouterr().out
    assert "resuming with train.batch_size=4 (was 8): applied" in out
    assert "resuming with train.grad_accum=2 (was 1): applied" in out


@pytest.mark.slow
def test_another_global_batch_is_refused(three_steps):
    with pytest.raises(ConfigError, match=r"train.batch_size: .* train.batch_size=8 \(now 4\)"):
        make(three_steps, "train.batch_size=4")


@pytest.mark.slow  # two short trainer runs on DALI: 2-12 s on 2 busy cores (test_data_dali has the fast check)
def test_a_resume_with_channels_last_changed_reads_on_in_a_new_pipeline(tiny_data, tmp_path, capsys):
    # train.channels_last is how the model runs, so it may change on resume; it is also the layout DALI writes, and
    # a pipeline checkpoint restored into another pipeline is undefined behaviour (DALI's documentation).
    args = [*TINY, f"data.root={tiny_data}", f"run.dir={tmp_path / 'run'}"]
    code, _, err = main_in_process([*args, "train.channels_last=false", "train.max_steps=3"], capsys)
    assert code == 0, err[-3000:]
    code, out, err = main_in_process([*args, "train.channels_last=true", "train.max_steps=4"], capsys)
    assert code == 0, err[-3000:]
    assert "resuming with train.channels_last=True (was False): applied" in out
    assert ("output_layout 'CHW' (now 'HWC'): its checkpoint is not restored into this one; a new pipeline reads on "
            "from the saved position (epoch 0, batch 3)") in out
    loader = final_checkpoint(tmp_path / "run")["loader"][0]
    assert (loader["batches_done"], loader["dali_pipeline"]["output_layout"]) == (4, "HWC")
