"""Part syncbn: what train.sync_bn costs a ResNet-50 step on this GPU, and that SyncBatchNorm's kernels agree with
BatchNorm's.

PyTorch's SyncBatchNorm takes its synchronizing path only in a group of more than one rank (`need_sync =
world_size > 1` in torch/nn/modules/batchnorm.py; below that it calls F.batch_norm), and NCCL takes one rank per
GPU, so one GPU cannot run it as a job of many does. This part makes every layer take that path in a one-rank NCCL
group: per layer, an all-gather of the statistics and the `count_all[mask]` indexing that makes the host wait for
the GPU (torch/nn/modules/_functions.py), and an all-reduce in backward. What it measures is the price of those
host syncs and extra kernels, which a job pays on every GPU; a one-rank collective moves nothing, so the
collectives' own time over NVLink or the network comes on top of it.
"""
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction
from torch.nn.parallel import DistributedDataParallel

from bench.gpu_check.context import CheckFailed, Context, Passed
from bench.gpu_check.step import host_syncs
from trainer.models import build_model

TOLERANCE = 1e-4
"""SyncBatchNorm's kernels against BatchNorm2d in fp32 on one rank: only the order of the sums differs."""
WARMUP_STEPS, TIMED_STEPS = 3, 10


class SyncPathBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm that takes its synchronizing path in training whatever the size of its group."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        group = self.process_group or dist.group.WORLD
        # The momentum is a number in ResNet's BN (0.1); None, a cumulative average, is not handled here.
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                                           self.eps, self.momentum, group, dist.get_world_size(group))


def sync_path_model(model: nn.Module) -> nn.Module:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.SyncBatchNorm:
            module.__class__ = SyncPathBatchNorm  # convert_sync_batchnorm builds nn.SyncBatchNorm, whatever cls
    return model


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _layer_errors(device: torch.device) -> dict:
    """One SyncPathBatchNorm layer against BatchNorm2d on the same batch, fp32: output, gradients, statistics."""
    generator = torch.Generator().manual_seed(0)
    channels = 16
    x = (torch.randn(8, channels, 10, 10, generator=generator) * 3 + 1).to(device)
    upstream = torch.randn(8, channels, 10, 10, generator=generator).to(device)
    weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    synced, plain = sync_path_model(nn.BatchNorm2d(channels)).to(device), nn.BatchNorm2d(channels).to(device)
    with torch.no_grad():
        for bn in (synced, plain):
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    inputs = x.clone().requires_grad_(), x.clone().requires_grad_()
    outputs = synced(inputs[0]), plain(inputs[1])
    for out in outputs:
        (out * upstream).sum().backward()
    pairs = {"output": outputs, "input_grad": (inputs[0].grad, inputs[1].grad),
             "weight_grad": (synced.weight.grad, plain.weight.grad), "bias_grad": (synced.bias.grad, plain.bias.grad),
             "running_mean": (synced.running_mean, plain.running_mean),
             "running_var": (synced.running_var, plain.running_var)}
    return {name: _max_relative_error(a, b) for name, (a, b) in pairs.items()}


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward and backward in bf16: where batch norm runs."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _timed(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Milliseconds a step, after steps that choose cuDNN's algorithms, and the host syncs of one step."""
    for _ in range(WARMUP_STEPS):
        _step(model, images, labels)
    with host_syncs(images.device, "warn") as syncs:
        _step(model, images, labels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        _step(model, images, labels)
    torch.cuda.synchronize()
    return {"ms_per_step": (time.perf_counter() - start) / TIMED_STEPS * 1000, "host_syncs_per_step": len(syncs)}


def check_syncbn(ctx: Context) -> Passed:
    s, device = ctx.sizes, ctx.device
    torch.backends.cudnn.benchmark = True
    dist.init_process_group("nccl", init_method=f"file://{ctx.work / 'syncbn_init'}", rank=0, world_size=1,
                            device_id=device, timeout=timedelta(seconds=60))
    try:
        images = torch.randn(s.batch, 3, s.image_size, s.image_size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(1000, (s.batch,), device=device)
        figures = {"model": s.model, "batch": s.batch, "image_size": s.image_size, "precision": "bf16",
                   "channels_last": True, "backend": "nccl", "world_size": 1, "timed_steps": TIMED_STEPS}

        def ddp(model: nn.Module) -> nn.Module:  # as trainer.run_model.wrap does on a process group
            model = model.to(device, memory_format=torch.channels_last)
            return DistributedDataParallel(model, device_ids=[device.index], gradient_as_bucket_view=True)

        figures["bn"] = _timed(ddp(build_model(s.model, num_classes=1000)), images, labels)
        ctx.record(**figures, headline=f"BN {figures['bn']['ms_per_step']:.1f} ms a step")
        synced = ddp(sync_path_model(build_model(s.model, num_classes=1000)))
        figures["syncbn_layers"] = sum(isinstance(m, SyncPathBatchNorm) for m in synced.modules())
        figures["syncbn"] = _timed(synced, images, labels)
        figures["layer_max_relative_error"] = _layer_errors(device)
        figures["tolerance"] = TOLERANCE
    finally:
        dist.destroy_process_group()
    bn, syncbn = figures["bn"], figures["syncbn"]
    cost = syncbn["ms_per_step"] - bn["ms_per_step"]
    syncs = syncbn["host_syncs_per_step"] - bn["host_syncs_per_step"]
    figures.update(syncbn_cost_ms=cost, syncbn_cost_share=cost / bn["ms_per_step"], syncbn_host_syncs=syncs)
    bad = sorted(k for k, v in figures["layer_max_relative_error"].items() if not v <= TOLERANCE)
    if bad:
        raise CheckFailed(f"SyncBatchNorm's path differs from BatchNorm2d in {', '.join(bad)}", **figures)
    return Passed(f"SyncBN {cost:+.1f} ms a step ({figures['syncbn_cost_share']:+.0%}) over BN's "
                  f"{bn['ms_per_step']:.1f}, {syncs:+d} host syncs a step with {figures['syncbn_layers']} layers "
                  f"(1 rank: the collectives' own time not included)", figures)
