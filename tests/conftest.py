"""Fixtures for every test: tiny demo-style datasets, the real image archives of ../shared/datasets/ and the
throwaway local Slurm. Plain helpers are in helpers.py."""
import tarfile
from pathlib import Path

import pytest

from data.make_demo_dataset import DemoParams, make_demo_dataset
from data.make_shards import make_shards
from tests.helpers import DDP_RUN, run_trainer, shared_dataset
from tests.slurm_cluster import LocalSlurm, missing_reason


def _extract(archive: Path, out: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory) -> Path:
    """Real CIFAR-10 in ImageNet layout (train/<class>/*.jpg: 5000 a class, val/: the 10000 test images), from
    ../shared/datasets/cifar10-jpeg.tar; skipped where the archive is absent (a user's machine; CI has it)."""
    return _extract(shared_dataset("cifar10-jpeg.tar"), tmp_path_factory.mktemp("cifar10")) / "cifar10"


@pytest.fixture(scope="session")
def imagenet_samples(tmp_path_factory) -> Path:
    """One real ImageNet JPEG per class (val/<wnid>/*.JPEG, 1000 files, 23 of them grayscale), from
    ../shared/datasets/imagenet-samples.tar; skipped where the archive is absent."""
    return _extract(shared_dataset("imagenet-samples.tar"), tmp_path_factory.mktemp("imagenet")) / "imagenet-samples"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """For helpers.TINY: 4 classes x 24 train / 4 val images, 12 steps per epoch at 2 processes x batch 4."""
    # One worker: a fork pool started after in-process tests have started threads (DALI's, torch's) can deadlock.
    return make_demo_dataset(tmp_path_factory.mktemp("tiny") / "data",
                             DemoParams(seed=1, classes=4, train_per_class=24, val_per_class=4), workers=1)


@pytest.fixture(scope="session")
def ddp_run(tiny_data, tmp_path_factory):
    """(run dir, finished process) of one two-process helpers.DDP_RUN on tiny_data: 24 steps with an EMA, every
    checkpoint kept. The tests that only read a two-rank run's outputs (test_trainer_ddp, test_evaluate) share it."""
    run_dir = tmp_path_factory.mktemp("ddp_run") / "run"
    result = run_trainer(2, *DDP_RUN, f"data.root={tiny_data}", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="session")
def tiny_shards(tiny_data, tmp_path_factory) -> Path:
    """tiny_data as data.make_shards' shards of about 200 kB (some 10 images): 12 train shards, 2 val."""
    out = tmp_path_factory.mktemp("tiny_shards")
    make_shards(tiny_data, out, shard_size=200_000, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """For helpers.short_run: the demo's 10 classes x 16 train / 4 val images, 10 steps per epoch at 2 x batch 8."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_demo"), DemoParams(train_per_class=16, val_per_class=4),
                             workers=1)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running two-node cluster; skipped only where Slurm is not installed or cannot run as this user."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    # A start failure on a machine that has everything is a bug and fails the tests that need the cluster.
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
