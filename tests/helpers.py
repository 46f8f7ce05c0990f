"""Plain helpers shared by the tests: generated images, running the trainer, reading its runs, polling, processes.

The fixtures built on these are in conftest.py.
"""
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import SEED_MEAN
from trainer.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

CLASSES = ("n01", "n02", "n03")
# Real image archives for tests and benchmarks (their README says what they hold); never needed to install or run.
SHARED_DATASETS = Path(os.environ.get("SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """The archive `name` of ../shared/datasets/ (or $SHARED_DATASETS), or the test is skipped saying why."""
    path = SHARED_DATASETS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real-image tests need ../shared/datasets/ beside the checkout "
                    "(CI has it), or SHARED_DATASETS=DIR")
    return path


def extract_subset(archive: Path, out: Path, per_class: dict) -> Path:
    """The first per_class[split] files of each class (by name) of an archive laid out as <top>/<split>/<class>/<file>,
    extracted alone into `out`; returns out/<top>."""
    with tarfile.open(archive) as tar:
        by_folder = defaultdict(list)
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and parts[1] in per_class:
                by_folder[parts[0], parts[1], parts[2]].append(member)
        chosen = [m for (_, split, _), members in sorted(by_folder.items())
                  for m in sorted(members, key=lambda m: m.name)[:per_class[split]]]
        tar.extractall(out, members=chosen, filter="data")
    return out / chosen[0].name.split("/")[0]


def code_colour(code: int):
    """A solid colour that identifies one image: the red channel carries the code."""
    return (20 + 6 * code, 200 - 4 * code, 90)


def decode_code(red: float) -> int:
    return round((red - 20) / 6)


def write_image(path: str, pixels: np.ndarray):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def make_coded(root: str, train_per_class: int = 8, val_per_class: int = 3):
    """Solid-colour images of varied sizes; returns {split: [(class index, code)]} in file order.

    The colour of each image encodes its code (see code_colour), so a test can tell which file a sample came
    from after any crop, resize or flip.
    """
    rng = np.random.default_rng(1)
    index = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        index[split] = []
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                code = len(index[split])
                h, w = rng.integers(40, 121, 2)
                suffix = (".JPEG", ".jpg", ".jpeg")[code % 3]
                write_image(os.path.join(root, split, name, f"img{i:02d}{suffix}"),
                            np.full((h, w, 3), code_colour(code), np.uint8))
                index[split].append((label, code))
    return index


def make_smooth(root: str, per_class: int = 3):
    """Smooth random images (low-frequency content) of varied sizes, for comparing resize implementations."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for name in CLASSES:
            for i in range(per_class):
                h, w = rng.integers(40, 121, 2)
                coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
                write_image(os.path.join(root, split, name, f"s{i}.JPEG"),
                            np.asarray(coarse.resize((int(w), int(h)), Image.BICUBIC)))


def encoded(mode: str = "RGB", image_format: str = "JPEG", seed: int = 0, size=(48, 64)) -> bytes:
    """Random pixels converted to `mode` and encoded as `image_format`: noise, so that a cut lands in scan data."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, image_format)
    return out.getvalue()


# Small enough to train in seconds on 2 cores; same generator as the real demo.
TINY = ["model.name=resnet20", "data.image_size=32", "data.val_resize=36", "data.num_threads=1",
        "data.crop_area=[0.25,1.0]", "train.batch_size=4", "train.precision=fp32", "train.epochs=2",
        "train.sync_bn=false", "schedule.warmup_epochs=0.5", "monitor.every_steps=1", "monitor.wandb=false",
        "checkpoint.every_steps=5"]
# conftest's ddp_run: TINY with an EMA (so that it has val_ema figures) and every checkpoint kept.
DDP_RUN = [*TINY, "optim.ema_decay=0.9", "checkpoint.keep=10"]


def trainer_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": str(ROOT)}
    env.update(extra)
    return env


def module_command(nproc: int, module: str, *args: str) -> list:
    """`python -m module args` in one process, or in `nproc` under torchrun on this host."""
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def trainer_command(nproc: int, *overrides: str) -> list:
    return module_command(nproc, "trainer.main", *overrides)


def main_in_process(argv: list, capsys) -> tuple:
    """(exit code, stdout, stderr) of trainer.main run in this process: what a process around it would add is
    start-up, for the tests that check one process's outcome and messages."""
    from trainer.main import main  # here, not at the top: most helpers' users never import the trainer
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_trainer(nproc: int, *overrides: str, timeout: float = 300,
                env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_command(nproc, *overrides), cwd=ROOT, env=env or trainer_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


STEPS_PER_EPOCH = 10  # of short_run on the tiny_demo dataset: 160 train images at batch 8 on 2 ranks


def short_run(data_root, epochs=2):
    """Overrides of configs/demo.yaml for a run of epochs * 10 steps with a checkpoint every 4."""
    return [f"data.root={data_root}", "data.demo=false", "train.batch_size=8", f"train.epochs={epochs}",
            "monitor.wandb=false", "monitor.every_steps=1", "checkpoint.every_steps=4"]


def launch_env(**extra):
    """This environment with the venv's torchrun first on PATH and the demo preset selected."""
    env = dict(os.environ, CONFIG="configs/demo.yaml", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def metrics(run_dir, split=None) -> list:
    """The records of the run's metrics.jsonl (of one split if given); none before the run has written any."""
    try:
        records = read_metrics(Path(run_dir))
    except FileNotFoundError:
        return []
    return [r for r in records if split is None or r["split"] == split]


def last_train_step(run_dir) -> int:
    return max((r["step"] for r in metrics(run_dir, "train")), default=0)


def final_checkpoint(run_dir):
    ckpt_dir = Path(run_dir) / "checkpoints"
    return torch.load(ckpt_dir / (ckpt_dir / "latest").read_text().strip(), map_location="cpu", weights_only=True)


def assert_same_model(run_dir, reference_dir):
    ours, theirs = final_checkpoint(run_dir), final_checkpoint(reference_dir)
    assert ours["step"] == theirs["step"]
    assert ours["model"].keys() == theirs["model"].keys()
    differing = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not differing, f"tensors differ from the uninterrupted run: {differing[:5]}"


def wait_for(condition, timeout_s, what, interval_s=0.2):
    """Polls `condition` until it returns something truthy (returned) or the deadline passes (test failure)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes():
    """(pid, parent pid, environment) of every process this user can read, skipping those that end meanwhile."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        yield int(proc.name), ppid, dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)


def worker_pids(agent_pid):
    """{RANK: pid} of the workers a torchrun agent started (its direct children that carry a RANK)."""
    return {int(env["RANK"]): pid for pid, ppid, env in processes() if ppid == agent_pid and "RANK" in env}


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_fields(cluster, job_id):
    """scontrol's one-line record of the job as {field: value} (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=cluster.env(), capture_output=True,
                         text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_until_final(cluster, job_id, timeout_s):
    def ended():
        return job_fields(cluster, job_id)["JobState"] in FINAL_STATES
    wait_for(ended, timeout_s, f"job {job_id} to end", interval_s=1)
    return job_fields(cluster, job_id)


def codes(images, mean=SEED_MEAN, std=None):
    """The code of each sample of a batch of coded images, read from the red channel of its centre pixel."""
    red = images[:, 0, images.shape[2] // 2, images.shape[3] // 2].float()
    red = red * (std[0] if std else 1) + mean[0]
    return [decode_code(r) for r in red.tolist()]


def run(loader_, batches):
    out, it = [], iter(loader_)
    while len(out) < batches:
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(loader_)
    return out


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
