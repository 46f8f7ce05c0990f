"""A checkpoint is the union of the Trainer's stateful parts: every part saved is restored, and the reverse.

In process, with the real Trainer on the synthetic backend; the bitwise resume across processes is in
test_trainer_ddp.py.
"""
import pytest
import torch

from common.errors import UserInputError
from trainer import checkpoint
from trainer.checkpoint import PerRank
from trainer.trainer import Trainer

from .test_trainer_unit import make_trainer


def _has_state(value) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _covered(parts: dict) -> set:
    """The objects the parts save: each part, and what a PerRank reads its state from."""
    covered = set()
    for part in parts.values():
        covered.add(id(part))
        if isinstance(part, PerRank) and hasattr(part.get, "__self__"):
            covered.add(id(part.get.__self__))
    return covered


@pytest.mark.parametrize("overrides", [[], ["train.precision=fp16", "optim.ema_decay=0.9"]])
def test_every_attribute_of_the_trainer_that_has_state_is_a_part_or_is_left_out_by_name(tmp_path, overrides):
    with make_trainer(tmp_path, *overrides) as trainer:
        parts = trainer.stateful_parts()
        covered = _covered(parts)
        absent = {name for name, part in parts.items() if part is None}
        stateful = {name for name, value in vars(trainer).items() if _has_state(value) and value is not trainer}
        forgotten = {name for name in stateful - set(Trainer.NOT_CHECKPOINTED)
                     if id(getattr(trainer, name)) not in covered}
        # A disabled GradScaler or no EMA is a part this run does not have: saved as None, as format 2 does.
        assert forgotten <= {"scaler"} and (not forgotten or "scaler" in absent), forgotten
        assert {"model", "optimizer", "scheduler", "loader", "rng", "nonfinite", "trainer"} <= parts.keys()


def test_a_snapshot_restores_into_a_fresh_trainer_part_by_part(tmp_path):
    with make_trainer(tmp_path / "a", "optim.ema_decay=0.9") as trainer:
        batches = iter(trainer.train_loader)
        for _ in range(3):
            trainer.train_step([next(batches)])
            trainer.step += 1
        saved = checkpoint.snapshot(trainer.stateful_parts())
    with make_trainer(tmp_path / "b", "optim.ema_decay=0.9") as fresh:
        fresh.load_checkpoint(saved, tmp_path / "saved.pt")
        again = checkpoint.snapshot(fresh.stateful_parts())
    assert saved.keys() == again.keys()
    flat_saved, flat_again = (torch.utils._pytree.tree_flatten({k: v for k, v in s.items() if k != "config"})[0]
                              for s in (saved, again))
    for a, b in zip(flat_saved, flat_again):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


class Counter:
    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_a_part_saved_but_not_restored_is_named():
    saved = checkpoint.snapshot({"model": Counter(), "forgotten": Counter()})
    with pytest.raises(UserInputError, match="no part of this trainer restores forgotten"):
        checkpoint.restore({"model": Counter()}, saved, "ckpt.pt")


def test_a_part_restored_but_never_saved_is_named():
    saved = checkpoint.snapshot({"model": Counter()})
    with pytest.raises(UserInputError, match="it lacks added"):
        checkpoint.restore({"model": Counter(), "added": Counter()}, saved, "ckpt.pt")


def test_a_trainer_whose_parts_lose_one_refuses_its_own_checkpoint(tmp_path, monkeypatch):
    with make_trainer(tmp_path) as trainer:
        saved = checkpoint.snapshot(trainer.stateful_parts())
        parts = trainer.stateful_parts()
        del parts["optimizer"]
        monkeypatch.setattr(trainer, "stateful_parts", lambda: parts)
        with pytest.raises(UserInputError, match="no part of this trainer restores optimizer"):
            trainer.load_checkpoint(saved, tmp_path / "saved.pt")


def test_a_part_that_does_not_fit_is_named_with_the_key_at_fault():
    model = torch.nn.Linear(3, 2)
    saved = checkpoint.snapshot({"model": torch.nn.Linear(3, 4)})
    with pytest.raises(UserInputError, match=r"its model does not fit this run: size mismatch for weight"):
        checkpoint.restore({"model": model}, saved, "ckpt.pt")
