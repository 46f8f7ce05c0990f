"""The model of a run: torch's global settings for it, the net as the config builds it, and the wrappers the step
calls through (torch.compile, DDP)."""
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.errors import ConfigError
from common.log import log
from data.resolution import distinct_sides
from trainer.distributed import Dist
from trainer.models import build_model, model_options
from trainer.rng import seed_everything


def configure_torch(cfg) -> None:
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
    if cfg.train.deterministic:
        # cuBLAS reads this when it first creates a handle, which happens at the first matmul, after this.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def build(cfg, num_data_classes: int, d: Dist) -> nn.Module:
    """The plain module whose weights are trained, saved and evaluated, on the run's device."""
    mc = cfg.model
    num_classes = mc.num_classes or num_data_classes
    if num_classes < num_data_classes:
        raise ConfigError("model.num_classes", f"{num_classes} is fewer than the dataset's {num_data_classes}")
    model = build_model(mc.name, num_classes=num_classes, **model_options(mc))
    if cfg.train.sync_bn and d.world_size > 1:
        if d.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif d.is_main:
            log.warning("train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                        "training with per-process BN")
    model = model.to(d.device)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def compile_options(cfg) -> dict:
    """torch.compile's options. With data.resolution the train crop takes one shape per distinct side: one static
    graph each (dynamic=False; else Dynamo turns to one dynamic-shape graph at the second shape, which Inductor
    fuses less well), so the run holds len(sides) graphs, and Dynamo's recompile limit is raised to len(sides) + 2
    so that none falls back to eager. Validation runs the plain module, uncompiled."""
    if cfg.data.resolution is None:
        return {}
    sides = distinct_sides(cfg.data, cfg.train.epochs)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(sides) + 2)
    log.info(f"train.compile: one graph per train side, {len(sides)} ({', '.join(map(str, sides))} px)")
    return {"dynamic": False}


def wrap(model: nn.Module, cfg, d: Dist) -> nn.Module:
    """What the step calls: `model` compiled and DDP-wrapped as the config asks."""
    if cfg.train.compile:
        # Compiled here, the module's forward still compiles inside DDP's, so DDPOptimizer cuts its graph at the
        # bucket boundaries and all-reduce overlaps backward as when compiling the wrapper (measured both ways in
        # docs/performance.md); this way Dynamo stays out of DDP's own code, as PyTorch advises.
        model = torch.compile(model, **compile_options(cfg))
    # A process group of one rank (the GPU check makes one) gets DDP too: the multi-GPU path at world size 1.
    if d.world_size > 1 or torch.distributed.is_initialized():
        # Buckets fill in reverse layer order while backward runs, so all-reduce overlaps the backward pass;
        # gradients as bucket views save one copy of every gradient.
        model = DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model
