"""Every rule of a resume in one place: the checkpoint format it reads, the classes it must share, which config
keys may change and how, and how the global batch is split anew on another world size."""
from pathlib import Path
from typing import List, Optional, Tuple

from common.errors import ConfigError, UserInputError

# Goes up only when the bytes a checkpoint holds must change; a checkpoint of this version always loads.
CHECKPOINT_VERSION = 2

# Keys a resumed run may change: they say how the run is operated, not what it computes. optim.lr is applied
# too, by rescaling the schedule (apply_lr); any other change is refused, since the checkpoint's optimizer,
# schedule and data order would quietly keep the old meaning while config.yaml claimed the new one.
CHANGEABLE_ON_RESUME = (
    "run.", "monitor.", "checkpoint.", "distributed.", "data.root", "data.demo", "data.num_threads",
    "data.prefetch", "data.hw_decoder_load", "data.mmap", "train.max_steps", "train.threads", "train.stop_check_every",
    "train.eval_every_epochs", "train.max_nonfinite_steps", "train.compile", "train.cudnn_benchmark",
    "train.deterministic",
    # Validation only: what the next evaluations measure, not what the run trains.
    "train.eval_flip", "data.val_image_size",
    "train.channels_last", "optim.lr",
    # Only read when a run starts; a checkpoint's weights supersede them.
    "model.init_from", "model.init_head",
)
RESOLUTION_NOTE = ("data.resolution is the train crop's schedule over the whole run: changed mid-run, the epochs "
                   "already trained would have followed another one")
# How the global batch is split (per rank, accumulated): changeable on resume as long as the global batch stays,
# as it must for a resume on another world size (keep_global_batch).
BATCH_SPLIT = ("train.batch_size", "train.grad_accum")


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
    changes = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    # An optional section set where it was null (data.resolution), or the reverse: one side has the key as None,
    # the other its fields.
    for this, other, flip in ((old, new, False), (new, old, True)):
        for key in sorted(this.keys() - other.keys()):
            fields = {k[len(key) + 1:]: v for k, v in other.items() if k.startswith(key + ".")}
            if this[key] is None and fields:
                changes[key] = (fields, None) if flip else (None, fields)
    return changes


def changeable_on_resume(key: str, global_batch_kept: bool = False) -> bool:
    if global_batch_kept and key in BATCH_SPLIT:
        return True
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in CHANGEABLE_ON_RESUME)


def saved_split(state: dict) -> dict:
    """How a checkpoint's run split its global batch (None for what a checkpoint of another format lacks: its
    version is refused by `check`)."""
    train = state.get("config", {}).get("train", {})
    return {"world_size": state.get("world_size"), "batch_size": train.get("batch_size"),
            "grad_accum": train.get("grad_accum")}


def keep_global_batch(saved: Optional[dict], batch_size: int, grad_accum: int, world_size: int) -> Tuple[int, int]:
    """(batch_size, grad_accum) for `world_size` ranks that keep the saved global batch, so that the schedule, the
    lr and the epoch's order go on unchanged. The per-rank batch stays if the accumulation can make up the
    difference (the same memory per device, the same BN batch), else the accumulation stays and the per-rank batch
    changes; a split given by hand that keeps the global batch is taken as it is."""
    if saved is None or None in saved.values() or saved["world_size"] == world_size:
        return batch_size, grad_accum
    target = saved["batch_size"] * saved["world_size"] * saved["grad_accum"]
    if batch_size * world_size * grad_accum == target:
        return batch_size, grad_accum
    if target % (world_size * batch_size) == 0:
        return batch_size, target // (world_size * batch_size)
    if target % (world_size * grad_accum) == 0:
        return target // (world_size * grad_accum), grad_accum
    raise ConfigError("train.batch_size", f"the checkpoint's global batch of {target} ({saved['batch_size']} x "
                      f"{saved['world_size']} ranks x {saved['grad_accum']} accumulated) cannot be kept on "
                      f"{world_size} ranks: {target} is divisible neither by {world_size} x "
                      f"train.batch_size={batch_size} nor by {world_size} x train.grad_accum={grad_accum}. Set "
                      f"train.batch_size x {world_size} x train.grad_accum = {target}, or resume on a world size "
                      f"that divides {target}")


def check(state: dict, config: dict, classes: List[str], global_batch: int, source: Path) -> dict:
    """Refuses a checkpoint this run cannot continue: another format version, a changed key that changes what the
    run computes, other classes. Returns the accepted changes, {key: (old, new)}."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserInputError(f"checkpoint {source} has format version {state.get('version')}, "
                             f"this trainer reads {CHECKPOINT_VERSION}")
    changes = config_changes(state["config"], config)
    saved = saved_split(state)
    kept = saved["batch_size"] * saved["world_size"] * saved["grad_accum"] == global_batch
    refused = [k for k in changes if not changeable_on_resume(k, global_batch_kept=kept)]
    if refused:
        listed = ", ".join(f"{k}={changes[k][0]} (now {changes[k][1]})" for k in refused)
        raise ConfigError(refused[0], f"checkpoint {source} was written with {listed}: resuming with a different "
                                      f"value would silently change what the run computes. Set it back, or "
                                      f"use another run.dir to start afresh"
                                      + (f" ({RESOLUTION_NOTE})" if refused[0].startswith("data.resolution")
                                         else ""))
    if state["classes"] != classes:
        raise UserInputError(f"checkpoint {source} was trained on other classes than {config['data']['root']}")
    return changes


def apply_lr(optimizer, scheduler, base_lr: float) -> None:
    """optim.lr changed on resume: the schedule (a LambdaLR) continues from its current step with the new base."""
    scheduler.base_lrs = [base_lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def notes(path: Optional[str], saved: Optional[dict], world_size: int, init_from: Optional[str],
          changes: dict) -> List[str]:
    """What a resume from `path` (None: a fresh start) tells the user."""
    if path is None:
        return []
    lines = [f"model.init_from={init_from} is ignored: {path} resumes the run"] if init_from else []
    if saved["world_size"] != world_size:
        lines.append(f"resuming on {world_size} process(es) a run saved on {saved['world_size']}: the epoch goes on "
                     f"from the same global sample, each remaining image read once; augmentation draws and "
                     f"reduction order differ from an uninterrupted run (exact in coverage, not bitwise)")
    return lines + [f"resuming with {key}={new} (was {old}): applied" for key, (old, new) in changes.items()]
