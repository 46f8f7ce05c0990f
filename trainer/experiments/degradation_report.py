"""The degradation experiment's outputs: the Fig. 6-style figure, the verdicts and docs/degradation.md."""
import dataclasses
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib
import torch
from omegaconf import OmegaConf

from data.config import DataConfig
from trainer.models import build_model
from trainer.plot import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# He et al. 2015, Table 6: CIFAR-10 test error (%), best of 5 runs for ResNet-110 (6.61 +- 0.16 their mean). The
# plain nets have no table entry: Fig. 6 (left) shows them only as curves.
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43}
# Table 3: ImageNet val top-1 error (%), 10-crop testing.
PAPER_RESNET34_TOP1 = {"plain": 28.54, "A": 25.03, "B": 24.52, "C": 24.19}
CONTEXT_FILE = "experiment.json"
COLOURS = {20: "tab:orange", 32: "tab:green", 44: "tab:blue", 56: "tab:red", 110: "black"}


@dataclass
class Run:
    name: str
    depth: int
    plain: bool
    classes: int
    train: List[Tuple[int, float]]
    """(step, training error %) per logged window: the augmented batches since the previous point, in train mode."""
    test: List[Tuple[int, float]]
    """(step, test error %) per evaluation."""
    final_window: int
    """Images behind the last training-error point."""
    step_time_s: float
    """Median seconds per optimizer step."""

    @property
    def label(self) -> str:
        return f"{'plain' if self.plain else 'ResNet'}-{self.depth}"


def read_run(run_dir: Path) -> Run:
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    steps = [0] + [r["step"] for r in train]
    batch = OmegaConf.load(run_dir / "config.yaml").train.batch_size
    name = run_dir.name
    return Run(name=name, depth=int(name.removeprefix("plain").removeprefix("resnet")), plain=name.startswith("plain"),
               classes=len(json.loads((run_dir / "classes.json").read_text())),
               train=[(r["step"], 100 - r["top1"]) for r in train],
               test=[(r["step"], 100 - r["top1"]) for r in records if r["split"] == "val"],
               final_window=(steps[-1] - steps[-2]) * batch,
               step_time_s=sorted(r["step_time_s"] for r in train)[len(train) // 2])


def plot(runs: Dict[str, Run], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, plain in zip(axes, (True, False)):
        for run in sorted((r for r in runs.values() if r.plain == plain), key=lambda r: r.depth):
            colour = COLOURS[run.depth]
            ax.plot(*zip(*run.train), "--", color=colour, linewidth=1)
            ax.plot(*zip(*run.test), "-", color=colour, linewidth=2.2, label=run.label)
        ax.set_title("plain networks" if plain else "ResNets (option A shortcuts)")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(title="dashed: training error\nsolid: test error", loc="upper right", fontsize=9,
                  title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _final(run: Run) -> Tuple[float, float, float]:
    """(final training error, final test error, the training error's binomial standard error), in %."""
    train = run.train[-1][1]
    return train, run.test[-1][1], math.sqrt(max(train * (100 - train), 1.0) / run.final_window)


def comparison(shallow: Run, deep: Run) -> str:
    """One sentence on whether the deeper net trains worse or better, against the noise of the final windows."""
    (s_train, s_test, s_se), (d_train, d_test, d_se) = _final(shallow), _final(deep)
    margin = 2 * math.hypot(s_se, d_se)
    difference = d_train - s_train
    if difference > margin:
        outcome = "trains worse than"
    elif difference < -margin:
        outcome = "trains better than"
    else:
        outcome = "trains no differently (within noise) from"
    return (f"{deep.label} {outcome} {shallow.label}: training error {d_train:.1f}% vs {s_train:.1f}% "
            f"({difference:+.1f} points; twice the noise of the final windows is {margin:.1f}), "
            f"test error {d_test:.1f}% vs {s_test:.1f}%.")


def verdicts(runs: Dict[str, Run]) -> str:
    lines = []
    for plain in (True, False):
        family = sorted((r for r in runs.values() if r.plain == plain), key=lambda r: r.depth)
        if len(family) > 1:
            lines.append(comparison(family[0], family[-1]))
    return "\n".join(lines)


@dataclass
class Context:
    """How the runs were trained, kept in the experiment's folder so that the page can be rewritten later."""

    command: str
    data: str
    models: List[str]
    batch_size: int
    epochs: int
    jobs: int
    threads: int
    walls: Dict[str, float]
    """Wall seconds of each run's process."""
    wall: float
    load: List[List[float]]
    """The load averages (1, 5, 15 min) at the start and at the end."""
    cpu_s: float
    """CPU seconds (user + system) of the training processes: what the runs cost, whatever else the machine ran."""
    started: float
    machine: str
    quick: bool
    defaults: bool
    """Generated data and the default budget: the page then says why they are what they are."""
    cifar: bool = False
    """Real CIFAR-10 with the paper's pad-and-crop augmentation, not the generated 40-px images."""

    def write(self, folder: Path) -> None:
        (folder / CONTEXT_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, folder: Path) -> "Context":
        return cls(**json.loads((folder / CONTEXT_FILE).read_text()))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    device = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{_cpu_name()}, {os.cpu_count()} CPU cores{device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def _count(name: str, **options) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, **options).parameters())


def stage_shapes(name: str, side: int) -> List[Tuple[int, int]]:
    """(map side, filters) at the output of each stage, from a forward pass on the meta device."""
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
        shapes = []
        hooks = [stage.register_forward_hook(lambda m, i, o: shapes.append((o.shape[-1], o.shape[1])))
                 for stage in model.stages()]
        model(torch.empty(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    return shapes


def _table(runs: Dict[str, Run]) -> List[str]:
    rows = ["| model | parameters | training error | test error | paper: CIFAR-10 test error |",
            "|---|---|---|---|---|"]
    for run in sorted(runs.values(), key=lambda r: (not r.plain, r.depth)):
        train, test, se = _final(run)
        paper = f"{PAPER_TEST_ERROR[run.name]:.2f}%" if run.name in PAPER_TEST_ERROR else \
            "no table entry; Fig. 6 (left): the deeper, the higher"
        parameters = _count(run.name, num_classes=run.classes) / 1e6
        rows.append(f"| {run.label} | {parameters:.2f} M | {train:.1f}% (+-{se:.1f}) | {test:.1f}% | {paper} |")
    return rows


def _seed_content() -> List[str]:
    cifar = {n: stage_shapes(n, 32) for n in ("resnet20", "plain56", "resnet110")}
    imagenet = {n: stage_shapes(n, 224) for n in ("resnet18", "resnet50", "plain152")}
    options = {o: _count("resnet34", shortcut=o) for o in ("A", "B", "C")}
    options["plain"] = _count("plain34")
    data = DataConfig()
    with_1001, with_1000 = _count("resnet50", num_classes=1001), _count("resnet50", num_classes=1000)
    shapes = lambda s: ", ".join(f"{side}x{side}/{filters}" for side, filters in s)  # noqa: E731
    return [
        "## The seed's other checkable content", "",
        "### The two design rules", "",
        "Within a stage, layers keep the feature map's size and the number of filters; where the map is halved "
        "(a stride-2 first block), the number of filters doubles, so the time per layer stays the same. "
        "`tests/test_models.py::test_design_rules` checks both on every built ResNet and plain net by walking its "
        "modules. The stages' outputs (map side x side / filters), from the built models:", "",
        *[f"- {name} at 32 px: {shapes(s)}" for name, s in cifar.items()],
        *[f"- {name} at 224 px: {shapes(s)}" for name, s in imagenet.items()], "",
        "### Shortcut options A, B, C (ResNet-34)", "",
        "A pads the identity with zeros where the shape changes (no parameters), B projects only there (1x1 conv "
        "+ BN), C projects on every block. Parameters of the built models, and the paper's Table 3 (ImageNet val "
        "top-1 error, 10-crop):", "",
        "| ResNet-34 | parameters | paper top-1 error |", "|---|---|---|",
        *[f"| {'plain-34' if o == 'plain' else 'option ' + o} | {options[o]:,} | {PAPER_RESNET34_TOP1[o]}% |"
          for o in ("plain", "A", "B", "C")], "",
        f"A adds nothing to plain-34; B adds {options['B'] - options['A']:,} parameters in its three projections, C "
        f"{options['C'] - options['A']:,} (its thirteen extra projections are what the paper credits for C's "
        "small gain); the paper keeps B for the deeper nets.", "",
        "### The TF reference's 1001 classes", "",
        "The TensorFlow reference (tensorflow/models, official/r1/resnet) classifies 1001 classes: index 0 is a "
        "background class and ImageNet's 1000 are 1-1000. This project numbers the 1000 class folders 0-999 in "
        f"sorted order; `model.num_classes=1001` adds the extra output for such checkpoints: ResNet-50 then has "
        f"{with_1001:,} parameters, {with_1001 - with_1000:,} more than with 1000 (`test_num_classes_1001`).", "",
        "### The seed's preprocessing constants", "",
        f"- RGB mean subtracted from 0-255 pixels, no division by a standard deviation: "
        f"{', '.join(map(str, data.mean))} (`data.mean`, `data.std: null`), as the TF reference's "
        "`_R_MEAN, _G_MEAN, _B_MEAN`.",
        f"- Test: the shorter side resized to {data.val_resize} (the reference's `_RESIZE_MIN`), then the central "
        f"{data.image_size}x{data.image_size} crop (`data.val_resize`, `data.image_size`).",
        f"- Training: a random crop of area {data.crop_area[0]}-{data.crop_area[1]} of the image and aspect "
        f"{data.crop_aspect[0]:.2f}-{data.crop_aspect[1]:.2f}, resized to {data.image_size}, and a horizontal "
        "flip (`data.crop_area`, `data.crop_aspect`); the TF reference samples area 0.05-1 and aspect 0.75-1.33 "
        "with a bounding box covering at least 0.1 of the image.",
        "",
    ]


_WINDOW_AUGMENTATION = (
    "a random 32x32 window of the 40x40 image (shifts of up to 4 px, the nearest the loader comes to the paper's "
    "4-px padding and random crop: `data.crop_area=[0.64,0.64]`, `data.crop_aspect=[1,1]`) and a horizontal flip; "
    "test: the central 32x32 window. Mean subtraction only.")
_CIFAR_AUGMENTATION = (
    "the paper's: 4 zero pixels padded on every side, a random 32x32 crop and a horizontal flip "
    "(`data.train_crop=pad_crop`, `data.pad=4`); test: the unpadded 32x32 image. CIFAR-10's per-channel mean "
    "subtracted (the paper's is per pixel), no division.")


def markdown(runs: Dict[str, Run], context: Context, figure: str, why: Optional[List[str]] = None) -> str:
    date = datetime.datetime.fromtimestamp(context.started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (before, after) = context.load
    steps = max(run.train[-1][0] for run in runs.values())
    lines = [
        "# The degradation problem, reproduced", "",
        "He et al. (2015): a deeper *plain* network has *higher training error* than a shallower one (the "
        "degradation problem, not overfitting), and residual learning, y = F(x, {W_i}) + x, removes it: the deeper "
        "ResNet trains to lower error. Their Fig. 6 shows it on CIFAR-10. This page is written by "
        "`python -m trainer.experiments.degradation` from this project's own runs; the figure and the numbers are "
        "whatever those runs produced.", "",
        *(["**A `--quick` run: it checks the machinery, its figures mean nothing.**", ""] if context.quick else []),
        f"![training (dashed) and test (solid) error against iterations]({figure})", "",
        "## Result", "",
        *[f"- {line}" for line in verdicts(runs).splitlines()], "",
        *_table(runs), "",
        "Training error is the share of the last logged window's augmented training batches (random 32-px crops "
        "and flips, the net in train mode) that the net got wrong while training on them, as the paper's curves "
        "measure it; +- is that window's binomial standard error. Test error is top-1 on the test split (centre "
        "crops) after the last step. The paper's figures are for CIFAR-10 at 64k iterations, so only the "
        "direction of each comparison carries over, not the values.", "",
        "## How it ran", "",
        f"- Command: `{context.command}`",
        f"- Date: {date}; machine: {context.machine}",
        f"- {len(runs)} runs, {context.jobs} at a time on {context.threads} thread(s) each; wall time "
        f"{context.wall / 60:.1f} min, per run "
        + ", ".join(f"{runs[m].label} {w / 60:.1f} min ({runs[m].step_time_s:.2f} s/step)"
                    for m, w in context.walls.items())
        + f". Load average (1, 5, 15 min) {before[0]:.1f}, {before[1]:.1f}, {before[2]:.1f} at the start and "
        f"{after[0]:.1f}, {after[1]:.1f}, {after[2]:.1f} at the end: other work on the machine stretches the wall "
        f"time, not the results. The training processes used {context.cpu_s / 60:.1f} CPU-minutes, "
        f"{context.cpu_s / 60 / (context.jobs * context.threads):.1f} min on each of the "
        f"{context.jobs * context.threads} cores they ran on: the wall time on an idle machine.",
        f"- Data: {context.data}.",
        f"- Recipe (the paper's, scaled to the budget): {steps} iterations of SGD at batch {context.batch_size} "
        f"({context.epochs} epochs), momentum 0.9, weight decay 1e-4 on conv and linear weights (not on BN, this "
        f"trainer's default), lr {0.1 * context.batch_size / 128:g} (the paper's 0.1 per 128 images, scaled "
        "linearly to the batch) divided by 10 at 1/2 and 3/4 of the iterations (the paper: 32k and 48k of "
        "64k), no warmup, BN, no dropout, cross-entropy without label smoothing, fp32. Augmentation: "
        + (_CIFAR_AUGMENTATION if context.cifar else _WINDOW_AUGMENTATION)
        + " Option A shortcuts, as the paper's CIFAR nets.",
        "",
        *(why or []),
        *_seed_content(),
    ]
    return "\n".join(lines)
