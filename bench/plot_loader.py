"""Draws docs/loader_bench.png from `python -m bench.loader --json` output: images/s per backend, train and val,
against the decode ceiling.

    python -m bench.plot_loader /tmp/perf/data.json docs/loader_bench.png [--title "2 cores, load 1.2"]
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

from common import cli


def plot(report: dict, out: str, title: str) -> None:
    backends = list(report["backends"])
    ceiling = report["ceiling"]["img_per_s"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    width = 0.38
    for offset, split, colour in ((-width / 2, "train", "#3b75af"), (width / 2, "val", "#ef8636")):
        rates = [report["backends"][b][split]["img_per_s"] for b in backends]
        bars = ax.bar([i + offset for i in range(len(backends))], rates, width, label=split, color=colour)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
    ax.text(len(backends) - 0.5, ceiling, f"decode ceiling {ceiling:.0f}", ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("images/s")
    ax.set_ylim(0, max(ceiling, *(report["backends"][b][s]["img_per_s"] for b in backends for s in ("train", "val")))
                * 1.15)
    ax.set_title(title or f"Input pipelines on {report['threads']} CPU threads, batch {report['batch_size']}",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.plot_loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="bench.loader --json output")
    parser.add_argument("png", help="image to write")
    parser.add_argument("--title", default="", help="plot title (default: threads and batch)")
    return parser.parse_args(argv)


def plot_command(args: argparse.Namespace) -> int:
    with open(args.json) as f:
        plot(json.load(f), args.png, args.title)
    return 0



def main(argv=None) -> int:
    return cli.run(parse_args, plot_command, argv)


if __name__ == "__main__":
    sys.exit(main())
