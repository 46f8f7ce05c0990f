"""`python -m bench.imagenette_ablation`: what each technique of configs/imagenette_resnet50.yaml buys, on real
ImageNet photos (Imagenette), one run per variant, one after the other, in one sitting.

Every variant is the preset plus overrides: the preset itself, each technique taken out of it (or swapped for what
it replaced), and the options the preset leaves off put in. A proxy keeps it affordable on a CPU: --model, --size
and --train-per-class shrink the net, the images and the train split alike for every variant (the val split stays
whole), so the table ranks techniques under one budget; the preset's own figures come from bench.imagenette.

    python -m bench.imagenette_ablation --root ../shared/datasets/imagenette-224.tar --epochs 5 \\
        --model resnet18 --size 64 --json docs/imagenette_ablation.json

Each run validates after every epoch and keeps an EMA of the weights (optim.ema_decay, --ema): it does not change
training, so every row also says what evaluating the average would give. Figures, not assertions.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from bench.real_cifar import run_logged
from bench.time_to_accuracy import per_epoch, subset
from common import cli
from common.errors import UserInputError
from data.folder import layout_root
from trainer.plot import read_metrics

PRESET = "configs/imagenette_resnet50.yaml"


def variants(size: int) -> Dict[str, tuple]:
    """name -> (what it tests, overrides of the preset) at the proxy's train side `size`."""
    low = size * 3 // 4 // 8 * 8  # the ramp from 3/4 of the side (96 of 128), on multiples of 8
    return {
        "preset": ("the preset as it is", []),
        "torchvision_net": ("no ResNet-C stem, shortcut B: torchvision's net",
                            ["model.deep_stem=false", "model.shortcut=B"]),
        "no_resnet_d": ("ResNet-C only: shortcut B", ["model.shortcut=B"]),
        "no_zero_init": ("residual BN scales start at 1", ["model.zero_init_residual=false"]),
        "crop_area_0.08": ("RandomResizedCrop down to 8% of the image (ImageNet's)", ["data.crop_area=[0.08,1.0]"]),
        "no_label_smoothing": ("hard labels", ["train.label_smoothing=0"]),
        "decay_bn_and_bias": ("weight decay on BN and biases too", ["optim.decay_bn_and_bias=true"]),
        "adamw_flat_cos": ("fast.ai's optimizer side: AdamW 1e-2 at 64, flat_cos", [
            "optim.name=adamw", "optim.nesterov=false", "optim.lr=0.04", "optim.adam_beta2=0.99",
            "optim.adam_eps=1e-6", "optim.weight_decay=0.01", "schedule.name=flat_cos",
            "schedule.warmup_epochs=0.3", "schedule.decay_start=0.75"]),
        "onecycle": ("onecycle (peak at 1/4 of the run) instead of warmup + cosine", [
            "schedule.name=onecycle", "schedule.warmup_epochs=0", "schedule.peak_epoch=1.25"]),
        "flat_cos": ("flat_cos (decay from 3/4 of the run) instead of cosine", [
            "schedule.name=flat_cos", "schedule.decay_start=0.75"]),
        "lr_x2": ("twice the lr", ["optim.lr=1.6"]),
        "lr_half": ("half the lr", ["optim.lr=0.4"]),
        "blurpool": ("model.blurpool on", ["model.blurpool=true"]),
        "progressive": (f"progressive resizing {low} -> {size} px", [
            f"data.resolution.min_res={low}", f"data.resolution.max_res={size}", "data.resolution.step=8"]),
        "mixup_0.2": ("mixup 0.2", ["train.mixup_alpha=0.2"]),
        "cutmix_1.0": ("cutmix 1.0", ["train.cutmix_alpha=1.0"]),
    }


VARIANT_NAMES = tuple(variants(128))


def proxy_overrides(model: str, size: int) -> List[str]:
    """The preset's net and sides shrunk together: the val resize keeps the preset's 146/128 ratio."""
    return [f"model.name={model}", f"data.image_size={size}", f"data.val_image_size={size}",
            f"data.val_resize={round(size * 146 / 128)}"]


def report(results: Dict[str, dict], header: str, size: int = 128) -> str:
    lines = [header, f"{'variant':<20} {'val top-1 per epoch':<32} {'final':>6} {'EMA':>6} {'vs preset':>9} "
                     f"{'train s':>8}  what"]
    base = results.get("preset", {}).get("final")
    for name, r in results.items():
        curve = " ".join(f"{row['top1']:.1f}" for row in r["epochs"])
        delta = f"{r['final'] - base:+.1f}" if base is not None and name != "preset" else ""
        ema = f"{r['ema']:.1f}" if r.get("ema") is not None else "-"
        lines.append(f"{name:<20} {curve:<32} {r['final']:>6.1f} {ema:>6} {delta:>9} "
                     f"{r['epochs'][-1]['train_s']:>8.0f}  {variants(size)[name][0]}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.imagenette_ablation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="imagenette-224.tar or its extracted folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="resnet50", help="the proxy's net (the preset's options stay)")
    parser.add_argument("--size", type=int, default=128, help="the proxy's train and val side, px")
    parser.add_argument("--train-per-class", type=int, default=0, help="train images per class; 0 takes all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.999, help="optim.ema_decay of every run (0: none)")
    parser.add_argument("--only", nargs="+", choices=VARIANT_NAMES, help="run these variants only")
    parser.add_argument("--out", type=Path, help="run directories and logs (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every variant, after the proxy's")
    return parser.parse_args(argv)


def ablation_command(args: argparse.Namespace) -> int:
    out = args.out or Path(tempfile.mkdtemp(prefix="imagenette_ablation-"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = {name: v for name, v in variants(args.size).items() if not args.only or name in args.only}
    if taken := [name for name in chosen if (out / name).exists()]:
        raise UserInputError(f"--out {out} already holds runs {taken}: give a new folder (a rerun would resume them)")
    common = [*proxy_overrides(args.model, args.size), f"seed={args.seed}", f"optim.ema_decay={args.ema}",
              f"train.epochs={args.epochs}", "train.eval_every_epochs=1", "monitor.wandb=false",
              "monitor.progress=false", "checkpoint.every_steps=0", *args.overrides]
    header = (f"Imagenette, {args.model} at {args.size} px, {args.epochs} epochs, seed {args.seed}, "
              f"{args.train_per_class or 'all'} train images per class, 2 processes")
    results = {}
    with tempfile.TemporaryDirectory(prefix="imagenette-") as scratch:
        root = layout_root(args.root, Path(scratch) / "data")
        if args.train_per_class:
            root = subset(root, Path(scratch) / "subset", args.train_per_class)
        print(f"data {root}, runs and logs in {out}", flush=True)
        for name in chosen:
            run_dir = out / name
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "trainer.main", "--config", PRESET, f"data.root={root}", f"run.dir={run_dir}",
                       *common, *chosen[name][1]]
            run_dir.mkdir()
            run = run_logged(command, out / f"{name}.log")
            rows = per_epoch(run_dir)
            ema = [r["top1"] for r in read_metrics(run_dir) if r["split"] == "val_ema"]
            results[name] = {"overrides": chosen[name][1], "epochs": rows, "final": rows[-1]["top1"],
                             "ema": ema[-1] if ema else None, "cpu_s": run["cpu_s"], "wall_s": run["wall_s"]}
            print(f"{name}: val top-1 {rows[-1]['top1']:.2f}%, {run['wall_s']:.0f} s", flush=True)
    print(report(results, header, args.size))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "common": common, **results}, indent=2) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, ablation_command, argv)


if __name__ == "__main__":
    sys.exit(main())
