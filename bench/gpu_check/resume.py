"""Part resume: N steps straight against N/2, a new Trainer resuming from the checkpoint and N/2 more, compared
bitwise, with the trainer's deterministic kernels; and the checkpoint holds only CPU tensors."""
import torch

from bench.gpu_check.context import CheckFailed, Context, Passed, tree_differences, tree_tensors
from bench.throughput import train_records


def check_resume(ctx: Context) -> Passed:
    """N steps straight vs N/2, a new Trainer resuming from the checkpoint, N/2 more: the same bits."""
    s = ctx.sizes
    n = s.resume_steps
    # train.deterministic: cuDNN without autotuning and atomics, cuBLAS with a fixed workspace; without it a GPU
    # run does not repeat itself bit for bit, resumed or not. The demo set at the short crop: its small JPEGs and
    # few val images keep the three Trainers' pipelines, steps and final validations short; the decode is the
    # same random-crop (ROI) decoder.
    size = s.short_image_size
    common = (f"data.root={ctx.demo}", f"data.image_size={size}", f"data.val_resize={size * 8 // 7}",
              f"train.batch_size={s.resume_batch}", "train.deterministic=true", "monitor.every_steps=1")
    straight, _ = ctx.run_trainer("resume_straight", *common, f"train.max_steps={n}")
    split, _ = ctx.run_trainer("resume_world_size", *common, f"train.max_steps={n // 2}")
    _, resumed_at = ctx.run_trainer("resume_world_size", *common, f"train.max_steps={n}")
    name = f"checkpoints/ckpt-{n:09d}.pt"
    # No map_location: a tensor saved from the GPU would load onto it, and a CPU-only host could not load it.
    a, b = (torch.load(d / name, weights_only=True) for d in (straight, split))
    keys = ("model", "optimizer", "scheduler", "step", "epoch")
    differences = tree_differences({k: a[k] for k in keys}, {k: b[k] for k in keys})
    loss_a, loss_b = ([r["loss"] for r in train_records(d)] for d in (straight, split))
    tensors = list(tree_tensors(a))
    off_cpu = [f"{path} on {t.device}" for path, t in tensors if t.device.type != "cpu"]
    figures = {"model": s.model, "steps": n, "resumed_at": resumed_at, "batch": s.resume_batch, "image_size": size,
               "device": str(ctx.device), "decoder": "mixed" if ctx.device.type == "cuda" else "cpu",
               "deterministic": True,
               "tensors_compared": sum(isinstance(t, torch.Tensor) for t in a["model"].values())
               + sum(len(v) for v in a["optimizer"]["state"].values()),
               "differences": differences[:10], "train_losses_equal": loss_a == loss_b,
               "checkpoint_tensors": len(tensors), "checkpoint_tensors_off_cpu": off_cpu[:10]}
    if resumed_at != n // 2:
        raise CheckFailed(f"the second run started at step {resumed_at}, not from the checkpoint at {n // 2}",
                          **figures)
    if differences or loss_a != loss_b:
        raise CheckFailed(f"the resumed run differs from the straight one: {len(differences)} entries differ, "
                          f"train losses {'equal' if loss_a == loss_b else 'differ'}", **figures)
    if off_cpu:
        raise CheckFailed(f"{len(off_cpu)} of the checkpoint's {len(tensors)} tensors are not on the CPU, e.g. "
                          f"{off_cpu[0]}", **figures)
    return Passed(f"bitwise equal after resuming at step {resumed_at} of {n}; {len(tensors)} checkpoint tensors, "
                  f"all on the CPU", figures)
