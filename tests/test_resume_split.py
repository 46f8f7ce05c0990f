"""A resume may split the same global batch differently (per-rank batch, accumulation); in process, synthetic data.

Another world size is tested with real processes in test_trainer_ddp.py.
"""
import pytest

from data.errors import ConfigError
from tests.test_trainer_unit import ALONE, SMALL
from trainer.config import load_config
from trainer.trainer import Trainer

pytestmark = pytest.mark.slow  # a short run to resume from: about 20 s on 2 busy cores


def make(run_dir, *overrides) -> Trainer:
    return Trainer(load_config(None, [*SMALL, f"run.dir={run_dir}", *overrides]), ALONE)


@pytest.fixture
def three_steps(tmp_path):
    """8 images a step (batch 8): stopped and saved at step 3, 24 images into the epoch."""
    run_dir = tmp_path / "run"
    with make(run_dir, "train.max_steps=3") as t:
        assert t.train() == 0
    return run_dir


def test_the_same_global_batch_split_otherwise_continues_at_the_same_sample(three_steps, capsys):
    with make(three_steps, "train.batch_size=4", "train.grad_accum=2") as t:
        assert (t.step, t.global_batch, t.steps_per_epoch) == (3, 8, 8)
        state = t.train_loader.state_dict()
        assert (state["batches_done"], state["samples_done"]) == (6, 24)
    out = capsys.readouterr().out
    assert "resuming with train.batch_size=4 (was 8): applied" in out
    assert "resuming with train.grad_accum=2 (was 1): applied" in out


def test_another_global_batch_is_refused(three_steps):
    with pytest.raises(ConfigError, match=r"train.batch_size: .* train.batch_size=8 \(now 4\)"):
        make(three_steps, "train.batch_size=4")
