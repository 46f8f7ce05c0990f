"""`python -m trainer.plot RUN_DIR [--out FILE]`: loss, top-1, lr and images/s against step, from metrics.jsonl."""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

from common import cli  # noqa: E402
from common.errors import UserInputError  # noqa: E402

PANELS = [("loss", "loss"), ("top1", "top-1 (%)"), ("lr", "learning rate"), ("img_per_s", "images/s")]


def read_metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run directory?)")
    # A run still writing may have cut its last line short: only complete lines count.
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def plot(records: list, out: Path, title: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, label) in zip(axes.flat, PANELS):
        for split, style in (("train", "-"), ("val", "o-"), ("val_ema", "s--")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=4)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/metrics.png)")
    return parser.parse_args(argv)


def plot_command(args: argparse.Namespace) -> int:
    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError as e:
        raise UserInputError(str(e)) from None
    out = args.out or args.run_dir / "metrics.png"
    plot(records, out, str(args.run_dir))
    print(out)
    return 0


def main(argv=None) -> int:
    return cli.run(parse_args, plot_command, argv)


if __name__ == "__main__":
    sys.exit(main())
