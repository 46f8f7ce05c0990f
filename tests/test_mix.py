"""Mixup and CutMix on the device (trainer/mix.py): what each does to a batch, and that the step uses them."""
import copy

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from data.sharding import derive_seed
from tests.test_trainer_unit import make_trainer
from trainer.config import load_config
from trainer.mix import BatchMix

CLASSES = 5


def batch(n=6, side=16):
    torch.manual_seed(0)
    return torch.randn(n, 3, side, side), torch.arange(n) % CLASSES


def one_hot(labels):
    return torch.eye(CLASSES)[labels]


def test_mixup_blends_each_image_and_target_with_the_batch_mirrored_by_the_same_lam():
    images, labels = batch()
    mixed, targets = BatchMix(0.4, 0.0, CLASSES)(images, labels, seed=3)
    lam = np.random.default_rng(3).beta(0.4, 0.4)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    assert torch.allclose(targets, lam * one_hot(labels) + (1 - lam) * one_hot(labels.flip(0)), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(len(labels)))


def test_cutmix_pastes_one_box_from_the_mirror_and_weighs_targets_by_the_area_kept():
    images, labels = batch(side=32)
    for seed in range(20):
        mixed, targets = BatchMix(0.0, 1.0, CLASSES)(images, labels, seed=seed)
        from_partner = (mixed == images.flip(0)) & (mixed != images)
        kept = (mixed == images).all(1)[0].float().mean().item()
        assert torch.equal(from_partner.any(1), from_partner.all(1))  # whole pixels, every channel
        rows, cols = from_partner[0, 0].nonzero(as_tuple=True)
        if len(rows):  # the pasted pixels form one rectangle
            assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert torch.allclose(targets, kept * one_hot(labels) + (1 - kept) * one_hot(labels.flip(0)), atol=1e-6)


def test_with_both_each_batch_takes_one_of_the_two():
    images, labels = batch(side=32)
    kinds = set()
    for seed in range(40):
        mixed, _ = BatchMix(0.4, 1.0, CLASSES)(images, labels, seed=seed)
        untouched = (mixed == images).all(1).float().mean().item()
        kinds.add("cutmix" if untouched > 0 else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_the_same_seed_mixes_the_same_way():
    images, labels = batch()
    first, second = (BatchMix(0.2, 1.0, CLASSES)(images, labels, seed=7) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("key", ["train.mixup_alpha", "train.cutmix_alpha"])
def test_negative_alphas_are_refused(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=-0.1"])
    assert e.value.key == key


@pytest.mark.parametrize("option", ["train.mixup_alpha=0.4", "train.cutmix_alpha=1.0"])
def test_the_step_trains_on_the_mixed_batch(tmp_path, option):
    with make_trainer(tmp_path / "plain") as plain, make_trainer(tmp_path / "mixed", option) as mixed:
        images, labels = next(iter(plain.train_loader))
        reference = copy.deepcopy(mixed.raw_model)
        mixed.train_step([(images, labels)])
        plain.train_step([(images, labels)])
        assert not torch.equal(plain.raw_model.fc.weight, mixed.raw_model.fc.weight)

        x, targets = mixed.mix(images, labels, derive_seed(mixed.cfg.seed, 0, 0, 0))
        loss = torch.nn.functional.cross_entropy(reference(x), targets)
        loss.backward()
        lr = mixed.optimizer.param_groups[0]["lr"]
        expected = reference.fc.weight - lr * (reference.fc.weight.grad + 1e-4 * reference.fc.weight)
        assert torch.allclose(mixed.raw_model.fc.weight, expected, atol=1e-6)
