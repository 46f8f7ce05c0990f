"""`python -m trainer.lr_find --config FILE [key=value ...] [--steps 100] [--start-lr 1e-6] [--end-lr 10] [--out DIR]`,
alone or under torchrun: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3; fast.ai's `lr_find`).

The Trainer builds the run exactly as trainer.main would (data, model, optimizer groups, precision, DDP); only the
schedule is replaced, by an exponential ramp of the optimizer's lr from --start-lr to --end-lr over --steps steps. The
test stops early once the smoothed loss passes 4x its minimum, writes lr_find.png and lr_find.json to --out (by
default runs/lr_find/<config name>; never a checkpoint) and proposes fast.ai's 'valley' as `optim.lr`, the peak lr
of the schedule in the config's units: per 256 images.
"""
import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import cli  # noqa: E402
from common.errors import ConfigError, Diverged, UserInputError  # noqa: E402
from common.log import log  # noqa: E402
from trainer import distributed, precision  # noqa: E402
from trainer.config import check_paths, load_config, to_dict  # noqa: E402
from trainer.run_dir import RunDir  # noqa: E402

BETA = 0.98  # fast.ai's smoothing of the loss
DIVERGED = 4  # the test stops once the smoothed loss is this many times its minimum (fast.ai)
SKIP_END = 5  # fast.ai's suggestions leave out the last 5 points (the climb that stopped the test)
PROPOSED = "valley"  # fast.ai's default suggestion


def smooth(losses: list, beta: float = BETA) -> list:
    """The exponential moving average of `losses`, bias-corrected as fast.ai's and Adam's: divided by 1 - beta**n,
    so that the first values are not pulled towards the average's start at 0."""
    average, out = 0.0, []
    for n, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**n))
    return out


def valley(losses: list) -> int:
    """fast.ai's 'valley': the index half-way (1/3 + 1/6) along the longest decreasing subsequence of the curve,
    the longest stretch over which the loss keeps falling, noise and all."""
    longest = [1] * len(losses)  # of the decreasing subsequences that end at i
    for i in range(len(losses)):
        for j in range(i):
            if losses[i] < losses[j]:
                longest[i] = max(longest[i], longest[j] + 1)
    end = longest.index(max(longest))
    start = max(0, end - longest[end])  # fast.ai's start: one before the first point, where that is not -1
    return start + int(longest[end] / 3) + int(longest[end] / 6)


def suggest(lrs: list, smoothed: list, steps: int) -> dict:
    """fast.ai's suggestions, as lrs of the optimizer, from the points it reads: not the first tenth of the ramp,
    where a fresh net's loss falls at almost any lr, nor the last SKIP_END."""
    first = steps // 10
    lrs, losses = np.array(lrs[first:-SKIP_END]), np.array(smoothed[first:-SKIP_END])
    if len(lrs) < 2:
        raise Diverged(f"the loss diverged after {len(smoothed)} steps, too soon to read a curve from; "
                       "lower --end-lr or raise --steps")
    slopes = np.diff(losses) / np.diff(np.log(lrs))  # per e-fold of the lr: the ramp is exponential
    # Steepest on the way down only: past the minimum, a loss that blew up can fall back steeply (seen on
    # Imagenette with ResNet-50, where that read 1.2 against a minimum at 0.03).
    lowest = int(losses.argmin())
    return {"valley": float(lrs[valley(list(losses))]), "steepest": float(lrs[slopes[:max(1, lowest)].argmin()]),
            "min/10": float(lrs[lowest]) / 10}


def range_test(trainer, batches, start: float, end: float, steps: int) -> tuple:
    """(lrs, losses, why it stopped): one optimizer step of the Trainer's own per lr of the ramp. The loss is the
    mean over every rank's images, so that every rank stops at the same step."""
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] = start  # LambdaLR's base lr, which the run's own schedule set to the scaled optim.lr
    # Replaced rather than stepped around: Trainer.train_step steps whatever scheduler it holds.
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda step: (end / start) ** (step / (steps - 1)))
    trainer.model.train()
    lrs, losses = [], []
    for step in range(1, steps + 1):
        lr = trainer.optimizer.param_groups[0]["lr"]
        loss_sum, _, samples = trainer.train_step(next(batches))
        totals = torch.stack([loss_sum.float(), torch.tensor(float(samples), device=loss_sum.device)])
        loss_sum, samples = distributed.all_reduce_(totals).tolist()  # a host read each step: a tool, not a run
        if not math.isfinite(loss_sum / samples):
            return lrs, losses, f"the loss was not finite at step {step} (lr {lr:.3g})"
        lrs.append(lr)
        losses.append(loss_sum / samples)
        smoothed = smooth(losses)
        if step % 10 == 0:
            log.info(f"step {step}/{steps}: lr {lr:.3g} loss {losses[-1]:.4f} smoothed {smoothed[-1]:.4f}")
        if smoothed[-1] > DIVERGED * min(smoothed):
            return lrs, losses, f"the smoothed loss passed {DIVERGED}x its minimum at step {step} (lr {lr:.3g})"
    return lrs, losses, f"--steps {steps} ran"


def plot(result: dict, out: Path) -> None:
    lrs, smoothed, proposal = result["lrs"], result["smoothed"], result["proposal"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(lrs, result["losses"], color="tab:blue", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", label=f"smoothed (EMA, beta {BETA})")
    for (name, suggestion), color in zip(result["suggestions"].items(), ("tab:red", "tab:orange", "tab:green")):
        ax.axvline(suggestion["lr"], color=color, linestyle=":", label=f"{name}: lr {suggestion['lr']:.3g}")
    at = int(np.argmin(np.abs(np.log(lrs) - math.log(proposal["lr"]))))
    ax.plot(proposal["lr"], smoothed[at], "o", color="tab:red", markersize=9,
            label=f"proposed: optim.lr={proposal['optim.lr']:.3g} (per 256 images)")
    ax.set_xscale("log")
    ax.set_ylim(top=1.1 * max(smoothed))  # the raw loss's last spikes would flatten the curve
    ax.set_xlabel(f"learning rate of the optimizer (global batch {result['global_batch']})")
    ax.set_ylabel("train loss")
    ax.set_title(f"lr range test: {result['stopped']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(result: dict, out: Path) -> None:
    """Writes lr_find.json and lr_find.png to `out` and prints the suggestions and the line to paste."""
    (out / "lr_find.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "lr_find.png")
    print(f"lr range test: {len(result['lrs'])} steps from lr {result['lrs'][0]:.3g} to {result['lrs'][-1]:.3g} "
          f"at a global batch of {result['global_batch']}; stopped: {result['stopped']}")
    for name, suggestion in result["suggestions"].items():
        print(f"  {name:<9} lr {suggestion['lr']:.3g} = optim.lr={suggestion['optim.lr']:.3g}"
              + ("  <- proposed" if name == PROPOSED else ""))
    print(f"proposed for the schedule's peak lr (after any warmup), per 256 images as optim.lr takes it:\n"
          f"optim.lr={result['proposal']['optim.lr']:.3g}\n"
          f"plot {out / 'lr_find.png'}, data {out / 'lr_find.json'}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.lr_find", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml), as for trainer.main")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the ramp (default 100)")
    # Not --start/--end: under torchrun, argparse would read --start as torchrun's own --start-method.
    parser.add_argument("--start-lr", type=float, default=1e-6, help="first lr of the optimizer (default 1e-6)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last lr of the optimizer (default 10)")
    parser.add_argument("--out", type=Path, help="directory of the test (default runs/lr_find/<config name>); "
                                                 "it is the run.dir of the short run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the YAML, as for trainer.main")
    return parser.parse_intermixed_args(argv)  # options and key=value in any order


def check_ramp(args: argparse.Namespace) -> None:
    if args.steps < 10:
        raise ConfigError("--steps", f"must be >= 10 (the suggestions skip the first tenth and the last "
                                     f"{SKIP_END} points), got {args.steps}")
    if not args.start_lr > 0:
        raise ConfigError("--start-lr", f"must be positive, got {args.start_lr}")
    if not args.start_lr < args.end_lr < math.inf:
        raise ConfigError("--end-lr", f"must be finite and above --start-lr={args.start_lr}, got {args.end_lr}")


def lr_find(args: argparse.Namespace) -> int:
    check_ramp(args)
    cfg = load_config(args.config, args.overrides)
    precision.check_device(cfg.train.precision)
    out = args.out or Path("runs") / "lr_find" / (args.config.stem if args.config else "default")
    checkpoints = RunDir(out).checkpoints
    if checkpoints.is_dir() and any(checkpoints.iterdir()):  # the Trainer would resume from them
        raise UserInputError(f"--out {out} holds a training run's checkpoints; give the test a directory of its own")
    cfg.run.dir, cfg.monitor.wandb, cfg.monitor.progress = str(out), False, False
    check_paths(cfg)

    from trainer.trainer import Trainer, accumulation_groups  # after validation: bad input fails before heavy imports

    with Trainer(cfg, distributed.init(cfg.distributed)) as trainer:
        # The ramp counts steps, not epochs: a short epoch is followed by the next.
        batches = itertools.chain.from_iterable(
            accumulation_groups(trainer.train_loader, cfg.train.grad_accum) for _ in itertools.count())
        lrs, losses, stopped = range_test(trainer, batches, args.start_lr, args.end_lr, args.steps)
        smoothed = smooth(losses)
        suggestions = {name: {"lr": lr, "optim.lr": lr * 256 / trainer.global_batch}
                       for name, lr in suggest(lrs, smoothed, args.steps).items()}
        result = {"stopped": stopped, "steps": args.steps, "start_lr": args.start_lr, "end_lr": args.end_lr,
                  "global_batch": trainer.global_batch, "proposal": {"method": PROPOSED, **suggestions[PROPOSED]},
                  "suggestions": suggestions, "lrs": lrs, "losses": losses, "smoothed": smoothed,
                  "config": to_dict(cfg)}
        if trainer.dist.is_main:
            report(result, out)
    return 0


def main(argv=None) -> int:
    return cli.run(parse_args, lr_find, argv, close=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
