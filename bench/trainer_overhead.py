"""`python -m bench.trainer_overhead`: the trainer's end-to-end images/s against a bare forward/backward/step loop.

Both run the same model, precision, batch and device on synthetic tensors, in this process, one after the other;
the ratio shows what the trainer's bookkeeping (metrics, agreement on signals, checkpoint checks) costs.
`--resnet50` adds ResNet-50's bare images/s at fp32, fp32 + channels_last and bf16.
"""
import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.throughput import throughput, train_records
from common import cli
from trainer import distributed
from trainer.config import load_config
from trainer.models import build_model
from trainer.precision import autocast
from trainer.trainer import Trainer


def bare_loop(model_name: str, precision: str, batch: int, size: int, steps: int, warmup: int,
              channels_last: bool, device: torch.device, num_classes: int = 1000) -> float:
    """Images/s of forward, loss, backward and SGD step on one fixed batch: the ceiling for the trainer."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=num_classes).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(num_classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def trainer_loop(model_name: str, precision: str, batch: int, size: int, steps: int, warmup: int,
                 channels_last: bool, num_classes: int = 1000) -> float:
    """Images/s of the real Trainer on the synthetic backend, over the steps after `warmup`."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [
            f"run.dir={run_dir}", f"model.name={model_name}", "data.backend=synthetic",
            f"data.num_classes={num_classes}", f"data.image_size={size}", f"data.val_resize={size}",
            f"data.synthetic_samples={batch * (steps + warmup)}", f"train.batch_size={batch}",
            f"train.precision={precision}", f"train.channels_last={channels_last}", "train.epochs=1",
            f"monitor.every_steps={max(warmup, 1)}", "monitor.wandb=false", "monitor.progress=false",
            "checkpoint.every_steps=0"])
        with contextlib.redirect_stdout(sys.stderr), Trainer(cfg, distributed.init(cfg.distributed)) as trainer:
            trainer.train()
        # A train record every `warmup` steps: the first window is the warm-up, left out.
        return throughput(train_records(run_dir), batch).img_per_s


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--resnet50", action="store_true", help="also ResNet-50 at batch 16, 224 px (slow on CPU)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def overhead_command(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
              "torch": torch.__version__, "trainer_vs_bare": [], "resnet50": []}
    channels_last = not args.no_channels_last
    print(f"{'model':10} {'precision':9} {'batch':>5} {'bare img/s':>11} {'trainer img/s':>14} {'ratio':>6}")
    for precision in args.precisions.split(","):
        common = (args.model, precision, args.batch, args.image_size, args.steps, args.warmup, channels_last)
        bare = bare_loop(*common, device=device)
        full = trainer_loop(*common)
        report["trainer_vs_bare"].append({"model": args.model, "precision": precision, "batch": args.batch,
                                          "bare_img_per_s": bare, "trainer_img_per_s": full, "ratio": full / bare})
        print(f"{args.model:10} {precision:9} {args.batch:>5} {bare:>11.1f} {full:>14.1f} {full / bare:>6.3f}")
    if args.resnet50:
        print(f"\nresnet50, batch 16, 224 px, bare loop on {device.type}:")
        for label, precision, cl in (("fp32", "fp32", False), ("fp32 + channels_last", "fp32", True),
                                     ("bf16 + channels_last", "bf16", True)):
            rate = bare_loop("resnet50", precision, 16, 224, steps=3, warmup=1, channels_last=cl, device=device)
            report["resnet50"].append({"setting": label, "img_per_s": rate})
            print(f"  {label:22} {rate:7.2f} img/s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0



def main(argv=None) -> int:
    return cli.run(parse_args, overhead_command, argv)


if __name__ == "__main__":
    sys.exit(main())
