"""The root config: the components' dataclasses composed, merged from defaults <- YAML <- command line,
validated once."""
import argparse
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError
from data.config import DataConfig
from trainer.checkpoint import CheckpointConfig
from trainer.config_docs import describe
from trainer.distributed import Dist, DistributedConfig
from trainer.models import ModelConfig
from trainer.monitor import MonitorConfig
from trainer.optim import OptimConfig, ScheduleConfig
from trainer.precision import INPUT_DTYPE, PRECISIONS

# Past 2**53 an int is no longer exact as a float (metrics.jsonl, W&B) and overflows the C types torch, numpy and
# DALI take; no count this trainer makes comes near it. Fields with a real limit check a tighter one.
MAX_INT = 2**53
MAX_BATCH_SIZE = 65536
MAX_THREADS = 1024


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """Run directory (config.yaml, metrics.jsonl, checkpoints/); null means runs/<config file name>, so the
    same command resumes the same run."""


@dataclass
class TrainConfig:
    batch_size: int = 256
    """Images per process per micro-batch; the global batch is batch_size x world_size x grad_accum. At most 65536:
    that many 224 px crops are 39 GB in fp32, more than one accelerator holds."""
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
    mixup_alpha: float = 0.0
    """Mixup (Zhang et al. 2018) of each training batch on the device, lam ~ Beta(alpha, alpha); 0 turns it off.
    torchvision's reference recipe uses 0.2, timm's 0.8. It pays off in long runs (the Bag of Tricks trains 200
    epochs with it), not in a handful of epochs (trainer/mix.py)."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al. 2019) of each training batch on the device; 0 turns it off; torchvision's reference and
    timm use 1.0. With mixup_alpha also set, each batch takes one of the two at even odds."""
    channels_last: bool = True
    """Run the model in channels_last memory format (faster for convolutions on tensor cores and oneDNN); the
    loader then delivers NHWC images."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    sync_bn: bool = False
    """Synchronize BN statistics across GPUs (CUDA only; on CPU a warning is printed and plain BN is used). Off by
    default, as in NVIDIA's recipe and torchvision's: at 256 images per GPU it buys no accuracy, and it gives up
    cuDNN's NHWC batch norm and costs, per BN layer (53 in ResNet-50) and micro-batch, two collectives on DDP's
    communicator that the compute stream waits for (an all_gather of the statistics in forward, an all_reduce in
    backward) and three host-GPU syncs in forward: PyTorch 2.14's SyncBatchNorm drops empty ranks' statistics
    with three boolean-mask indexings, each a nonzero() that waits for the GPU (159 per ResNet-50 forward), so the
    host cannot queue work ahead. For small per-GPU batches (detection, segmentation)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the fixed input shape (off under deterministic)."""
    deterministic: bool = False
    """Deterministic GPU kernels (cuDNN without autotuning, torch.use_deterministic_algorithms), so that a resumed
    run repeats an uninterrupted one bit for bit on GPUs too, at some speed; CPU runs are deterministic anyway."""
    eval_flip: bool = False
    """Validation averages the logits of each image and of its left-right flip (FFCV's lr_tta, which adds them:
    the same predictions; the mean keeps the loss comparable); in trainer.evaluate too. Twice the val forward cost."""
    eval_every_epochs: int = 1
    """Evaluate on the val split every this many epochs, and always at the end."""
    max_nonfinite_steps: int = 20
    """Stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped)."""
    stop_check_every: int = 10
    """Steps between the ranks' agreement on a stop signal (a host-side all-reduce that waits for the slowest
    rank); Slurm's 120 s warning leaves room for many steps, and checking every step would stall fast GPUs."""
    threads: int = 0
    """Intra-op CPU threads per process; 0 keeps PyTorch's default (torchrun sets OMP_NUM_THREADS=1). At most
    1024, past any host's core count (torch.set_num_threads takes a C int)."""

    def __post_init__(self):
        for key in ("batch_size", "epochs", "grad_accum", "eval_every_epochs", "max_nonfinite_steps",
                    "stop_check_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ConfigError("train.batch_size", f"must be <= {MAX_BATCH_SIZE} per process, got {self.batch_size}")
        if self.threads > MAX_THREADS:
            raise ConfigError("train.threads", f"must be <= {MAX_THREADS}, got {self.threads}")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", f"got {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.compile and self.sync_bn:
            raise ConfigError("train.compile", "torch.compile breaks the graph at every SyncBatchNorm "
                                               "(pytorch/pytorch#161302), losing what compiling buys; set "
                                               "train.sync_bn=false or train.compile=false")
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}", f"must be >= 0 (0 turns it off), got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("train.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


@dataclass
class Config:
    seed: int = 0
    """Seed of model init, data order and augmentation; the same seed gives the same run. In [0, 2**32): numpy's
    seed is 32 bits."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise ConfigError("seed", f"must be in [0, 2**32), got {self.seed}")
        self.schedule.check_epochs(self.train.epochs)


def _describe(e: OmegaConfBaseException) -> Tuple[str, str]:
    key = getattr(e, "full_key", None) or ""
    message = str(getattr(e, "msg", None) or e).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError":
        message = f"unknown key ({message})"
    return key, message


def _config_error(e: OmegaConfBaseException, source: str) -> ConfigError:
    key, message = _describe(e)
    return ConfigError(key or "?", f"{message} [from {source}]")


def _key_lines(text: str) -> Dict[str, int]:
    """The line of every key and list item of a YAML text that parsed, as omegaconf names them (a.b, a.b[0])."""
    lines = {}

    def visit(node: yaml.Node, key: str) -> None:
        if isinstance(node, yaml.MappingNode):
            children = [(f"{key}.{k.value}" if key else str(k.value), k, v) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(f"{key}[{i}]", v, v) for i, v in enumerate(node.value)]
        else:
            return
        for child_key, marked, child in children:
            lines.setdefault(child_key, marked.start_mark.line + 1)
            visit(child, child_key)

    visit(yaml.compose(text, Loader=yaml.SafeLoader), "")  # compose builds nodes only: no tag is constructed
    return lines


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError("--config", f"{path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError("--config", f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); "
                                      "is this a YAML file?") from None


def _parse_yaml(path: Path, text: str) -> DictConfig:
    """The file's mapping; a YAML error or a document that is not a mapping raises ConfigError naming the line."""
    try:
        # omegaconf loads with yaml's SafeLoader: a tag such as !!python/object/apply builds nothing and runs nothing.
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = f"{e.context}: {e.problem}" if e.context else e.problem
        raise ConfigError("--config", f"{path}:{mark.line + 1 if mark else 1}: {problem}") from None
    except yaml.reader.ReaderError as e:  # a character YAML forbids, such as NUL
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError("--config", f"{path}:{line}: {str(e).splitlines()[0]}") from None
    except OSError:  # omegaconf's answer to a document that is a single number
        loaded = None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else "a single value"
        raise ConfigError("--config", f"{path}:1: the top level must be a mapping of keys (seed: 0, train: ...), "
                                      f"not {kind}")
    return loaded


def _numbers(node, key: str = "") -> Iterator[Tuple[str, object]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


def _check_numbers(values: dict) -> None:
    """Every float finite and every int within MAX_INT, before the dataclasses' own checks run: nan fails every
    comparison, so a check like `x < 0` lets it through, and inf or 10**23 crash the code they reach."""
    for key, value in _numbers(values):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigError(key, f"must be within +-2**53, got {value}")


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
        text = _read_text(config_file)
        try:
            merged = OmegaConf.merge(merged, _parse_yaml(config_file, text))
        except OmegaConfBaseException as e:  # an unknown key, a wrong type, a bad interpolation
            key, message = _describe(e)
            line = _key_lines(text).get(key, 1)
            raise ConfigError(key or "--config", f"{config_file}:{line}: {message}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides take the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            key, message = _describe(e)
            raise ConfigError(key or item.split("=")[0] or item, f"{message} [from the command line]") from None
    try:
        if merged.run.dir is None:
            merged.run.dir = str(Path("runs") / (config_file.stem if config_file else "default"))
        _check_numbers(OmegaConf.to_container(merged, resolve=True))
        cfg = OmegaConf.to_object(merged)  # instantiates the dataclasses, running each __post_init__ check
        # The run writes it as its config.yaml; a merge lets a few mistyped values through (a list in a list of
        # strings) that only this finds.
        OmegaConf.structured(cfg)
    except OmegaConfBaseException as e:
        raise _config_error(e, "the merged config") from None
    return cfg


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    return next(p for p in (path, *path.parents) if os.path.lexists(p))


def check_paths(cfg: Config) -> None:
    """The dataset root is a directory and run.dir can be made and written, checked on every rank before any
    process group or data is touched. os.access answers for this user: as root, permission bits do not stop a
    write, but a read-only filesystem still does."""
    root = Path(cfg.data.root)
    if cfg.data.backend != "synthetic":
        if os.path.lexists(root) and not root.is_dir():
            raise ConfigError("data.root", f"{root} is not a directory")
        if not cfg.data.demo and not root.is_dir():
            raise ConfigError("data.root", f"{root} does not exist (data.demo=true would generate the demo "
                                           "dataset there)")
    run_dir = Path(cfg.run.dir)
    existing = _nearest_existing(run_dir)
    where = "" if existing == run_dir.absolute() else f" (run.dir is {run_dir})"
    if not existing.is_dir():
        raise ConfigError("run.dir", f"{existing} is not a directory{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        reason = "is on a read-only filesystem" if read_only else "is not writable by this user"
        raise ConfigError("run.dir", f"{existing} {reason}{where}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def loader_options(cfg: Config, d: Dist) -> dict:
    """What training and evaluation alike pass to data.build.build_loader besides the split: this rank's place,
    the batch, the seed, the images' memory format and dtype, which follow the model's, and the run's length,
    which data.resolution's ramp is a fraction of."""
    return dict(batch_size=cfg.train.batch_size, rank=d.rank, world_size=d.world_size, device=d.device,
                seed=cfg.seed, channels_last=cfg.train.channels_last, dtype=INPUT_DTYPE[cfg.train.precision],
                epochs=cfg.train.epochs)
