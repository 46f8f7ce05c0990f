"""Parts fp16, bf16 and syncbn: short runs whose loss must come down in each half precision, and SyncBatchNorm across
two ranks against BatchNorm over the whole batch, plus the trainer's NCCL DDP + SyncBN path."""
import json
import math
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.gpu_check.context import CheckFailed, Context, Passed
from bench.throughput import train_records
from trainer.models import build_model

# SyncBN against BN over the whole batch, in fp32: only the order of the sums differs.
SYNCBN_TOLERANCE = 1e-4


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


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _syncbn_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One of `world` processes on GPU 0: SyncBatchNorm over this rank's slice vs BatchNorm2d over the whole batch."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        device = torch.device("cuda", 0)
        generator = torch.Generator().manual_seed(0)
        channels = 16
        x = (torch.randn(8, channels, 10, 10, generator=generator) * 3 + 1).to(device)
        upstream = torch.randn(8, channels, 10, 10, generator=generator).to(device)
        weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
        sync, plain = nn.SyncBatchNorm(channels).to(device), nn.BatchNorm2d(channels).to(device)
        for bn in (sync, plain):
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
        local = x.chunk(world)[rank].clone().requires_grad_()
        out = sync(local)
        (out * upstream.chunk(world)[rank]).sum().backward()
        whole = x.clone().requires_grad_()
        reference = plain(whole)
        (reference * upstream).sum().backward()
        # Parameter gradients are per rank, as DDP sees them before its all-reduce; their sum is the whole batch's.
        weight_grad, bias_grad = sync.weight.grad.clone(), sync.bias.grad.clone()
        dist.all_reduce(weight_grad)
        dist.all_reduce(bias_grad)
        errors = {
            "output": _max_relative_error(out, reference.chunk(world)[rank]),
            "input_grad": _max_relative_error(local.grad, whole.grad.chunk(world)[rank]),
            "weight_grad": _max_relative_error(weight_grad, plain.weight.grad),
            "bias_grad": _max_relative_error(bias_grad, plain.bias.grad),
            "running_mean": _max_relative_error(sync.running_mean, plain.running_mean),
            "running_var": _max_relative_error(sync.running_var, plain.running_var),
        }
        Path(out_dir, f"syncbn_rank{rank}.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


def _ddp_syncbn_step(ctx: Context) -> dict:
    """The trainer's multi-GPU path at world size 1: NCCL group, SyncBN-converted model, DDP, one bf16 step."""
    device = ctx.device
    init_file = ctx.work / "nccl_init"
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1, device_id=device,
                            timeout=timedelta(seconds=60))
    try:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model(ctx.sizes.model, num_classes=10))
        model = model.to(device, memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[device.index], gradient_as_bucket_view=True)
        images = torch.randn(16, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(10, (16,), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(ddp(images), labels)
        loss.backward()
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        sync_layers = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        return {"loss": float(loss), "grads_finite": grads_finite, "syncbn_layers": sync_layers}
    finally:
        dist.destroy_process_group()


def check_syncbn(ctx: Context) -> Passed:
    # PyTorch's SyncBatchNorm falls back to plain BN when the group has one rank, so the synchronizing kernels
    # run only with two ranks. NCCL refuses two ranks on one GPU; gloo moves the CUDA tensors instead.
    out_dir = ctx.work / "syncbn"
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_syncbn_rank, args=(2, str(out_dir / "gloo_init"), str(out_dir)), nprocs=2, join=True)
    errors = [json.loads((out_dir / f"syncbn_rank{r}.json").read_text()) for r in range(2)]
    worst = {key: max(e[key] for e in errors) for key in errors[0]}
    figures = {"two_ranks_gloo_max_relative_error": worst, "tolerance": SYNCBN_TOLERANCE,
               "one_rank_nccl_ddp_step": _ddp_syncbn_step(ctx)}
    bad = sorted(k for k, v in worst.items() if not v <= SYNCBN_TOLERANCE)
    if bad:
        raise CheckFailed(f"SyncBatchNorm over 2 ranks differs from BatchNorm over the whole batch in "
                          f"{', '.join(bad)}", **figures)
    step = figures["one_rank_nccl_ddp_step"]
    if not (math.isfinite(step["loss"]) and step["grads_finite"] and step["syncbn_layers"] > 0):
        raise CheckFailed("the NCCL DDP step with SyncBatchNorm gave non-finite values", **figures)
    return Passed(f"max relative error {max(worst.values()):.1e}", figures)
