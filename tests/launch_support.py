"""Shared by the launcher tests: a tiny demo dataset, short-run overrides, polling and checkpoint comparison."""
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# 160 train images at batch 8 on 2 ranks: 10 steps per epoch, a step every few tenths of a second on this CPU.
TINY_PER_CLASS = dict(train_per_class=16, val_per_class=4)
STEPS_PER_EPOCH = 10


def short_run(data_root, epochs=2):
    """Overrides of configs/demo.yaml for a run of epochs * 10 steps with a checkpoint every 4."""
    return [f"data.root={data_root}", "data.demo=false", "train.batch_size=8", f"train.epochs={epochs}",
            "monitor.wandb=false", "monitor.every_steps=1", "checkpoint.every_steps=4"]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    from data.make_demo_dataset import DemoParams, make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_demo"), DemoParams(**TINY_PER_CLASS), workers=1)


def launch_env(**extra):
    """This environment with the venv's torchrun first on PATH and the demo preset selected."""
    env = dict(os.environ, CONFIG="configs/demo.yaml", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s, what, interval_s=0.2):
    """Polls `condition` until it returns something truthy (returned) or the deadline passes (test failure)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def metrics(run_dir, split=None):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    # A line being written may be incomplete; only complete lines count.
    lines = path.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines if line.endswith("\n")]
    return [r for r in records if split is None or r["split"] == split]


def last_train_step(run_dir):
    steps = [r["step"] for r in metrics(run_dir, "train")]
    return max(steps, default=0)


def final_checkpoint(run_dir):
    ckpt_dir = Path(run_dir) / "checkpoints"
    return torch.load(ckpt_dir / (ckpt_dir / "latest").read_text().strip(), map_location="cpu", weights_only=True)


def assert_same_model(run_dir, reference_dir):
    ours, theirs = final_checkpoint(run_dir), final_checkpoint(reference_dir)
    assert ours["step"] == theirs["step"]
    assert ours["model"].keys() == theirs["model"].keys()
    differing = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not differing, f"tensors differ from the uninterrupted run: {differing[:5]}"


def worker_pids(agent_pid):
    """{RANK: pid} of the workers a torchrun agent started (its direct children that carry a RANK)."""
    workers = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if "RANK" in env:
            workers[int(env["RANK"])] = int(proc.name)
    return workers
