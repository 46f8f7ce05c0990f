"""Starting weights for a new run (model.init_from): a torchvision state dict, one of our checkpoints, or an export.

Weights only: the optimizer, schedule, step and data order of the source are not carried over (that is resume's
job). Every failure is a ConfigError naming model.init_from, raised before any training step.
"""
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError

KEY = "model.init_from"
HEAD = "fc."


def read_weights(path: Path) -> dict:
    """The state dict in `path`: a .safetensors file, or a torch file holding a state dict, our checkpoint (its
    `model`) or a {"state_dict": ...} wrapper; loaded with weights_only=True, so no code in it ever runs."""
    if not path.is_file():
        raise ConfigError(KEY, f"no such file: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(KEY, f"{path} is a safetensors file and the safetensors package is not "
                                   f"installed (pip install safetensors)") from None
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises several types for a bad file
            raise ConfigError(KEY, f"{path} is not a readable safetensors file: {e}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean the same here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(KEY, f"{path} cannot be loaded with torch.load(weights_only=True) ({reason}): only "
                               f"tensors in plain containers are accepted, as torch.save(model.state_dict(), "
                               f"PATH) writes them") from None
    for entry in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(entry), dict):
            loaded = loaded[entry]
            break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(KEY, f"{path} holds no state dict (a dict of tensors, or a checkpoint with a `model` "
                               f"entry)")
    # Saved from a DDP- or torch.compile-wrapped model.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in loaded):
            loaded = {k[len(prefix):]: v for k, v in loaded.items()}
    return loaded


def blurpool_hint(missing: str, source: dict) -> str:
    """Why `missing` may be absent when the source differs from the model only in model.blurpool (which renames
    a blurred conv's `X.weight` to `X.conv.weight`)."""
    if missing.endswith(".conv.weight") and missing.replace(".conv.weight", ".weight") in source:
        return " (the weights are of a net without model.blurpool, this model has it)"
    if missing.endswith(".weight") and missing.replace(".weight", ".conv.weight") in source:
        return " (the weights are of a net with model.blurpool, this model has it off)"
    return ""


def init_from(model: nn.Module, path: Path, init_head: bool) -> list:
    """Copies the weights in `path` into `model`, the classifier too when `init_head`; returns the names of the
    tensors left as initialised. The first tensor that is missing, extra or of another shape is an error."""
    source = read_weights(Path(path))
    target = model.state_dict()

    def wanted(key):
        return init_head or not key.startswith(HEAD)

    for key, tensor in target.items():
        if not wanted(key):
            continue
        if key not in source:
            raise ConfigError(KEY, f"{path} does not fit this model: it has no {key}{blurpool_hint(key, source)}")
        if source[key].shape != tensor.shape:
            hint = (" (another class count: model.init_head=false starts the classifier afresh)"
                    if key.startswith(HEAD) else "")
            raise ConfigError(KEY, f"{path} does not fit this model: {key} has shape {tuple(source[key].shape)}, "
                                   f"the model's is {tuple(tensor.shape)}{hint}")
    extra = [k for k in source if k not in target]
    if extra:
        raise ConfigError(KEY, f"{path} does not fit this model: it has {extra[0]}, which the model lacks "
                               f"(another architecture or model option?)")
    model.load_state_dict({k: v for k, v in source.items() if wanted(k)}, strict=False)
    return [k for k in target if not wanted(k)]
