"""`python -m bench.real_cifar`: the service against a plain PyTorch loop on real CIFAR-10, in one sitting.

Trains ResNet-20 through the service (`trainer.main --config configs/resnet_cifar10_cpu.yaml` under torchrun) and
through bench.plain_cifar (ImageFolder, RandomCrop(32, padding=4), flip, OneCycle SGD, one DataLoader worker per
rank) on the same data, processes and epochs, one after the other; prints each one's val top-1, train img/s and
CPU time, and the service's speed as a ratio to the plain loop's measured in the same run.

    python -m bench.real_cifar --root ../shared/datasets/cifar10-jpeg.tar --epochs 2

--root takes the archive (extracted to a temporary folder) or a folder with train/ and val/. `key=value` arguments
go to the service after the preset.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from common import cli
from common.errors import DataError
from data.folder import layout_root
from trainer.plot import read_metrics

PRESET = "configs/resnet_cifar10_cpu.yaml"
# The figures (docs/real_cifar.md): what the service must reach after 2 epochs at global batch 128 on
# 2 processes, and how much faster than the plain loop it must stay.
TARGET_TOP1, TARGET_SPEEDUP = 70.2, 1.1


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant: ranks and loader workers
    return usage.ru_utime + usage.ru_stime


def run_logged(command: List[str], log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cpu, start = _children_cpu_s(), time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    result = {"wall_s": time.perf_counter() - start, "cpu_s": _children_cpu_s() - cpu, "log": str(log)}
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-8:])
        raise SystemExit(f"error: {' '.join(command[:6])} ... exited with {code}; the end of {log}:\n{tail}")
    return result


def run_service(root: Path, out: Path, nproc: int, epochs: int, overrides: List[str], preset: str = PRESET) -> dict:
    run_dir = out / "service"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainer.main", "--config", preset, f"data.root={root}", f"train.epochs={epochs}",
               f"run.dir={run_dir}", "monitor.wandb=false", "monitor.progress=false", *overrides]
    result = run_logged(command, out / "service.log")
    summary = re.search(r"train ([\d.]+) img/s", Path(result["log"]).read_text())
    val = [r for r in read_metrics(run_dir) if r["split"] == "val"][-1]
    return {**result, "val_top1": val["top1"], "val_images": val["samples"], "img_per_s": float(summary[1]),
            "run_dir": str(run_dir)}


def run_plain(root: Path, out: Path, nproc: int, epochs: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bench.plain_cifar", "--root", str(root), "--epochs", str(epochs),
               "--batch-size", str(128 // nproc)]
    result = run_logged(command, out / "plain.log")
    printed = [line for line in Path(result["log"]).read_text().splitlines() if line.startswith("{")]
    return {**result, **json.loads(printed[-1])}


def report(results: dict, epochs: int, nproc: int, images: int) -> str:
    """`images`: those trained on; the CPU cost per image includes the evaluation."""
    lines = [f"real CIFAR-10, ResNet-20, {epochs} epochs, {nproc} processes",
             f"{'run':<10} {'val top-1':>10} {'train img/s':>12} {'wall s':>8} {'CPU s':>8} {'CPU ms/img':>11}"]
    for name, r in results.items():
        lines.append(f"{name:<10} {r['val_top1']:>9.2f}% {r['img_per_s']:>12.1f} {r['wall_s']:>8.0f} "
                     f"{r['cpu_s']:>8.0f} {1000 * r['cpu_s'] / images:>11.2f}")
    service, plain = results.get("service"), results.get("plain")
    if service and plain:
        speedup = service["img_per_s"] / plain["img_per_s"]
        lines.append(f"service / plain: {speedup:.2f}x train img/s, {plain['cpu_s'] / service['cpu_s']:.2f}x less "
                     f"CPU, {service['val_top1'] - plain['val_top1']:+.2f} points val top-1")
        met = service["val_top1"] >= TARGET_TOP1 and speedup >= TARGET_SPEEDUP
        lines.append(f"target (>= {TARGET_TOP1}% and >= {TARGET_SPEEDUP}x the plain loop): "
                     f"{'met' if met else 'NOT met'}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.real_cifar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="cifar10-jpeg.tar or its extracted folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2, help="processes of each run (the global batch is 128)")
    parser.add_argument("--skip", choices=("service", "plain"), help="leave one of the two runs out")
    parser.add_argument("--out", type=Path, help="run directory and logs (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="service overrides after the preset")
    args = parser.parse_args(argv)
    if args.nproc < 1 or 128 % args.nproc:
        parser.error(f"--nproc must divide the global batch of 128, got {args.nproc}")
    if args.out and (args.out / "service").exists():
        parser.error(f"--out {args.out} already holds a run: give a new folder (a rerun would resume it, not train)")
    return args


def real_cifar_command(args: argparse.Namespace) -> int:
    out = args.out or Path(tempfile.mkdtemp(prefix="real_cifar-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cifar10-") as scratch:
        try:
            root = layout_root(args.root, Path(scratch) / "data")
        except DataError as e:
            raise DataError(f"--root: {e}") from None
        train_images = sum(len(files) for _, _, files in os.walk(root / "train"))
        images = args.epochs * (train_images // 128) * 128  # both drop the last partial global batch
        print(f"data {root}, logs in {out}", flush=True)
        per_rank = 128 // args.nproc
        runs = {"service": lambda: run_service(root, out, args.nproc, args.epochs,
                                               [f"train.batch_size={per_rank}", *args.overrides]),
                "plain": lambda: run_plain(root, out, args.nproc, args.epochs)}
        results = {}
        for name, run in runs.items():
            if name != args.skip:
                results[name] = run()
                print(f"{name}: val top-1 {results[name]['val_top1']:.2f}%, {results[name]['img_per_s']:.1f} "
                      f"img/s", flush=True)
    print(report(results, args.epochs, args.nproc, images))
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "nproc": args.nproc, **results}, indent=2) + "\n")
    return 0



def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, real_cifar_command, argv)


if __name__ == "__main__":
    sys.exit(main())
