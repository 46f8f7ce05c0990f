"""The root config: the components' dataclasses composed, merged from defaults <- YAML <- command line,
validated once."""
import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from data.errors import ConfigError
from trainer.checkpoint import CheckpointConfig
from trainer.config_docs import describe
from trainer.distributed import DistributedConfig
from trainer.models import ModelConfig
from trainer.monitor import MonitorConfig
from trainer.optim import OptimConfig, ScheduleConfig

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """Run directory (config.yaml, metrics.jsonl, checkpoints/); null means runs/<config file name>, so the
    same command resumes the same run."""


@dataclass
class TrainConfig:
    batch_size: int = 256
    """Images per process per micro-batch; the global batch is batch_size x world_size x grad_accum."""
    epochs: int = 90
    """Epochs of the schedule."""
    max_steps: int = 0
    """Stop after this many optimizer steps (tests, benchmarks); 0 runs all epochs. The schedule is unchanged."""
    precision: str = "bf16"
    """fp32, bf16 (autocast, CUDA and CPU) or fp16 (autocast with GradScaler, CUDA only); the loader delivers
    images in the same dtype."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    label_smoothing: float = 0.1
    """Label smoothing of the training loss."""
    channels_last: bool = True
    """Run the model in channels_last memory format (faster for convolutions on tensor cores and oneDNN); the
    loader then delivers NHWC images."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    sync_bn: bool = False
    """Synchronize BN statistics across GPUs (CUDA only; on CPU a warning is printed and plain BN is used). Off by
    default, as in NVIDIA's recipe and torchvision's: at 256 images per GPU it buys no accuracy, and it adds two
    blocking collectives per BN layer on DDP's communicator and gives up cuDNN's NHWC batch norm. For small
    per-GPU batches (detection, segmentation)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the fixed input shape (off under deterministic)."""
    deterministic: bool = False
    """Deterministic GPU kernels (cuDNN without autotuning, torch.use_deterministic_algorithms), so that a resumed
    run repeats an uninterrupted one bit for bit on GPUs too, at some speed; CPU runs are deterministic anyway."""
    eval_every_epochs: int = 1
    """Evaluate on the val split every this many epochs, and always at the end."""
    max_nonfinite_steps: int = 20
    """Stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped)."""
    stop_check_every: int = 10
    """Steps between the ranks' agreement on a stop signal (a host-side all-reduce that waits for the slowest
    rank); Slurm's 120 s warning leaves room for many steps, and checking every step would stall fast GPUs."""
    threads: int = 0
    """Intra-op CPU threads per process; 0 keeps PyTorch's default (torchrun sets OMP_NUM_THREADS=1)."""

    def __post_init__(self):
        for key in ("batch_size", "epochs", "grad_accum", "eval_every_epochs", "max_nonfinite_steps",
                    "stop_check_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", f"got {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.compile and self.sync_bn:
            raise ConfigError("train.compile", "torch.compile breaks the graph at every SyncBatchNorm "
                                               "(pytorch/pytorch#161302), losing what compiling buys; set "
                                               "train.sync_bn=false or train.compile=false")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("train.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


@dataclass
class Config:
    seed: int = 0
    """Seed of model init, data order and augmentation; the same seed gives the same run."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _config_error(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    message = str(getattr(e, "msg", e)).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError":
        message = f"unknown key ({message})"
    return ConfigError(key, f"{message} [from {source}]")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__, epilog=describe(Config),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml); keys override the defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the YAML, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


def load_config(config_file: Optional[Path], overrides: List[str], base: Optional[dict] = None) -> Config:
    """Defaults <- `base` (a recorded config, e.g. a checkpoint's) <- YAML <- overrides; any unknown key, wrong
    type or out-of-range value raises ConfigError."""
    merged = OmegaConf.structured(Config)
    if base is not None:
        try:
            merged = OmegaConf.merge(merged, base)
        except OmegaConfBaseException as e:
            raise _config_error(e, "the recorded config") from None
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError("--config", f"no such file: {config_file}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(config_file))  # YAML is data: safe_load, no tags
        except OmegaConfBaseException as e:
            raise _config_error(e, str(config_file)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides take the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _config_error(e, "the command line") from None
    if merged.run.dir is None:
        merged.run.dir = str(Path("runs") / (config_file.stem if config_file else "default"))
    try:
        cfg = OmegaConf.to_object(merged)  # instantiates the dataclasses, running each __post_init__ check
    except OmegaConfBaseException as e:
        raise _config_error(e, "the merged config") from None
    return cfg


# Keys a resumed run may change: they say how the run is operated, not what it computes. optim.lr is applied
# too, by rescaling the schedule (Trainer.apply_lr); any other change is refused, since the checkpoint's
# optimizer, schedule and data order would quietly keep the old meaning while config.yaml claimed the new one.
CHANGEABLE_ON_RESUME = (
    "run.", "monitor.", "checkpoint.", "distributed.", "data.root", "data.demo", "data.num_threads",
    "data.prefetch", "data.hw_decoder_load", "train.max_steps", "train.threads", "train.stop_check_every",
    "train.eval_every_epochs", "train.max_nonfinite_steps", "train.compile", "train.cudnn_benchmark",
    "train.deterministic",
    "train.channels_last", "optim.lr",
)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict:
    """{key: (saved value, current value)} for every key of both configs whose value differs. A key only one of
    them has came or went with a new version of this code, not with the user's command: it is not a change."""
    old, new = flatten(saved), flatten(current)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def changeable_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in CHANGEABLE_ON_RESUME)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
