"""What every part of the GPU check gets: the mode's sizes, the scratch folder, the ResNet-50 preset and the real
Trainer; and what a part gives back: Passed (its figures and headline), or CheckFailed (with the figures it got)."""
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from data.make_demo_dataset import DemoParams
from trainer import distributed
from trainer.config import load_config
from trainer.distributed import Dist
from trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "resnet50_imagenet.yaml"


@dataclass(frozen=True)
class Passed:
    headline: str
    """One line that sums the figures up, for the console and gpu_check.md."""
    figures: dict
    """Everything measured, for gpu_check.json."""


class CheckFailed(Exception):
    def __init__(self, reason: str, **figures):
        super().__init__(reason)
        self.figures = figures


@dataclass(frozen=True)
class Sizes:
    model: str
    """Model of every part (the preset's ResNet-50 on a GPU)."""
    batch: int
    """Batch of the loader and throughput parts."""
    image_size: int
    """Train crop side of the loader, throughput and resume parts."""
    unique_images: int
    """Distinct train JPEGs: generated ones (val gets about a fifth), or the real samples of this many classes, one a
    class (all 1000 on a GPU; val holds the same files)."""
    copies: int
    """Hard links per train JPEG, so that one epoch outlasts every measurement without more distinct images."""
    loader_warmup: int
    """Loader part: batches before the clock starts (pipeline build, prefetch fill)."""
    loader_batches: int
    """Loader part: batches measured."""
    train_warmup: int
    """Throughput parts: steps before the measured window (cuDNN autotuning, compile, prefetch fill)."""
    train_steps: int
    """Throughput parts: measured steps."""
    short_image_size: int
    """fp16/bf16 parts: crop side on the demo dataset."""
    short_batch: int
    """fp16/bf16 parts: batch."""
    short_steps: int
    """fp16/bf16 parts: optimizer steps, all within the demo set's first epoch (no epoch-end checkpoint)."""
    short_lr: float
    """fp16/bf16 parts: optim.lr (per 256 images, constant, no warmup)."""
    demo: DemoParams
    """The learnable demo dataset of the fp16/bf16 parts: at least short_steps x short_batch train images."""
    step_steps: int
    """fp16_skip, sync_free and compile_ddp parts: steps checked (at the short crop and batch)."""
    compile_ddp_model: str
    """compile_ddp part: the model compiled with DDP, smaller than the preset's so that its compile fits the box."""
    resume_batch: int
    """Resume part: batch, on the demo set at the short crop."""
    resume_steps: int
    """Resume part: steps of the straight run, within the demo set's first epoch; the interrupted run stops at half
    and resumes."""
    threads: int
    """DALI CPU threads (data.num_threads) and image generator processes."""


GPU = Sizes(model="resnet50", batch=256, image_size=224, unique_images=1024, copies=11, loader_warmup=3,
            loader_batches=20, train_warmup=5, train_steps=20,
            short_image_size=64, short_batch=32, short_steps=30, short_lr=0.2,
            demo=DemoParams(seed=1, classes=4, train_per_class=256, val_per_class=8),
            step_steps=8, compile_ddp_model="resnet18",
            resume_batch=32, resume_steps=8, threads=min(os.cpu_count() or 1, 16))
CPU_SMOKE = Sizes(model="resnet20", batch=8, image_size=32, unique_images=40, copies=2, loader_warmup=1,
                  loader_batches=4, train_warmup=2, train_steps=4,
                  short_image_size=32, short_batch=8, short_steps=10, short_lr=3.2,
                  demo=DemoParams(seed=1, classes=4, train_per_class=24, val_per_class=2),
                  step_steps=2, compile_ddp_model="resnet20",
                  resume_batch=8, resume_steps=6, threads=1)


def tree_differences(a, b, path: str = "") -> list:
    """Paths at which two trees of dicts, lists and tensors differ; tensors must match bitwise (dtype, shape and
    every bit: -0.0 differs from 0.0, a NaN equals the same NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in tree_differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
        return [] if same else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def tree_tensors(tree, path: str = ""):
    """(path, tensor) for every tensor in a tree of dicts and lists."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_tensors(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tree_tensors(v, f"{path}[{i}]")


@dataclass(frozen=True)
class Context:
    mode: str
    """gpu or cpu-smoke."""
    work: Path
    """Scratch folder shared by the parts: the images, run directories."""
    progress_file: Optional[Path] = None
    """Where the part notes how far it got, for the runner to read if it has to kill it."""
    partial_file: Optional[Path] = None
    """Where the part keeps what it has measured so far, which the runner reports if it has to kill it."""

    def progress(self, phase: str) -> None:
        if self.progress_file is not None:
            self.progress_file.write_text(phase + "\n")

    def record(self, **figures) -> None:
        """Adds `figures` (a `headline` among them, if the part has one yet) to what the runner reports should the
        part's box run out before it returns."""
        if self.partial_file is None:
            return
        temp = self.partial_file.with_suffix(".tmp")
        temp.write_text(json.dumps({**self.recorded(), **figures}, default=str))
        os.replace(temp, self.partial_file)  # the runner never reads half a file

    def recorded(self) -> dict:
        """What `record` has kept so far."""
        if self.partial_file is None or not self.partial_file.is_file():
            return {}
        return json.loads(self.partial_file.read_text())

    @property
    def sizes(self) -> Sizes:
        return GPU if self.mode == "gpu" else CPU_SMOKE

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.mode == "gpu" else torch.device("cpu")

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def demo(self) -> Path:
        return self.work / "demo"

    def config(self, *overrides: str):
        """The ResNet-50 preset at this mode's sizes, without W&B, with the overrides last."""
        s = self.sizes
        return load_config(PRESET, [
            f"model.name={s.model}", f"data.image_size={s.image_size}", f"data.val_resize={s.image_size * 8 // 7}",
            f"data.num_threads={s.threads}", f"train.batch_size={s.batch}", "monitor.wandb=false",
            "monitor.progress=false", "checkpoint.every_steps=0", "checkpoint.keep=1", *overrides])

    def run_trainer(self, name: str, *overrides: str, dist: Optional[Dist] = None,
                    inspect: Optional[Callable[[Trainer], None]] = None) -> tuple:
        """Runs the real Trainer in this process on the preset (`inspect` sees it built, before it trains); returns
        (run dir, the step it started at).

        Under train.compile, the progress reads `compiled` once the first train record is written: its steps
        included the compile.
        """
        run_dir = self.work / "runs" / name
        cfg = self.config(f"run.dir={run_dir}", *overrides)
        done = threading.Event()
        if cfg.train.compile:
            self.progress("compiling")
            threading.Thread(target=self._note_compiled, args=(run_dir / "metrics.jsonl", done), daemon=True).start()
        try:
            with Trainer(cfg, dist or distributed.init(cfg.distributed)) as trainer:
                start = trainer.step
                if inspect is not None:
                    inspect(trainer)
                code = trainer.train()
        finally:
            done.set()
        if code != 0:
            raise CheckFailed(f"the trainer exited {code}")
        return run_dir, start

    def _note_compiled(self, metrics: Path, done: threading.Event) -> None:
        while not done.wait(0.2):
            if metrics.is_file() and metrics.stat().st_size > 0:
                self.progress("compiled")
                return
