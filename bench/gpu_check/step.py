"""Parts fp16_skip, sync_free and compile_ddp: the trainer's step on the GPU. A non-finite fp16 step is skipped,
counted and leaves the model as it was; steps that neither log nor check for a stop never make the host wait for
the GPU, EMA included; the trainer compiled with DDP trains."""
import math
import traceback
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bench.allreduce import DDPGraphSplits
from bench.gpu_check.context import ROOT, CheckFailed, Context, Passed, tree_differences
from bench.throughput import train_records
from trainer import distributed
from trainer.distributed import Dist
from trainer.trainer import Trainer

SYNC_MESSAGE = "called a synchronizing CUDA operation"
"""What torch.cuda.set_sync_debug_mode warns ("warn") or raises ("error") at every synchronizing CUDA call."""
NEVER = 10**9
"""monitor.every_steps and train.stop_check_every of the sync_free part: steps that neither log nor check."""
EMA_DECAY = 0.9999
"""optim.ema_decay of the sync_free part: the EMA's update is in the step it checks."""


def _short(ctx: Context, name: str, *overrides: str):
    """The preset at the short crop and batch, in the run directory `name`."""
    s = ctx.sizes
    return ctx.config(f"run.dir={ctx.work / 'runs' / name}", f"data.image_size={s.short_image_size}",
                      f"data.val_resize={s.short_image_size * 8 // 7}", f"train.batch_size={s.short_batch}",
                      "model.num_classes=1000", *overrides)


def check_fp16_skip(ctx: Context) -> Passed:
    """fp16 steps with GradScaler, then one on a batch of inf images: the step is skipped and counted, the scale
    goes down, and parameters, buffers (BN statistics) and momentum are bitwise those from before it."""
    s = ctx.sizes
    samples = s.short_batch * (s.step_steps + 1)
    cfg = _short(ctx, "fp16_skip", "data.backend=synthetic", f"data.synthetic_samples={samples}",
                 "train.precision=fp16")
    with Trainer(cfg, distributed.init(cfg.distributed)) as trainer:
        batches = iter(trainer.train_loader)
        for _ in range(s.step_steps):  # momentum under way; the scaler's first steps may skip on their own
            trainer.train_step([next(batches)])
        images, labels = next(batches)
        poisoned = images.clone()
        poisoned[0] = float("inf")
        model_before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        momentum_before = [state["momentum_buffer"].clone() for state in trainer.optimizer.state.values()]
        total_before, scale_before = int(trainer.guard.total), trainer.scaler.get_scale()
        trainer.train_step([(poisoned, labels)])
        skipped, total_after = int(trainer.guard.skipped), int(trainer.guard.total)
        scale_after = trainer.scaler.get_scale()
        changed = tree_differences(model_before, trainer.raw_model.state_dict())
        changed += tree_differences(momentum_before,
                                    [state["momentum_buffer"] for state in trainer.optimizer.state.values()])
    figures = {"model": s.model, "precision": "fp16", "batch": s.short_batch, "steps_before": s.step_steps,
               "skipped": skipped, "nonfinite_total_before": total_before, "nonfinite_total_after": total_after,
               "grad_scale_before": scale_before, "grad_scale_after": scale_after,
               "tensors_compared": len(model_before) + len(momentum_before), "changed": changed[:10]}
    problems = []
    if skipped != 1 or total_after != total_before + 1:
        problems.append(f"the step was not counted as skipped (skipped {skipped}, nonfinite steps "
                        f"{total_before} -> {total_after})")
    if not scale_after < scale_before:
        problems.append(f"GradScaler's scale did not go down ({scale_before} -> {scale_after})")
    if changed:
        problems.append(f"{len(changed)} tensors changed, e.g. {changed[0]}")
    if problems:
        raise CheckFailed("the inf batch's step: " + "; ".join(problems), **figures)
    return Passed(f"skipped and counted; {figures['tensors_compared']} tensors bitwise unchanged; scale "
                  f"{scale_before:g} -> {scale_after:g}", figures)


def _where(stack: traceback.StackSummary) -> str:
    """The innermost frame of this project's code that led to a sync, and the innermost of all (torch, DALI)."""
    frames = [f for f in stack if not f.filename.endswith(("warnings.py", __file__))]
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "site-packages" not in f.filename
            and "bench/gpu_check" not in f.filename]

    def name(f) -> str:
        path = Path(f.filename)
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{f.lineno} ({f.name})"

    places = [name(f) for f in (ours[-1:] + frames[-1:])]
    return places[0] if len(set(places)) == 1 else " <- ".join(reversed(places))


@contextmanager
def host_syncs(device: torch.device, mode: str):
    """Yields a list that, after the block, holds where the block made the host wait for the device, as torch's
    sync debug mode reports it: under "warn" every sync; under "error" the first, whose error ends the block (a
    warning can be filtered away on its way, an error cannot). On the CPU nothing reports one."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE in str(message):
                found.append(_where(traceback.extract_stack()))
            else:
                original(message, category, filename, lineno, file, line)

        original, warnings.showwarning = warnings.showwarning, record
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(mode)
        try:
            yield found
        except RuntimeError as e:
            if SYNC_MESSAGE not in str(e):
                raise
            found.append(_where(traceback.extract_tb(e.__traceback__)))
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def check_sync_free(ctx: Context) -> Passed:
    """The DALI loader alone, then `train_one_epoch` over batches already on the GPU, each under
    torch.cuda.set_sync_debug_mode("error"), so that the first host sync raises: zero in either. The steps run
    with the weights' EMA on (its update must not read a device scalar) and exclude the steps that log or check
    for a stop, which sync by design."""
    s = ctx.sizes
    cfg = _short(ctx, "sync_free", f"data.root={ctx.images}", f"monitor.every_steps={NEVER}",
                 f"train.stop_check_every={NEVER}", f"optim.ema_decay={EMA_DECAY}")
    with Trainer(cfg, distributed.init(cfg.distributed)) as trainer:
        source = iter(trainer.train_loader)
        warmup = [next(source) for _ in range(s.step_steps)]  # the pipeline's build and first batches
        with host_syncs(ctx.device, "error") as loader_syncs:
            for _ in range(s.step_steps):
                next(source)
        # The trainer's own loop, fed batches already on the device: what remains is the step and its bookkeeping.
        trainer.train_loader = [(images.clone(), labels.clone()) for images, labels in warmup]
        trainer.train_one_epoch()  # cuDNN's algorithm choice, the first allocations and EMA's first copy, unchecked
        window = range(trainer.step + 1, trainer.step + 1 + len(warmup))
        syncing = [k for k in window if k % cfg.monitor.every_steps == 0 or k % cfg.train.stop_check_every == 0
                   or k >= trainer.last_step]
        if syncing:
            raise CheckFailed(f"steps {syncing} of the checked window log, check for a stop or end the run")
        trainer.train_loader = [(images.clone(), labels.clone()) for images, labels in warmup]
        with host_syncs(ctx.device, "error") as step_syncs:
            trainer.train_one_epoch()
        steps = trainer.step
    figures = {"model": s.model, "precision": cfg.train.precision, "batch": s.short_batch,
               "sync_debug_mode": "error" if ctx.device.type == "cuda" else "n/a on the CPU",
               "loader_batches_checked": s.step_steps, "train_steps_checked": len(window), "steps": steps,
               "ema_decay": cfg.optim.ema_decay, "loader_sync": loader_syncs[:1], "step_sync": step_syncs[:1]}
    found = [f"the train steps made the host wait for the GPU at {step_syncs[0]}"] if step_syncs else []
    if loader_syncs:
        found.append(f"the DALI loader made the host wait for the GPU at {loader_syncs[0]}")
    if found:
        raise CheckFailed(" and ".join(found), **figures)
    return Passed(f"0 host syncs in {s.step_steps} loader batches and {len(window)} train steps with EMA "
                  f"(sync debug mode: error)", figures)


def check_compile_ddp(ctx: Context) -> Passed:
    """The trainer on a 1-rank process group, so that it wraps DDP, under train.compile and grad_accum 2 (DDP's
    no_sync around the compiled model): a few steps train with finite losses, and DDPOptimizer splits the graph."""
    s = ctx.sizes
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{ctx.work / 'compile_ddp_init'}",
                            rank=0, world_size=1, device_id=ctx.device if cuda else None,
                            timeout=timedelta(seconds=120))
    wrappers = []

    def inspect(trainer: Trainer) -> None:
        module = trainer.model
        while module is not trainer.raw_model:
            wrappers.append(type(module).__name__)
            module = module.module if hasattr(module, "module") else module._orig_mod  # DDP's, torch.compile's

    try:
        with DDPGraphSplits() as splits:
            run_dir, _ = ctx.run_trainer(
                "compile_ddp", "data.backend=synthetic", f"data.synthetic_samples={s.short_batch * 2 * s.step_steps}",
                f"model.name={s.compile_ddp_model}", f"data.image_size={s.short_image_size}",
                f"data.val_resize={s.short_image_size * 8 // 7}", f"train.batch_size={s.short_batch}",
                "model.num_classes=1000", "train.compile=true", "train.grad_accum=2",
                f"train.max_steps={s.step_steps}", "monitor.every_steps=1",
                dist=Dist(0, 0, 1, ctx.device), inspect=inspect)
    finally:
        dist.destroy_process_group()
    losses = [r["loss"] for r in train_records(run_dir)]
    figures = {"model": s.compile_ddp_model, "batch": s.short_batch, "grad_accum": 2,
               "backend": "nccl" if cuda else "gloo", "wrappers": wrappers,
               "graph_pieces": splits.pieces, "steps": len(losses), "losses": [round(x, 4) for x in losses]}
    if not {"DistributedDataParallel", "OptimizedModule"} <= set(wrappers):
        raise CheckFailed(f"the trainer's model is not compiled and wrapped in DDP: {wrappers}", **figures)
    if len(losses) != s.step_steps or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"expected {s.step_steps} finite losses, got {losses}", **figures)
    pieces = "+".join(map(str, splits.pieces)) or "none"
    return Passed(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; DDPOptimizer graph pieces "
                  f"{pieces}", figures)
