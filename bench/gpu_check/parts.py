"""The checks of `bench/gpu_check.sh`, one function each; `python -m bench.gpu_check.parts --part NAME` runs one.

bench.gpu_check.run starts every part in its own process with a time box, so that a CUDA fault or a stuck compile in
one part cannot take the others down. A part returns its figures, or raises CheckFailed (with the figures it got).
Everything goes through the project's own code: build_loader with DataConfig overrides, the real Trainer with the
ResNet-50 preset, bench.images' JPEG generator, the demo dataset generator.
"""
import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.images import make_images
from bench.throughput import throughput, train_records
from data.loader import build_loader
from data.make_demo_dataset import DemoParams, make_demo_dataset
from trainer import distributed
from trainer.config import load_config
from trainer.models import build_model
from trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "resnet50_imagenet.yaml"
# SyncBN against BN over the whole batch, in fp32: only the order of the sums differs.
SYNCBN_TOLERANCE = 1e-4


class CheckFailed(Exception):
    def __init__(self, reason: str, **figures):
        super().__init__(reason)
        self.figures = figures


@dataclass(frozen=True)
class Sizes:
    model: str
    """Model of every part (the preset's ResNet-50 on a GPU)."""
    batch: int
    """Batch of the loader and throughput parts."""
    image_size: int
    """Train crop side of the loader, throughput and resume parts."""
    unique_images: int
    """Distinct generated train JPEGs (val gets about a fifth)."""
    copies: int
    """Hard links per train JPEG, so that one epoch outlasts every measurement without generating more images."""
    loader_warmup: int
    """Loader part: batches before the clock starts (pipeline build, prefetch fill)."""
    loader_batches: int
    """Loader part: batches measured."""
    hw_decoder_loads: tuple
    """Loader part on a GPU: the hw_decoder_load values compared (the CPU decoder has no hardware share)."""
    train_warmup: int
    """Throughput parts: steps before the measured window (cuDNN autotuning, compile, prefetch fill)."""
    train_steps: int
    """Throughput parts: measured steps."""
    short_image_size: int
    """fp16/bf16 parts: crop side on the demo dataset."""
    short_batch: int
    """fp16/bf16 parts: batch."""
    short_steps: int
    """fp16/bf16 parts: optimizer steps, several passes over the small demo set."""
    short_lr: float
    """fp16/bf16 parts: optim.lr (per 256 images, constant, no warmup)."""
    demo: DemoParams
    """The learnable demo dataset of the fp16/bf16 parts."""
    resume_batch: int
    """Resume part: batch."""
    resume_steps: int
    """Resume part: steps of the straight run; the interrupted run stops at half and resumes."""
    threads: int
    """DALI CPU threads (data.num_threads) and image generator processes."""


GPU = Sizes(model="resnet50", batch=256, image_size=224, unique_images=1024, copies=11, loader_warmup=3,
            loader_batches=30, hw_decoder_loads=(0.0, 0.65, 0.9), train_warmup=10, train_steps=30,
            short_image_size=64, short_batch=32, short_steps=30, short_lr=0.2,
            demo=DemoParams(seed=1, classes=4, train_per_class=64, val_per_class=8),
            resume_batch=64, resume_steps=8, threads=min(os.cpu_count() or 1, 16))
CPU_SMOKE = Sizes(model="resnet20", batch=8, image_size=32, unique_images=40, copies=2, loader_warmup=1,
                  loader_batches=4, hw_decoder_loads=(), train_warmup=2, train_steps=4,
                  short_image_size=32, short_batch=8, short_steps=10, short_lr=3.2,
                  demo=DemoParams(seed=1, classes=4, train_per_class=8, val_per_class=2),
                  resume_batch=8, resume_steps=6, threads=1)


@dataclass(frozen=True)
class Context:
    mode: str
    """gpu or cpu-smoke."""
    work: Path
    """Scratch folder shared by the parts: generated images, run directories."""

    @property
    def sizes(self) -> Sizes:
        return GPU if self.mode == "gpu" else CPU_SMOKE

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.mode == "gpu" else torch.device("cpu")

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def demo(self) -> Path:
        return self.work / "demo"


def _config(ctx: Context, *overrides: str):
    """The ResNet-50 preset at this mode's sizes, without W&B, with the overrides last."""
    s = ctx.sizes
    return load_config(PRESET, [
        f"model.name={s.model}", f"data.image_size={s.image_size}", f"data.val_resize={s.image_size * 8 // 7}",
        f"data.num_threads={s.threads}", f"train.batch_size={s.batch}", "monitor.wandb=false",
        "monitor.progress=false", "checkpoint.every_steps=0", "checkpoint.keep=1", *overrides])


def _run_trainer(ctx: Context, name: str, *overrides: str) -> tuple:
    """Runs the real Trainer in this process; returns (run dir, the step it started at)."""
    run_dir = ctx.work / "runs" / name
    cfg = _config(ctx, f"run.dir={run_dir}", *overrides)
    trainer = Trainer(cfg, distributed.init(cfg.distributed))
    start = trainer.step
    code = trainer.train()
    if code != 0:
        raise CheckFailed(f"the trainer exited {code}")
    return run_dir, start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- env ---------------------------------------------------------------------------------------------------------

def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def part_env(ctx: Context) -> dict:
    import nvidia.dali
    import torchvision

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torchvision": torchvision.__version__,
           "dali": nvidia.dali.__version__, "cuda_available": torch.cuda.is_available(),
           "dali_threads": ctx.sizes.threads}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()  # a tuple in current releases, an int in old ones
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   driver=_driver_version(), cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    if ctx.mode == "gpu" and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device is visible to torch; on a machine without a GPU run --cpu-smoke", **env)
    return env


# --- images ------------------------------------------------------------------------------------------------------

def _link_tree(source: Path, target: Path, prefix: str, copies: int) -> int:
    """Hard-links every JPEG of source/<class>/ into target/<class>/ `copies` times under distinct names."""
    count = 0
    for class_dir in sorted(source.iterdir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir()):
            for copy in range(copies):
                link = target / class_dir.name / f"{prefix}c{copy}_{image.name}"
                try:
                    os.link(image, link)
                except OSError:  # a file system without hard links: the copies cost disk space, nothing else
                    shutil.copyfile(image, link)
                count += 1
    return count


def part_images(ctx: Context) -> dict:
    s = ctx.sizes
    workers = max(1, min(8, s.threads))
    per_worker = math.ceil(s.unique_images / workers)
    generated = ctx.work / "generated"
    with Pool(workers) as pool:
        pool.starmap(make_images, [(str(generated / f"w{k}"), per_worker, k) for k in range(workers)])
    train = val = 0
    for k in range(workers):
        train += _link_tree(generated / f"w{k}" / "train", ctx.images / "train", f"w{k}", s.copies)
        val += _link_tree(generated / f"w{k}" / "val", ctx.images / "val", f"w{k}", 1)
    make_demo_dataset(ctx.demo, s.demo, workers=workers)
    return {"train_images": train, "unique_train_images": workers * per_worker, "val_images": val,
            "generator": "bench.images.make_images (about 500x375, quality 90)", "processes": workers,
            "demo_dataset": {"classes": s.demo.classes, "train": s.demo.classes * s.demo.train_per_class}}


# --- loader ------------------------------------------------------------------------------------------------------

def _batch_problems(images: torch.Tensor, labels: torch.Tensor, cfg, batch: int, device: torch.device,
                    classes: int) -> list:
    problems = []
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    if tuple(images.shape) != shape:
        problems.append(f"images of shape {tuple(images.shape)}, expected {shape}")
    if images.dtype != getattr(torch, cfg.dtype):
        problems.append(f"images of dtype {images.dtype}, expected {cfg.dtype}")
    if images.device.type != device.type or labels.device.type != device.type:
        problems.append(f"batch on {images.device}/{labels.device}, expected {device}")
    if cfg.layout == "NHWC" and not images.is_contiguous(memory_format=torch.channels_last):
        problems.append("NHWC images are not channels_last")
    if labels.dtype != torch.int64 or int(labels.min()) < 0 or int(labels.max()) >= classes:
        problems.append(f"labels of dtype {labels.dtype} in [{int(labels.min())}, {int(labels.max())}]")
    if not torch.isfinite(images.float()).all():
        problems.append("non-finite pixels")
    return problems


def _loader_rate(data_cfg, batch: int, device: torch.device, warmup: int, batches: int) -> dict:
    loader = build_loader(data_cfg, "train", batch_size=batch, rank=0, world_size=1, device=device, seed=0)
    measured = min(batches, len(loader) - warmup)
    if measured < 1:
        raise CheckFailed(f"the train split has {len(loader)} batches, fewer than {warmup + 1}")
    source = iter(loader)
    for _ in range(warmup):
        images, labels = next(source)
    problems = _batch_problems(images, labels, data_cfg, batch, device, len(loader.classes))
    if problems:
        raise CheckFailed("bad batch from the loader: " + "; ".join(problems))
    _sync(device)
    start = time.perf_counter()
    for _ in range(measured):
        images, labels = next(source)
    _sync(device)
    return {"img_per_s": batch * measured / (time.perf_counter() - start), "batches": measured}


def part_loader(ctx: Context) -> dict:
    """DALI's train pipeline alone (the preset's settings: NHWC, bfloat16, its crop), as the trainer builds it."""
    s = ctx.sizes
    data_cfg = _config(ctx, f"data.root={ctx.images}").data
    runs = []
    for load in (s.hw_decoder_loads if ctx.device.type == "cuda" else (None,)):
        cfg = data_cfg if load is None else replace(data_cfg, hw_decoder_load=load)
        rate = _loader_rate(cfg, s.batch, ctx.device, s.loader_warmup, s.loader_batches)
        runs.append({"decoder": "mixed" if load is not None else "cpu", "hw_decoder_load": load, **rate})
    return {"batch": s.batch, "threads": data_cfg.num_threads, "layout": data_cfg.layout, "dtype": data_cfg.dtype,
            "image_size": data_cfg.image_size, "default_hw_decoder_load": data_cfg.hw_decoder_load, "runs": runs}


# --- throughput --------------------------------------------------------------------------------------------------

def _throughput(ctx: Context, backend: str, compiled: bool) -> dict:
    s = ctx.sizes
    steps = s.train_warmup + s.train_steps
    data = (["data.backend=synthetic", f"data.synthetic_samples={s.batch * steps}"] if backend == "synthetic"
            else [f"data.root={ctx.images}"])
    name = f"train_{backend}{'_compiled' if compiled else ''}"
    run_dir, _ = _run_trainer(ctx, name, *data, "model.num_classes=1000", f"train.max_steps={steps}",
                              f"monitor.every_steps={s.train_warmup}", f"train.compile={compiled}")
    # One record per `train_warmup` steps; the first window (warm-up, compile) is left out.
    train = train_records(run_dir)
    rate = throughput(train, s.batch)
    figures = {"backend": backend, "compile": compiled, "model": s.model, "batch": s.batch,
               "precision": "bf16", "channels_last": True, "measured_steps": rate.steps,
               "img_per_s": rate.img_per_s, "data_wait": rate.data_wait,
               "max_mem_mb": train[-1]["max_mem_mb"], "final_loss": train[-1]["loss"]}
    if not math.isfinite(figures["final_loss"]):
        raise CheckFailed("non-finite training loss", **figures)
    return figures


def part_train_synthetic(ctx: Context) -> dict:
    return _throughput(ctx, "synthetic", compiled=False)


def part_train_dali(ctx: Context) -> dict:
    return _throughput(ctx, "dali", compiled=False)


def part_train_synthetic_compiled(ctx: Context) -> dict:
    return _throughput(ctx, "synthetic", compiled=True)


def part_train_dali_compiled(ctx: Context) -> dict:
    return _throughput(ctx, "dali", compiled=True)


# --- fp16 / bf16 -------------------------------------------------------------------------------------------------

def _short_run(ctx: Context, precision: str) -> dict:
    """A few passes over the small demo set with a 1000-way head: the loss must come down from about ln(1000).

    The first thing SGD learns is that only the demo's few classes occur, so a working optimizer step (with the
    GradScaler unscaling, skipping and growing in fp16) brings the loss down within a few steps; a broken one does not.
    """
    s = ctx.sizes
    size = s.short_image_size
    run_dir, _ = _run_trainer(
        ctx, f"short_{precision}", f"data.root={ctx.demo}", f"data.image_size={size}",
        f"data.val_resize={size * 8 // 7}", "data.crop_area=[0.25,1.0]",
        f"data.dtype={'float16' if precision == 'fp16' else 'bfloat16'}", f"train.batch_size={s.short_batch}",
        f"train.precision={precision}", f"train.max_steps={s.short_steps}", "train.label_smoothing=0",
        "schedule.name=constant", "schedule.warmup_epochs=0", f"optim.lr={s.short_lr}", "monitor.every_steps=1",
        "model.num_classes=1000")
    losses = [r["loss"] for r in train_records(run_dir)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    figures = {"model": s.model, "precision": precision, "steps": len(losses), "batch": s.short_batch,
               "loss_first3": first, "loss_last3": last, "losses": [round(x, 4) for x in losses]}
    if precision == "fp16":
        checkpoint = torch.load(max((run_dir / "checkpoints").glob("ckpt-*.pt")), weights_only=True)
        figures["grad_scale"] = float(checkpoint["scaler"]["scale"])
    if not all(math.isfinite(x) for x in losses):
        raise CheckFailed("non-finite loss", **figures)
    if not last < first:
        raise CheckFailed(f"the loss did not come down: {first:.4f} over the first 3 steps, {last:.4f} "
                          f"over the last 3", **figures)
    return figures


def part_fp16(ctx: Context) -> dict:
    return _short_run(ctx, "fp16")


def part_bf16(ctx: Context) -> dict:
    return _short_run(ctx, "bf16")


# --- SyncBN ------------------------------------------------------------------------------------------------------

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


def part_syncbn(ctx: Context) -> dict:
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
    return figures


# --- resume ------------------------------------------------------------------------------------------------------

def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so that -0.0 differs from 0.0 and NaN equals the same NaN."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _differences(a, b, path: str = "") -> list:
    """Paths at which two checkpoint trees differ; tensors must match bitwise (dtype, shape and every bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
        return [] if same else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def part_resume(ctx: Context) -> dict:
    """N steps straight vs N/2, a new Trainer resuming from the checkpoint, N/2 more: the same bits."""
    # Deterministic kernels: cuDNN without autotuning and atomics, cuBLAS with a fixed workspace.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    s = ctx.sizes
    n = s.resume_steps
    common = (f"data.root={ctx.images}", f"train.batch_size={s.resume_batch}", "train.cudnn_benchmark=false",
              "monitor.every_steps=1")
    straight, _ = _run_trainer(ctx, "resume_straight", *common, f"train.max_steps={n}")
    split, _ = _run_trainer(ctx, "resume_split", *common, f"train.max_steps={n // 2}")
    _, resumed_at = _run_trainer(ctx, "resume_split", *common, f"train.max_steps={n}")
    name = f"checkpoints/ckpt-{n:09d}.pt"
    a, b = (torch.load(d / name, weights_only=True) for d in (straight, split))
    keys = ("model", "optimizer", "scheduler", "step", "epoch")
    differences = _differences({k: a[k] for k in keys}, {k: b[k] for k in keys})
    loss_a, loss_b = ([r["loss"] for r in train_records(d)] for d in (straight, split))
    figures = {"model": s.model, "steps": n, "resumed_at": resumed_at, "batch": s.resume_batch,
               "device": str(ctx.device), "decoder": "mixed" if ctx.device.type == "cuda" else "cpu",
               "tensors_compared": sum(isinstance(t, torch.Tensor) for t in a["model"].values())
               + sum(len(v) for v in a["optimizer"]["state"].values()),
               "differences": differences[:10], "train_losses_equal": loss_a == loss_b}
    if resumed_at != n // 2:
        raise CheckFailed(f"the second run started at step {resumed_at}, not from the checkpoint at {n // 2}",
                          **figures)
    if differences or loss_a != loss_b:
        raise CheckFailed(f"the resumed run differs from the straight one: {len(differences)} entries differ, "
                          f"train losses {'equal' if loss_a == loss_b else 'differ'}", **figures)
    return figures


PARTS = {
    "env": part_env, "images": part_images, "loader": part_loader, "train_synthetic": part_train_synthetic,
    "train_dali": part_train_dali, "fp16": part_fp16, "bf16": part_bf16, "syncbn": part_syncbn,
    "resume": part_resume, "train_synthetic_compiled": part_train_synthetic_compiled,
    "train_dali_compiled": part_train_dali_compiled,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check.parts", description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True, choices=list(PARTS))
    parser.add_argument("--mode", required=True, choices=("gpu", "cpu-smoke"))
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path, help="the part's JSON result goes here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        result = {"status": "pass", **PARTS[args.part](Context(args.mode, args.work))}
    except CheckFailed as e:
        result = {"status": "fail", "reason": str(e), **e.figures}
    except Exception as e:  # noqa: BLE001 - any error is this part's failure, reported with its traceback in the log
        traceback.print_exc()
        last_line = (str(e).strip().splitlines() or [""])[-1]
        result = {"status": "fail", "reason": f"{type(e).__name__}: {last_line}"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
