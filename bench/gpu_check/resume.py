"""Part resume: N steps straight against N/2, a new Trainer resuming from the checkpoint and N/2 more, compared
bitwise."""
import os

import torch

from bench.gpu_check.context import CheckFailed, Context, Passed
from bench.throughput import train_records


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


def check_resume(ctx: Context) -> Passed:
    """N steps straight vs N/2, a new Trainer resuming from the checkpoint, N/2 more: the same bits."""
    # Deterministic kernels: cuDNN without autotuning and atomics, cuBLAS with a fixed workspace.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    s = ctx.sizes
    n = s.resume_steps
    common = (f"data.root={ctx.images}", f"train.batch_size={s.resume_batch}", "train.cudnn_benchmark=false",
              "monitor.every_steps=1")
    straight, _ = ctx.run_trainer("resume_straight", *common, f"train.max_steps={n}")
    split, _ = ctx.run_trainer("resume_split", *common, f"train.max_steps={n // 2}")
    _, resumed_at = ctx.run_trainer("resume_split", *common, f"train.max_steps={n}")
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
    return Passed(f"bitwise equal after resuming at step {resumed_at} of {n}", figures)
