"""A run's files as the user tools (evaluate, export) read them: the checkpoint a path names, its config, its
weights as a model, and the val figures the trainer logged for it."""
import json
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from common.errors import UserInputError
from trainer.config import Config, load_config
from trainer.models import build_model, model_options
from trainer.run_dir import CHECKPOINTS, POINTER, metrics_beside

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def resolve(path: Path) -> Path:
    """The checkpoint file `path` names: itself, or the one a run dir's (or its checkpoints/ dir's) `latest`
    pointer names."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    for pointer in (path / CHECKPOINTS / POINTER, path / POINTER):
        if pointer.is_file():
            named = pointer.parent / pointer.read_text().strip()
            if not named.is_file():
                raise UserInputError(f"{pointer} names {named.name}, which is not there")
            return named
    raise UserInputError(f"{path} is neither a checkpoint nor a run directory with checkpoints/{POINTER}")


def load(path: Path) -> dict:
    """The checkpoint at `path`, on the CPU, loaded without unpickling code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise UserInputError(f"{path} is not a checkpoint of this trainer ({reason})") from None
    if not isinstance(state, dict) or not {"model", "config", "classes", "step"} <= state.keys():
        raise UserInputError(f"{path} is not a checkpoint of this trainer (it lacks model, config, classes or step)")
    return state


def config_of(state: dict, overrides: List[str]) -> Config:
    """The config the checkpoint was trained with, with `overrides` (key=value) applied; ConfigError if bad."""
    return load_config(None, overrides, base=state["config"])


def weights_of(state: dict, ema: bool, source: Path) -> dict:
    """The model's state dict, or its EMA's (an AveragedModel's: `module.`-prefixed keys and `n_averaged`)."""
    if not ema:
        return state["model"]
    if not state.get("ema"):
        raise UserInputError(f"{source} holds no EMA weights (the run had optim.ema_decay=0)")
    prefix = "module."
    return {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}


def num_classes_of(state: dict, cfg: Config) -> int:
    return cfg.model.num_classes or len(state["classes"])


def builder_options(cfg: Config) -> dict:
    return model_options(cfg.model)


def torchvision_compatible(cfg: Config) -> Optional[str]:
    """None when torchvision.models.<name> computes what this net computes; otherwise why not."""
    mc = cfg.model
    if mc.name not in TORCHVISION_NAMES:
        return f"torchvision has no {mc.name}"
    if mc.shortcut not in (None, "B"):
        return f"torchvision's {mc.name} has shortcut B, this one {mc.shortcut}"
    if mc.stride_in_1x1:
        return f"torchvision's {mc.name} is v1.5 (stride in the 3x3 conv), this one has model.stride_in_1x1=true"
    if mc.blurpool:
        return f"torchvision's {mc.name} has no blur before its strided convs, this one has model.blurpool=true"
    if mc.deep_stem:
        return f"torchvision's {mc.name} has the 7x7 stem conv, this one the deep stem of model.deep_stem=true"
    return None


def build(state: dict, cfg: Config, weights: dict, source: Path) -> nn.Module:
    """The checkpoint's net with `weights` loaded, on the CPU, in eval mode."""
    model = build_model(cfg.model.name, num_classes=num_classes_of(state, cfg), **builder_options(cfg))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserInputError(f"{source} does not fit model.name={cfg.model.name}: "
                             f"{str(e).splitlines()[1].strip()}") from None
    return model.eval()


def logged_val(checkpoint: Path, step: int, ema: bool) -> Optional[dict]:
    """The trainer's val (or val_ema) record at `step` in the run's metrics.jsonl, None if there is none (the
    run saved at that step without evaluating, or the file is not beside the checkpoint)."""
    metrics = metrics_beside(checkpoint)
    if metrics is None or not metrics.is_file():
        return None
    split = "val_ema" if ema else "val"
    found = None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line a running trainer has not finished writing
            continue
        if record.get("split") == split and record.get("step") == step:
            found = record
    return found
