"""What rank 0 reports besides the log: a progress bar, metrics.jsonl in the run directory, and Weights & Biases."""
import json
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

from common.errors import ConfigError
from common.log import log
from trainer.run_dir import METRICS, truncate_metrics

# Which W&B panel section each local metric belongs to; anything unlisted goes under the split's own name.
PANEL = {"img_per_s": "perf", "img_per_s_per_device": "perf", "data_wait": "perf", "data_wait_max": "perf",
         "step_time_s": "perf", "max_mem_mb": "sys", "max_mem_allocated_mb": "sys"}
# Summarised by their best value rather than the last one.
SUMMARY_MAX = ("val/top1", "val/top5", "val_ema/top1", "val_ema/top5")
IMAGES_SHOWN = 32


@dataclass
class MonitorConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline too: WANDB_MODE=offline); false turns it off."""
    project: str = "imagenet-resnet"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (user or team); null uses the account default."""
    name: Optional[str] = None
    """W&B run name; null uses the run directory's name."""
    tags: List[str] = field(default_factory=list)
    """W&B run tags."""
    group: Optional[str] = None
    """W&B group; null takes the Slurm job id under Slurm, else the run directory's name."""
    job_type: str = "train"
    """W&B job type, to tell training runs from evaluation or export jobs in a group."""
    every_steps: int = 50
    """Log train metrics every this many optimizer steps."""
    progress: bool = True
    """Show a progress bar on rank 0 when stderr is a terminal."""

    def __post_init__(self):
        if self.every_steps < 1:
            raise ConfigError("monitor.every_steps", f"must be >= 1, got {self.every_steps}")


def peak_memory_mb(device: torch.device) -> dict:
    """The most memory this process has held, in MiB: `max_mem_mb`, what a batch is sized by, and beside it
    `max_mem_allocated_mb`, what tensors took of it. On the CPU both are the peak resident set.

    On a GPU, max_mem_mb is the peak of torch's caching allocator's reserve (max_memory_reserved): blocks freed
    but kept and fragmentation count, since no other allocation can use them. Left out, since torch's allocator
    does not hand them out and DALI 2.4 reports nothing usable (Pipeline.executor_statistics is empty under its
    default dynamic executor, and lists only operator outputs under the old one): DALI's device memory, i.e. the
    mixed train decoder's device_memory_padding of 0.2 GB per data.num_threads thread (data/dali.py) and its
    data.prefetch output batches, as well as the CUDA context and NCCL's buffers. nvidia-smi shows the sum.
    """
    if device.type == "cuda":
        return {"max_mem_mb": torch.cuda.max_memory_reserved(device) / 2**20,
                "max_mem_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"max_mem_mb": resident, "max_mem_allocated_mb": resident}


def default_group(run_dir: Path) -> str:
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or run_dir.name


class Monitor:
    """Active on rank 0 only; every method is a no-op elsewhere so the loop needs no rank checks."""

    def __init__(self, cfg: MonitorConfig, run_dir: Path, enabled: bool, *, total_steps: int, start_step: int,
                 config: dict, wandb_id: Optional[str]):
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.metrics_path = run_dir / METRICS
        logged = truncate_metrics(self.metrics_path, start_step)
        # W&B history cannot be cut back as metrics.jsonl is (its rewind, resume_from, needs the server and counts
        # W&B's own _step), so a continued W&B run skips the steps it already has: after an exact resume they
        # repeat the very same values.
        self.wandb_skip_to = logged if wandb_id else 0
        self.file = open(self.metrics_path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress and sys.stderr.isatty()))
        if cfg.wandb:
            self._init_wandb(cfg, run_dir, config)

    def _init_wandb(self, cfg: MonitorConfig, run_dir: Path, config: dict) -> None:
        import wandb

        # resume="allow" with the id from the checkpoint: a restarted or requeued job continues the same run.
        self.wandb_run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                                    group=cfg.group or default_group(run_dir), job_type=cfg.job_type,
                                    tags=list(cfg.tags), config=config, id=self.wandb_id, resume="allow",
                                    dir=str(run_dir))
        self.wandb_id = self.wandb_run.id
        self.wandb_run.define_metric("trainer/step")
        self.wandb_run.define_metric("trainer/images_seen")
        self.wandb_run.define_metric("trainer/epoch")
        for name in SUMMARY_MAX:
            self.wandb_run.define_metric(name, step_metric="trainer/step", summary="max")
        for section in ("train", "val", "val_ema", "perf", "sys", "images"):
            self.wandb_run.define_metric(f"{section}/*", step_metric="trainer/step")

    def write(self, split: str, step: int, epoch: float, images_seen: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "epoch": round(epoch, 4), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None and step > self.wandb_skip_to:
            self.wandb_run.log({"trainer/step": step, "trainer/epoch": epoch, "trainer/images_seen": images_seen,
                                **{f"{PANEL.get(k, split)}/{k}": v for k, v in metrics.items()}})
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info(f"{split} step {step} epoch {epoch:.2f} {shown}")

    @property
    def wants_images(self) -> bool:
        return self.wandb_run is not None

    def images(self, split: str, step: int, images: torch.Tensor, mean: list, std: Optional[list]) -> None:
        """A grid of the first images of a batch as the model receives them, de-normalised back to 0-255 pixels:
        what to look at first when the preprocessing is in doubt."""
        if self.wandb_run is None:
            return
        import wandb
        from torchvision.utils import make_grid

        shown = images[:IMAGES_SHOWN].detach().float().cpu()
        scale = torch.tensor(std or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
        pixels = shown * scale + torch.tensor(mean).view(1, 3, 1, 1)
        grid = make_grid(pixels.clamp(0, 255).round().to(torch.uint8), nrow=8)
        caption = f"{split}: {len(shown)} images as fed to the model, de-normalised (mean {mean}, std {std})"
        self.wandb_run.log({"trainer/step": step, f"images/{split}": wandb.Image(grid, caption=caption)})

    def alert(self, title: str, text: str, error: bool = False) -> None:
        """A W&B alert (e-mail or Slack, as set in the W&B user settings); offline, it is written to the run's file
        with the rest."""
        if self.wandb_run is None:
            return
        import wandb

        self.wandb_run.alert(title=title, text=text,
                             level=wandb.AlertLevel.ERROR if error else wandb.AlertLevel.INFO)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    @property
    def wandb_where(self) -> Optional[str]:
        if self.wandb_run is None:
            return None
        return self.wandb_run.url or self.wandb_run.dir

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
