"""`python -m trainer.experiments.degradation`: the degradation problem and residual learning's answer (He et al.
2015, Fig. 6), reproduced with this project's Trainer and loader.

Plain-20, plain-56, ResNet-20 and ResNet-56 train with one recipe on one dataset, each in its own run directory
(`python -m trainer.main` in a child process, so two runs share a 2-core CPU better than one run on two threads);
then docs/degradation.png (training error dashed, test error solid, against iterations; plain nets beside residual
nets) and docs/degradation.md (the table, the verdicts, the command, the machine) are written from their
metrics.jsonl. Running the command again resumes each run from its checkpoints, so a finished run costs nothing.

The default data is generated (no download): the demo generator's small variant, 30 classes of shapes x fills at
40 px. `--cifar PATH` trains on real CIFAR-10 (data.prepare_cifar's folders, or an archive of the folder layout such
as ../shared/datasets/cifar10-jpeg.tar) with the paper's own augmentation, 4-px zero padding and a random 32-px
crop, into docs/degradation_cifar10.png and .md. `data.root=DIR` trains on another dataset in ImageNet layout with
the generated data's recipe; any other `key=value` is passed to every run after the recipe.
"""
import argparse
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from common import cli
from common.errors import EXIT_FAILURE
from data.folder import layout_root, list_split
from data.make_demo_dataset import DemoParams, make_demo_dataset
from trainer.experiments import degradation_report as report

DEPTHS = (20, 56)
ALL_DEPTHS = (20, 32, 44, 56, 110)
# The small variant's images are 40 px: a random 32-px window of them is the loader's nearest equivalent of the
# paper's 4-pixel pad and random 32-px crop (shifts of up to 4 px, no scaling); test images give their centre.
SIDE, CROP = 40, 32
CIFAR_MEAN = "[125.31,122.95,113.87]"  # CIFAR-10's train set per channel, for the paper's mean subtraction


@dataclass(frozen=True)
class Budget:
    train_per_class: int
    """Generated training images per class (30 classes)."""
    val_per_class: int
    """Generated test images per class."""
    batch_size: int
    """Images per step; the lr follows it linearly (0.1 per 128 images, the paper's)."""
    epochs: int
    """A multiple of 4: the lr drops x0.1 at 1/2 and 3/4 of them, as the paper's 32k and 48k of 64k iterations."""
    train_points: int
    """Training-error points per curve: each averages the steps since the previous one."""


# About 30 minutes for the four nets on an idle 2-core CPU. At the paper's batch of 128 that is 960 steps, too few
# for ResNet-56 to overtake ResNet-20 (it starts slower); batch 32 gives 3840 steps for the same images and compute
# (a step's cost per image hardly changes on a CPU). docs/degradation.md has both runs' figures.
DEFAULT = Budget(train_per_class=512, val_per_class=64, batch_size=32, epochs=8, train_points=48)
WHY_THESE_DEFAULTS = [
    "## Why this data and this budget", "",
    "- Data: the demo's own dataset (10 classes at 56 px) is learnt to 97.6% by a ResNet-20 in six epochs "
    "(configs/demo.yaml); every net would end near zero training error, and depth could only show as speed. The "
    "small variant needs both a shape's outline and its fill at 32 px among more clutter: ResNet-20 still gets "
    "12-15% of its training batches wrong at the end of this budget, which leaves room for depth to help or hurt.",
    "- Budget: four nets in about 30 minutes of a 2-core CPU, two at a time on one core each, is 8 epochs of the "
    "15,360 training images per net. A training step costs about 3.5 ms of CPU per image for ResNet-20 and "
    "9-10 ms for ResNet-56 (plain nets the same), at batch 32 as at 128.",
    "- The first full run used the paper's batch of 128, so 960 iterations ([its figure](degradation_batch128.png)). "
    "Plain-56 ended at 63.1% training error against plain-20's 17.9% (test 59.0% vs 15.7%): the degradation "
    "problem, plainly. But ResNet-56 ended at 18.1% against ResNet-20's 14.9% (test 15.2% vs 12.7%): the deeper "
    "ResNet trained *worse*. Its curve says why: ResNet-56 starts slower (94.7% training error at iteration 60, "
    "ResNet-20 80.5%) and was still 7 points behind (30.5% vs 23.6%) when the lr first dropped at iteration 480; "
    "the drop took both down by about 10 points and the second changed little, so the gap stayed. The paper "
    "runs 32k iterations at lr 0.1 before its first drop; 960 in all is 1.5% of its 64k, too few to pay back the "
    "slower start: that run measured the speed out of the gate rather than what depth buys.",
    "- The default therefore takes batch 32: the same images, epochs and compute, 3840 iterations, with the lr "
    "scaled linearly (0.025, the paper's 0.1 per 128 images). Nothing else changed. The table and figure above "
    "are that run's.", "",
]
# Real CIFAR-10: 4 epochs of the 50,000 images at batch 32 (6,248 iterations, a tenth of the paper's 64k) take about
# 55 minutes of an idle 2-core CPU (AVX-512) for the four nets: ResNet-56's step costs about 12 ms of CPU per image.
CIFAR = Budget(train_per_class=5000, val_per_class=1000, batch_size=32, epochs=4, train_points=48)
# Checks that the machinery runs end to end; its figures mean nothing.
QUICK = Budget(train_per_class=4, val_per_class=2, batch_size=16, epochs=4, train_points=8)


def model_names(depths) -> List[str]:
    """Deepest first, so that parallel runs finish together rather than leave one long run alone at the end."""
    return [f"{family}{depth}" for depth in sorted(depths, reverse=True) for family in ("resnet", "plain")]


def augmentation(cifar: bool) -> List[str]:
    if cifar:  # the paper's: 4 zero pixels on every side, a random 32-px crop, a flip; test on the whole image
        return ["data.image_size=32", "data.val_resize=32", "data.train_crop=pad_crop", "data.pad=4",
                f"data.mean={CIFAR_MEAN}"]
    return [f"data.image_size={CROP}", f"data.val_resize={SIDE}",
            f"data.crop_area=[{(CROP / SIDE) ** 2},{(CROP / SIDE) ** 2}]", "data.crop_aspect=[1.0,1.0]"]


def recipe(budget: Budget, data_root: Path, train_images: int, cifar: bool = False) -> List[str]:
    """The paper's CIFAR-10 recipe, as trainer.main overrides shared by every run."""
    steps = budget.epochs * (train_images // budget.batch_size)
    return [
        f"data.root={data_root}", "data.demo=false", "data.backend=dali", *augmentation(cifar), "data.num_threads=1",
        f"train.batch_size={budget.batch_size}", f"train.epochs={budget.epochs}", "train.precision=fp32",
        "train.label_smoothing=0", "train.sync_bn=false",
        # lr = optim.lr x batch / 256: 0.1 at the paper's batch of 128.
        "optim.lr=0.2", "optim.momentum=0.9", "optim.weight_decay=1e-4",
        "schedule.name=step", "schedule.warmup_epochs=0",
        f"schedule.milestones=[{budget.epochs // 2},{3 * budget.epochs // 4}]",
        f"monitor.every_steps={max(1, steps // budget.train_points)}", "monitor.progress=false",
        # Only the checkpoint at every epoch's end, which is what a rerun resumes from.
        "checkpoint.every_steps=1000000", "checkpoint.keep=1",
    ]


def generate_data(out: Path, budget: Budget) -> Path:
    params = DemoParams(seed=0, classes=30, train_per_class=budget.train_per_class,
                        val_per_class=budget.val_per_class, small_side=SIDE)
    print(f"data: {params.classes} classes x {params.train_per_class} train / {params.val_per_class} test images "
          f"of {SIDE} px -> {out}", flush=True)
    return make_demo_dataset(out, params, workers=min(4, os.cpu_count() or 1))


class RunFailed(Exception):
    pass


def say(line: str) -> None:
    # One write per line: print() writes the text and the newline apart, which parallel runs interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train(model: str, overrides: List[str], run_dir: Path, threads: int) -> float:
    """Trains (or resumes) one run in a child process; returns its wall time in seconds."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{model}.log"
    command = [sys.executable, "-m", "trainer.main", f"model.name={model}", f"run.dir={run_dir}",
               f"train.threads={threads}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    say(f"{model}: training, log {log_path}")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    elapsed = time.perf_counter() - start
    if code:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
        raise RunFailed(f"{model} exited with {code} after {elapsed:.0f} s; the end of {log_path}:\n{tail}")
    say(f"{model}: done in {elapsed:.0f} s")
    return elapsed


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.experiments.degradation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a minute-scale run that checks the machinery (CI); its figures mean nothing")
    parser.add_argument("--cifar", type=Path, metavar="PATH",
                        help="real CIFAR-10: a folder with train/ and val/, or a tar of one "
                             "(../shared/datasets/cifar10-jpeg.tar); the paper's pad-and-crop augmentation")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                        help=f"comma-separated depths from {ALL_DEPTHS}; each trains a plain and a residual net")
    parser.add_argument("--epochs", type=int, help="override the budget's epochs (a multiple of 4)")
    parser.add_argument("--out", type=Path, help="run directories and generated data (default runs/degradation, "
                                                  "runs/degradation-quick with --quick)")
    parser.add_argument("--report-dir", type=Path, help="where degradation.png and .md go (default docs/, or --out "
                                                        "with --quick)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="runs trained at once, each on cpu_count / jobs threads (default %(default)s)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: redraw the figure and rewrite the page from --out's runs")
    parser.add_argument("--wandb", action="store_true", help="log every run to W&B, grouped as the --out folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="trainer overrides for every run, e.g. data.root=/data/cifar10")
    args = parser.parse_args(argv)
    try:
        args.depths = sorted({int(d) for d in args.depths.split(",")})
    except ValueError:
        parser.error(f"--depths takes comma-separated integers, got {args.depths!r}")
    if not set(args.depths) <= set(ALL_DEPTHS):
        parser.error(f"--depths: {args.depths} is not a subset of {ALL_DEPTHS}")
    if args.epochs is not None and (args.epochs < 4 or args.epochs % 4):
        parser.error(f"--epochs must be a positive multiple of 4, got {args.epochs}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.cifar and args.quick:
        parser.error("--quick trains on generated data; leave out --cifar")
    if args.cifar and not args.cifar.exists():
        parser.error(f"--cifar: {args.cifar} does not exist")
    return args


def degradation_command(args: argparse.Namespace, argv: Optional[List[str]]) -> int:
    budget = QUICK if args.quick else CIFAR if args.cifar else DEFAULT
    if args.epochs:
        budget = Budget(**{**budget.__dict__, "epochs": args.epochs})
    name = "degradation-quick" if args.quick else "degradation_cifar10" if args.cifar else "degradation"
    out = args.out or Path("runs") / name
    report_dir = args.report_dir or (out if args.quick else Path("docs"))
    if args.report_only:
        context = report.Context.read(out)
    else:
        try:
            context = run_experiment(args, argv, budget, out)
        except RunFailed as e:  # a child run's own error is in its log, named in the message
            print(cli.message(e), file=sys.stderr)
            return EXIT_FAILURE
    runs = {m: report.read_run(out / m) for m in context.models}
    report_dir.mkdir(parents=True, exist_ok=True)
    page = "degradation_cifar10" if context.cifar else "degradation"
    png, md = report_dir / f"{page}.png", report_dir / f"{page}.md"
    report.plot(runs, png)
    md.write_text(report.markdown(runs, context, png.name, WHY_THESE_DEFAULTS if context.defaults else None))
    print(report.verdicts(runs))
    print(f"wrote {png} and {md}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, lambda args: degradation_command(args, argv), argv)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the waited-for child processes, all together
    return usage.ru_utime + usage.ru_stime


def run_experiment(args: argparse.Namespace, argv: Optional[List[str]], budget: Budget, out: Path):
    """Trains (or resumes) every run; returns, and keeps in out/, what the report says about how they ran."""
    started, load_before = time.time(), os.getloadavg()
    roots = [o.split("=", 1)[1] for o in args.overrides if o.startswith("data.root=")]
    if args.cifar:
        data_root = layout_root(args.cifar, out / "data")
    else:
        data_root = Path(roots[-1]) if roots else generate_data(out / "data", budget)
    overrides = recipe(budget, data_root, len(list_split(str(data_root), "train")), cifar=bool(args.cifar))
    overrides += [f"monitor.wandb={str(args.wandb).lower()}", f"monitor.group={out.name}",
                  f"monitor.tags=[{out.name}]", *args.overrides]
    models = model_names(args.depths)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    cpu_before = _children_cpu_s()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        walls = dict(zip(models, pool.map(lambda m: train(m, overrides, out / m, threads), models)))
    cpu_s = _children_cpu_s() - cpu_before
    context = report.Context(
        command=" ".join(["python -m trainer.experiments.degradation", *(sys.argv[1:] if argv is None else argv)]),
        data=(f"real CIFAR-10 ({args.cifar})" if args.cifar else f"{data_root}" if roots else
              f"generated: 30 classes x {budget.train_per_class} train / {budget.val_per_class} test images of "
              f"{SIDE} px (data.make_demo_dataset, small_side={SIDE})"),
        models=models, batch_size=budget.batch_size, epochs=budget.epochs, jobs=args.jobs, threads=threads,
        walls=walls, wall=time.time() - started, load=[list(load_before), list(os.getloadavg())],
        cpu_s=cpu_s, started=started, machine=report.machine(), quick=args.quick,
        defaults=budget == DEFAULT and not roots and not args.cifar, cifar=bool(args.cifar))
    context.write(out)
    return context


if __name__ == "__main__":
    sys.exit(main())
