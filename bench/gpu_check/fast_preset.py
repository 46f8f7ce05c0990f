"""Part fast_preset: the Trainer's ResNet-50 images/s at each train side of configs/resnet50_imagenet_fast.yaml on
this GPU, and the minutes its 16 and 32 epochs would take on 8 such GPUs, beside FFCV's published 8 x A100 times.

The projection is arithmetic on the measured rates, with its assumptions named: every epoch's 1,281,167 train
images at that epoch's side (by the service's own schedule), a val pass of 50,000 images at the preset's val side,
and SCALING for 8 GPUs of one node. The val pass is priced, not timed (VAL_COST), to keep the part within its box.
"""
from bench.gpu_check.context import ROOT, Context, Passed
from bench.gpu_check.throughput import trainer_rate
from data.resolution import train_side
from trainer.config import load_config

FAST_PRESET = ROOT / "configs" / "resnet50_imagenet_fast.yaml"
TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
FFCV_MINUTES = {16: 14.9, 32: 28.7}
"""libffcv/ffcv-imagenet's README: ResNet-50 on 8 x A100, 73.8% top-1 in 16 epochs (14.9 min), 76.6% in 32 (28.7)."""
GPUS = 8
SCALING = 0.9
"""Assumed: 8 GPUs of one node train at 0.9 x 8 x one GPU's images/s. bench.allreduce predicts gradient
communication costs ResNet-50 about 1% on one NVLink node (docs/performance.md); the rest of the 0.9 is for what it
does not model: 8 DALI pipelines sharing the host's cores and decoders, stragglers, the per-epoch val pass's sync."""
VAL_COST = 1 / 3
"""Assumed: a val image costs a third of a training image of the same pixels (a forward pass, no backward), and
flip TTA doubles it."""


def epoch_sides(epochs: int) -> list:
    """The train side of each epoch of the fast preset stretched to `epochs`, by the service's schedule."""
    cfg = load_config(FAST_PRESET, [f"train.epochs={epochs}"])
    return [train_side(e, epochs=epochs, resolution=cfg.data.resolution, image_size=cfg.data.image_size)
            for e in range(epochs)]


def projected_minutes(sides: list, rates: dict, val_side: int, flip: bool) -> float:
    """Minutes on GPUS GPUs for epochs at `sides`, from one GPU's measured train images/s per side (`rates`)."""
    largest = max(rates)
    val_rate = rates[largest] / VAL_COST * (largest / val_side) ** 2 / (2 if flip else 1)
    one_gpu_s = sum(TRAIN_IMAGES / rates[side] + VAL_IMAGES / val_rate for side in sides)
    return one_gpu_s / (GPUS * SCALING) / 60


def check_fast_preset(ctx: Context) -> Passed:
    preset = load_config(FAST_PRESET, [])
    plans = {epochs: epoch_sides(epochs) for epochs in FFCV_MINUTES}
    sides = sorted({side for plan in plans.values() for side in plan})
    # The smoke runs the same code at its own small size: the preset's sides scaled to it.
    scale = 1.0 if ctx.mode == "gpu" else ctx.sizes.image_size / 224
    measured = {side: max(8, round(side * scale)) for side in sides}
    rates = {}
    for side, run_side in measured.items():
        ctx.progress(f"{run_side} px")
        rates[side] = trainer_rate(ctx, "synthetic", False, f"data.image_size={run_side}",
                                   f"data.val_resize={run_side}", "model.blurpool=true",
                                   name=f"fast_preset_{run_side}px")["img_per_s"]
    minutes = {epochs: projected_minutes(plan, rates, preset.data.val_image_size, preset.train.eval_flip)
               for epochs, plan in plans.items()}
    headline = (", ".join(f"{measured[side]} px {rate:.0f} img/s" for side, rate in rates.items())
                + f"; on {GPUS} such GPUs at {SCALING:g} scaling: "
                + ", ".join(f"{e} epochs {m:.1f} min (FFCV, 8 x A100: {FFCV_MINUTES[e]})" for e, m in minutes.items()))
    return Passed(headline, {"train_img_per_s": {measured[side]: rate for side, rate in rates.items()},
                             "measured_sides": list(measured.values()), "epoch_sides": plans,
                             "projected_minutes": minutes, "ffcv_minutes": FFCV_MINUTES, "gpus": GPUS,
                             "assumed_scaling": SCALING, "assumed_val_cost": VAL_COST,
                             "model": ctx.sizes.model, "batch": ctx.sizes.batch, "blurpool": True})
