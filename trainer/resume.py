"""Resuming on another world size: the checkpoint's global batch is kept, split anew over the ranks there are."""
from typing import Optional, Tuple

from common.errors import ConfigError


def saved_split(state: dict) -> dict:
    """How a checkpoint's run split its global batch (None for what a checkpoint of another format lacks: its
    version is refused when it is loaded)."""
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
