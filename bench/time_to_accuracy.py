"""`python -m bench.time_to_accuracy`: minutes to a target accuracy on real CIFAR-10, the fast techniques of
configs/resnet50_imagenet_fast.yaml against the plain preset, on the same data in one sitting.

Every variant is configs/resnet_cifar10_cpu.yaml (ResNet-20, 2 processes, global batch 128) plus overrides,
trained one after the other through the service on the same --train-per-class images of each class (all 10,000
val images), with a val pass at every epoch:

    preset       the preset as it is: pad-and-crop (He et al.), cosine, 32 px throughout
    rrc          RandomResizedCrop (area 0.25-1) instead: the crop that progressive resizing resizes, the base
                 of the three below
    ramp         rrc + progressive resizing scaled to CIFAR: 24 px, then 32 px over FFCV's 0.75-0.875 of the run
    triangular   rrc + schedule.name=triangular, the peak at 1/8 of the run (FFCV's 2 of 16 epochs)
    fast         rrc + ramp + triangular, validated with flip TTA

After each run its last checkpoint is evaluated again with train.eval_flip=true (python -m trainer.evaluate), so
that flip TTA's effect shows on every variant at no training cost. The figures: val top-1 after each epoch, the
training seconds up to it (the sum of the logged step times: evaluation excluded, as it is the same for all),
the first epoch at or past --target, and the CPU seconds of the whole run.

    python -m bench.time_to_accuracy --root ../shared/datasets/cifar10-jpeg.tar --epochs 4 --target 50

Figures, not assertions: a benchmark, not a test. docs/performance.md has a measured table.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from bench.real_cifar import run_logged, run_service
from common import cli
from common.errors import UserInputError
from data.folder import layout_root
from trainer.plot import read_metrics


def variants(epochs: int) -> Dict[str, List[str]]:
    rrc = ["data.train_crop=random_resized", "data.crop_area=[0.25,1.0]"]
    triangular = ["schedule.name=triangular", "schedule.warmup_epochs=0", f"schedule.peak_epoch={epochs / 8:g}"]
    ramp = ["data.resolution.min_res=24", "data.resolution.max_res=32", "data.resolution.step=8"]
    return {"preset": [], "rrc": rrc, "ramp": [*rrc, *ramp], "triangular": [*rrc, *triangular],
            "fast": [*rrc, *ramp, *triangular, "train.eval_flip=true"]}


def subset(root: Path, out: Path, per_class: int) -> Path:
    """root's first `per_class` train images of each class (by name) and all of val, as symlinks under out."""
    for class_dir in sorted((root / "train").iterdir()):
        target = out / "train" / class_dir.name
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            (target / image.name).symlink_to(image.resolve())
    (out / "val").symlink_to((root / "val").resolve())
    return out


def per_epoch(run_dir: Path) -> List[dict]:
    """[{epoch, top1, train_s}] at each val pass; train_s sums the step times logged up to it.

    An epoch's last steps are logged only when monitor.every_steps divides the epoch: the ones after its last
    train record count at that record's step time, so that the val pass that ends the epoch sees all of them."""
    rows, train_s, last_step, step_time = [], 0.0, 0, 0.0
    for record in read_metrics(run_dir):
        if record["split"] == "train":
            step_time = record["step_time_s"]
            train_s += (record["step"] - last_step) * step_time
            last_step = record["step"]
        elif record["split"] == "val":
            train_s += (record["step"] - last_step) * step_time
            last_step = record["step"]
            rows.append({"epoch": record["epoch"], "top1": record["top1"], "train_s": train_s})
    return rows


def evaluate_flipped(run_dir: Path, out: Path) -> float:
    result = out / "flip.json"
    command = [sys.executable, "-m", "trainer.evaluate", str(run_dir), "train.eval_flip=true", "--json",
               str(result)]
    run_logged(command, out / "flip.log")
    return json.loads(result.read_text())["top1"]


def reached(rows: List[dict], target: float) -> Optional[dict]:
    return next((row for row in rows if row["top1"] >= target), None)


def report(results: Dict[str, dict], target: float) -> str:
    lines = [f"{'variant':<11} {'val top-1 per epoch':<26} {'+flip':>7} {'train s':>8} {'CPU s':>7} "
             f"{'to ' + format(target, 'g') + '%':>14}"]
    base = reached(results["preset"]["epochs"], target) if "preset" in results else None
    for name, r in results.items():
        curve = " ".join(f"{row['top1']:.1f}" for row in r["epochs"])
        hit = reached(r["epochs"], target)
        to_target = f"{hit['train_s']:.0f} s (ep {hit['epoch']:g})" if hit else "not reached"
        lines.append(f"{name:<11} {curve:<26} {r['flip_top1']:>6.2f}% {r['epochs'][-1]['train_s']:>8.0f} "
                     f"{r['cpu_s']:>7.0f} {to_target:>14}")
        if hit and base and name != "preset":
            lines[-1] += f"  {hit['train_s'] / base['train_s']:.2f}x the preset's"
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="cifar10-jpeg.tar or its extracted folder")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=1000, help="train images per class (of 5,000)")
    parser.add_argument("--target", type=float, default=60.0, help="val top-1 (%%) to reach")
    parser.add_argument("--only", nargs="+", choices=tuple(variants(1)), help="run these variants only")
    parser.add_argument("--out", type=Path, help="run directories and logs (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def time_to_accuracy_command(args: argparse.Namespace) -> int:
    out = args.out or Path(tempfile.mkdtemp(prefix="time_to_accuracy-"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = {k: v for k, v in variants(args.epochs).items() if not args.only or k in args.only}
    if taken := [name for name in chosen if (out / name).exists()]:
        raise UserInputError(f"--out {out} already holds runs {taken}: give a new folder (a rerun would resume them)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="cifar10-") as scratch:
        root = subset(layout_root(args.root, Path(scratch) / "data"), Path(scratch) / "subset", args.train_per_class)
        print(f"data {root}, runs and logs in {out}", flush=True)
        for name, overrides in chosen.items():
            (out / name).mkdir()
            run = run_service(root, out / name, 2, args.epochs, ["train.eval_every_epochs=1", *overrides])
            run_dir = Path(run["run_dir"])
            results[name] = {"overrides": overrides, "cpu_s": run["cpu_s"], "wall_s": run["wall_s"],
                             "epochs": per_epoch(run_dir), "flip_top1": evaluate_flipped(run_dir, out / name)}
            print(f"{name}: val top-1 {results[name]['epochs'][-1]['top1']:.2f}% "
                  f"(flipped {results[name]['flip_top1']:.2f}%), {run['wall_s']:.0f} s", flush=True)
    print(report(results, args.target))
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "target": args.target,
                                         "train_per_class": args.train_per_class, **results}, indent=2) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, time_to_accuracy_command, argv)


if __name__ == "__main__":
    sys.exit(main())
