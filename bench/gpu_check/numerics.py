"""Parts fp16 and bf16: short runs whose loss must come down in each half precision."""
import math

import torch

from bench.gpu_check.context import CheckFailed, Context, Passed
from bench.throughput import train_records


def _short_run(ctx: Context, precision: str) -> Passed:
    """A few passes over the small demo set with a 1000-way head: the loss must come down from about ln(1000).

    The first thing SGD learns is that only the demo's few classes occur, so a working optimizer step (with the
    GradScaler unscaling, skipping and growing in fp16) brings the loss down within a few steps; a broken one does not.
    The steps stay within the first epoch: no epoch-end checkpoint or pipeline rebuild, one final checkpoint.
    """
    s = ctx.sizes
    size = s.short_image_size
    run_dir, _ = ctx.run_trainer(
        f"short_{precision}", f"data.root={ctx.demo}", f"data.image_size={size}",
        f"data.val_resize={size * 8 // 7}", "data.crop_area=[0.25,1.0]", f"train.batch_size={s.short_batch}",
        f"train.precision={precision}", f"train.max_steps={s.short_steps}", "train.label_smoothing=0",
        "schedule.name=constant", "schedule.warmup_epochs=0", f"optim.lr={s.short_lr}", "monitor.every_steps=1",
        "model.num_classes=1000")
    losses = [r["loss"] for r in train_records(run_dir)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    figures = {"model": s.model, "precision": precision, "steps": len(losses), "batch": s.short_batch,
               "loss_first3": first, "loss_last3": last, "losses": [round(x, 4) for x in losses]}
    checkpoint = torch.load(max((run_dir / "checkpoints").glob("ckpt-*.pt")), weights_only=True)
    figures["epochs_completed"] = checkpoint["epoch"]
    if precision == "fp16":
        figures["grad_scale"] = float(checkpoint["scaler"]["scale"])
    if not all(math.isfinite(x) for x in losses):
        raise CheckFailed("non-finite loss", **figures)
    if not last < first:
        raise CheckFailed(f"the loss did not come down: {first:.4f} over the first 3 steps, {last:.4f} "
                          f"over the last 3", **figures)
    return Passed(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps", figures)


def check_fp16(ctx: Context) -> Passed:
    return _short_run(ctx, "fp16")


def check_bf16(ctx: Context) -> Passed:
    return _short_run(ctx, "bf16")
