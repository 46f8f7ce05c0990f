"""What rank 0 reports: console lines, a progress bar, metrics.jsonl in the run directory, and Weights & Biases."""
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from data.errors import ConfigError

# Which W&B panel section each local metric belongs to; anything unlisted goes under the split's own name.
PANEL = {"img_per_s": "perf", "data_wait": "perf", "step_time_s": "perf", "max_mem_mb": "sys"}


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
    """W&B group, which shows runs that belong together (an experiment's) side by side; null: no group."""
    every_steps: int = 50
    """Log train metrics every this many optimizer steps."""
    progress: bool = True
    """Show a progress bar on rank 0 when stderr is a terminal."""

    def __post_init__(self):
        if self.every_steps < 1:
            raise ConfigError("monitor.every_steps", f"must be >= 1, got {self.every_steps}")


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the records past `step` (written after the checkpoint a resumed run starts from) and a torn last line.

    Records are appended in step order and every resume truncates first, so what goes is a suffix: the file is
    cut in place, which needs no free space (a run that stopped on a full disk must be able to resume).
    """
    if not path.is_file():
        return
    keep_bytes = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                record = None
            if record is None or record["step"] > step:
                break
            keep_bytes += len(line)
    os.truncate(path, keep_bytes)


class Monitor:
    """Active on rank 0 only; every method is a no-op elsewhere so the loop needs no rank checks."""

    def __init__(self, cfg: MonitorConfig, run_dir: Path, enabled: bool, *, total_steps: int, start_step: int,
                 config: dict, wandb_id: Optional[str]):
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        truncate_metrics(self.metrics_path, start_step)
        self.file = open(self.metrics_path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress and sys.stderr.isatty()))
        if cfg.wandb:
            self._init_wandb(cfg, run_dir, config)

    def _init_wandb(self, cfg: MonitorConfig, run_dir: Path, config: dict) -> None:
        import wandb

        # resume="allow" with the id from the checkpoint: a restarted or requeued job continues the same run.
        self.wandb_run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                                    group=cfg.group, tags=list(cfg.tags), config=config, id=self.wandb_id,
                                    resume="allow", dir=str(run_dir))
        self.wandb_id = self.wandb_run.id
        self.wandb_run.define_metric("trainer/step")
        self.wandb_run.define_metric("trainer/images_seen")
        for section in ("train", "val", "val_ema", "perf", "sys"):
            self.wandb_run.define_metric(f"{section}/*", step_metric="trainer/step")

    def write(self, split: str, step: int, epoch: float, images_seen: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "epoch": round(epoch, 4), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({"trainer/step": step, "trainer/images_seen": images_seen,
                                **{f"{PANEL.get(k, split)}/{k}": v for k, v in metrics.items()}})
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.print(f"{split} step {step} epoch {epoch:.2f} {shown}")

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def print(self, message: str) -> None:
        if self.enabled:
            if self.bar.disable:
                print(message, flush=True)
            else:
                self.bar.write(message)

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
