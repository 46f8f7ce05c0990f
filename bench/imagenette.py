"""`python -m bench.imagenette`: the service's Imagenette preset against a plain torchvision loop, N runs each, in
one sitting.

For each seed 0..N-1, one after the other: the service (`trainer.main --config PRESET` under torchrun, validated
after every epoch) and bench.plain_imagenette (ImageFolder, torchvision's transforms and ResNet, DataLoader
workers, OneCycle SGD) on the same data, processes, epochs, net depth, crop sides, per-process batch and precision,
all taken from the service's resolved config. Prints for each: the mean and spread of the final val top-1, train
img/s, CPU seconds (every process of the run: ranks, loader workers, torchrun) and the training seconds to 80%
top-1; then the training seconds the service takes to reach the plain loop's mean final top-1, as a ratio to the
plain loop's (the target is at most 0.8). Writes --out (markdown: command, machine, date, the table, the per-epoch
curves) and the raw figures beside it (.json), once every run has finished.

    python -m bench.imagenette --root ../shared/datasets/imagenette-224.tar --epochs 5 --runs 3

--root takes the archive (extracted to a temporary folder) or a folder with train/ and val/. Arguments after `--`
go to the service after the preset. Figures, not assertions: a benchmark, not a test.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench.plain_imagenette import ARCHS
from bench.real_cifar import run_logged, run_service
from bench.time_to_accuracy import per_epoch, reached
from common import cli
from common.errors import DataError, UserInputError
from data.folder import layout_root
from trainer.config import Config, load_config

PRESET = "configs/imagenette_resnet50.yaml"
# The targets: time to 80% top-1, and the service at the plain loop's final accuracy within 0.8x of the
# plain loop's training time.
TARGET_TOP1, TARGET_TIME_RATIO = 80.0, 0.8


def dataset_root(root: Path, scratch: Path) -> Path:
    try:
        return layout_root(root, scratch)
    except DataError as e:
        raise DataError(f"--root: {e}") from None


def plain_flags(cfg: Config, arch: Optional[str], lr: Optional[float]) -> List[str]:
    """bench.plain_imagenette's flags for the task the service's resolved config trains: the net (the same one
    unless `arch`: depth, stem, shortcut, zero-init), crop sides, per-process batch and precision. Its
    augmentation, optimizer and schedule stay its own."""
    arch = arch or cfg.model.name
    if arch not in ARCHS:
        raise UserInputError(f"the plain loop builds torchvision's {'/'.join(ARCHS)}; model.name={cfg.model.name} "
                             "has none of them: give --plain-arch, or --skip-plain")
    if cfg.train.precision not in ("fp32", "bf16"):
        raise UserInputError(f"the plain loop trains in fp32 or bf16, not train.precision={cfg.train.precision}")
    net = ([*(["--deep-stem"] if cfg.model.deep_stem else []), "--shortcut", cfg.model.shortcut or "B",
            *(["--zero-init-residual"] if cfg.model.zero_init_residual else [])] if arch == cfg.model.name else [])
    flags = ["--arch", arch, *net, "--size", str(cfg.data.image_size),
             "--val-size", str(cfg.data.val_image_size or cfg.data.image_size),
             "--val-resize", str(cfg.data.val_resize),
             "--batch-size", str(cfg.train.batch_size * cfg.train.grad_accum), "--precision", cfg.train.precision]
    return flags + (["--lr", f"{lr:g}"] if lr is not None else [])


def torchrun(nproc: int, module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
            *args]


def plain_rows(log_text: str) -> tuple:
    """(per-epoch rows as per_epoch() gives them, the final line) of bench.plain_imagenette's output."""
    printed = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    rows = [{"epoch": p["epoch"], "top1": p["val_top1"], "train_s": p["train_s"]} for p in printed if "epoch" in p]
    return rows, printed[-1]


def run_plain(root: Path, out: Path, nproc: int, epochs: int, seed: int, flags: List[str]) -> dict:
    command = torchrun(nproc, "bench.plain_imagenette", "--root", str(root), "--epochs", str(epochs),
                       "--seed", str(seed), *flags)
    out.mkdir(parents=True, exist_ok=True)
    result = run_logged(command, out / "plain.log")
    rows, final = plain_rows(Path(result["log"]).read_text())
    return {**result, "val_top1": final["val_top1"], "img_per_s": final["img_per_s"], "train_s": final["train_s"],
            "epochs": rows}


def summarize(runs: List[dict], target: float = TARGET_TOP1) -> dict:
    finals = [r["epochs"][-1]["top1"] for r in runs]
    to_target = [hit["train_s"] if (hit := reached(r["epochs"], target)) else None for r in runs]
    return {"runs": len(runs), "top1_mean": statistics.fmean(finals), "top1_min": min(finals),
            "top1_max": max(finals), "top1_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "img_per_s": statistics.fmean(r["img_per_s"] for r in runs),
            "cpu_s": statistics.fmean(r["cpu_s"] for r in runs),
            "train_s": statistics.fmean(r["epochs"][-1]["train_s"] for r in runs), "to_target_s": to_target}


def time_to(seconds: List[Optional[float]]) -> str:
    """The mean of the runs that reached a target, and how many did."""
    hits = [s for s in seconds if s is not None]
    if not hits:
        return "not reached"
    shown = f"{statistics.fmean(hits):.0f} s"
    return shown if len(hits) == len(seconds) else f"{shown} ({len(hits)} of {len(seconds)} runs)"


def service_to_plain(service_runs: List[dict], plain: dict) -> dict:
    """The service's training seconds to the plain loop's mean final top-1, each run's, and the mean's ratio to the
    plain loop's mean training seconds (None where a run never reached it)."""
    seconds = [hit["train_s"] if (hit := reached(r["epochs"], plain["top1_mean"])) else None for r in service_runs]
    ratio = statistics.fmean(seconds) / plain["train_s"] if None not in seconds else None
    return {"top1": plain["top1_mean"], "train_s": seconds, "ratio": ratio}


def table(summaries: Dict[str, dict], target: float = TARGET_TOP1) -> List[str]:
    lines = [f"| run | final val top-1, mean | min-max | std | train img/s | CPU s | train s | to {target:g}% |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        std = f"{s['top1_std']:.2f}" if s["top1_std"] is not None else "-"
        lines.append(f"| {name} ({s['runs']} runs) | {s['top1_mean']:.2f}% | {s['top1_min']:.2f}-{s['top1_max']:.2f} "
                     f"| {std} | {s['img_per_s']:.1f} | {s['cpu_s']:.0f} | {s['train_s']:.0f} "
                     f"| {time_to(s['to_target_s'])} |")
    return lines


def comparison(summaries: Dict[str, dict], versus: dict) -> List[str]:
    service, plain = summaries["service"], summaries["plain"]
    reach = (f"in {time_to(versus['train_s'])} of training, {versus['ratio']:.2f}x the plain loop's "
             f"{plain['train_s']:.0f} s" if versus["ratio"] is not None
             else f"not in every run ({time_to(versus['train_s'])})")
    met = versus["ratio"] is not None and versus["ratio"] <= TARGET_TIME_RATIO
    return [f"service - plain: {service['top1_mean'] - plain['top1_mean']:+.2f} points mean final val top-1, "
            f"{service['img_per_s'] / plain['img_per_s']:.2f}x train img/s, {plain['cpu_s'] / service['cpu_s']:.2f}x "
            f"less CPU",
            f"the service reaches the plain loop's mean final {versus['top1']:.2f}% {reach}: target (<= "
            f"{TARGET_TIME_RATIO}x) {'met' if met else 'NOT met'}"]


def figures(results: Dict[str, List[dict]]) -> List[str]:
    """The table, and the comparison where both were trained."""
    summaries = {name: summarize(runs) for name, runs in results.items()}
    lines = table(summaries)
    if len(summaries) == 2:
        lines += ["", *comparison(summaries, service_to_plain(results["service"], summaries["plain"]))]
    return lines


def curves(results: Dict[str, List[dict]]) -> List[str]:
    """Val top-1 after each epoch, training seconds up to it in brackets: one row per run."""
    epochs = max(len(r["epochs"]) for runs in results.values() for r in runs)
    lines = ["| run | seed | " + " | ".join(f"epoch {i + 1}" for i in range(epochs)) + " |",
             "|---|---:|" + "---:|" * epochs]
    for name, runs in results.items():
        for r in runs:
            cells = [f"{row['top1']:.1f}% ({row['train_s']:.0f} s)" for row in r["epochs"]]
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines


def machine() -> dict:
    """This CPU's model name, logical cores and AVX-512 (and its bf16 instructions), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return cpu_facts(info) | {"cores": os.cpu_count(), "load_average": os.getloadavg()[0]}


def cpu_facts(cpuinfo: str) -> dict:
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.processor() or "unknown"), "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags}


def markdown(results: Dict[str, List[dict]], meta: dict) -> str:
    m = meta["machine"]
    yes = {True: "yes", False: "no"}
    lines = ["# Imagenette: the service's preset against a plain torchvision loop", "",
             f"{meta['epochs']} epochs, {meta['runs']} runs each (seeds 0-{meta['runs'] - 1}), {meta['nproc']} "
             f"processes, in one sitting; val top-1 on all of val/ after every epoch.", "",
             "```bash", meta["command"], "```", "",
             f"- machine: {m['model']}, {m['cores']} logical cores, AVX-512 {yes[m['avx512']]} (bf16 "
             f"{yes[m['avx512_bf16']]}); load average {m['load_average']:.2f} at the start",
             f"- date: {meta['started']} - {meta['finished']}; Python {platform.python_version()}, torch "
             f"{torch.__version__}",
             f"- service: `{meta['service_command']}`",
             f"- plain loop: `{meta['plain_command']}`", "",
             *figures(results), "",
             "Train s: training seconds to the last epoch (validation excluded; the service's from its logged step "
             "times), the mean over the runs; CPU s: every process of one run, validation included.", "",
             "## Val top-1 per epoch (training seconds up to it)", "", *curves(results), ""]
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.imagenette", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="imagenette-224.tar or its extracted folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="runs of each, seeds 0..RUNS-1")
    parser.add_argument("--config", type=Path, default=Path(PRESET), help="the service's preset")
    parser.add_argument("--nproc", type=int, default=2, help="processes of each run")
    parser.add_argument("--skip-plain", action="store_true", help="train the service only")
    parser.add_argument("--plain-lr", type=float, help="the plain loop's OneCycle peak (default: its own)")
    parser.add_argument("--plain-arch", choices=ARCHS, help="the plain loop's net (default: the service's "
                                                            "model.name)")
    parser.add_argument("--out", type=Path, default=Path("docs/imagenette.md"),
                        help="the markdown report; the figures go beside it as .json")
    parser.add_argument("--work", type=Path, help="run directories and logs (default: a new temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="service overrides after the preset")
    args = parser.parse_args(argv)
    for name in ("epochs", "runs", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.work and any(args.work.glob("seed*")):
        parser.error(f"--work {args.work} already holds runs: give a new folder (a rerun would resume them)")
    return args


def imagenette_command(args: argparse.Namespace, argv: Optional[List[str]] = None) -> int:
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    host = machine()
    with tempfile.TemporaryDirectory(prefix="imagenette-") as scratch:
        root = dataset_root(args.root, Path(scratch) / "data")
        service_args = [f"data.root={root}", f"train.epochs={args.epochs}", "train.eval_every_epochs=1",
                        *args.overrides]
        cfg = load_config(args.config, service_args)  # a bad key or value fails here, before any training
        flags = [] if args.skip_plain else plain_flags(cfg, args.plain_arch, args.plain_lr)
        work = args.work or Path(tempfile.mkdtemp(prefix="imagenette-"))
        print(f"data {root}, runs and logs in {work}", flush=True)
        results = {"service": [], **({} if args.skip_plain else {"plain": []})}
        for seed in range(args.runs):
            out = work / f"seed{seed}"
            out.mkdir(parents=True)
            run = run_service(root, out, args.nproc, args.epochs, [f"seed={seed}", "train.eval_every_epochs=1",
                                                                   *args.overrides], preset=str(args.config))
            results["service"].append({**run, "seed": seed, "epochs": per_epoch(Path(run["run_dir"]))})
            if not args.skip_plain:
                results["plain"].append({**run_plain(root, out, args.nproc, args.epochs, seed, flags), "seed": seed})
            for name, runs in results.items():
                print(f"seed {seed} {name}: val top-1 {runs[-1]['val_top1']:.2f}%, {runs[-1]['img_per_s']:.1f} "
                      f"img/s, {runs[-1]['wall_s']:.0f} s", flush=True)
    print("\n".join([f"Imagenette, {args.epochs} epochs", *figures(results)]))
    meta = {"command": shlex.join(["python", "-m", "bench.imagenette", *(sys.argv[1:] if argv is None else argv)]),
            "epochs": args.epochs, "runs": args.runs, "nproc": args.nproc, "machine": host, "started": started,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "service_command": shlex.join(["torchrun", f"--nproc_per_node={args.nproc}", "-m", "trainer.main",
                                           "--config", str(args.config), "data.root=DIR",
                                           f"train.epochs={args.epochs}", "seed=S", "train.eval_every_epochs=1",
                                           *args.overrides]),
            "plain_command": shlex.join(["torchrun", f"--nproc_per_node={args.nproc}", "-m", "bench.plain_imagenette",
                                         "--root", "DIR", "--epochs", str(args.epochs), "--seed", "S", *flags])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, meta))
    summaries = {name: summarize(runs) for name, runs in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "summaries": summaries, "runs": results},
                                                        indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, lambda args: imagenette_command(args, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
