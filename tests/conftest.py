"""Shared fixtures: a tiny demo-style dataset and a way to run the trainer as users do, in real processes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.make_demo_dataset import DemoParams, make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]

# Small enough to train in seconds on 2 cores; same generator as the real demo.
TINY = ["model.name=resnet20", "data.image_size=32", "data.val_resize=36", "data.num_threads=1",
        "data.crop_area=[0.25,1.0]", "train.batch_size=4", "train.precision=fp32", "train.epochs=2",
        "train.sync_bn=false", "schedule.warmup_epochs=0.5", "monitor.every_steps=1", "monitor.wandb=false",
        "checkpoint.every_steps=5"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x 24 train / 4 val images: 12 steps per epoch at 2 processes x batch 4."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny") / "data",
                             DemoParams(seed=1, classes=4, train_per_class=24, val_per_class=4))


def trainer_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": str(ROOT)}
    env.update(extra)
    return env


def trainer_command(nproc: int, *overrides: str) -> list:
    entry = ["-m", "trainer.main"]
    if nproc == 1:
        return [sys.executable, *entry, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *entry, *overrides]


def run_trainer(nproc: int, *overrides: str, timeout: float = 300, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_command(nproc, *overrides), cwd=ROOT, env=env or trainer_env(),
                          capture_output=True, text=True, timeout=timeout)
