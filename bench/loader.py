"""Input pipeline throughput: images/s of each backend's train and val loaders on the same JPEGs and CPU threads.

    python -m bench.loader --make-photos DIR --count 4000     # photographs (bench.photos): the published figures
    python -m bench.loader --make-images DIR --count 2000     # generated ImageNet-like JPEGs (about 500x375, q90)
    python -m bench.loader --make-imagenet DIR [--from TAR]   # the 1000 real ImageNet samples, train/ -> val/
    python -m bench.loader --root DIR [--json OUT] [--batches N] [--repeats R] [--set prefetch=3 ...]
    python -m bench.loader --root DIR --screen [--cold]           # start-up cost: listing and screening train
    python -m bench.loader --root DIR --stall [--epochs 4] [--step-ms 0]   # DALI: the wait at each epoch's start

Each backend runs in its own subprocess (clean memory, its own worker processes), measured after one warm-up
batch. With --repeats R the backends take turns R times and each figure is the median of its R runs; a ratio to
torchvision-pil (the PyTorch reference) is taken within each round, so that load from other work moves both
sides of it, then the median. Beside images/s, each loader's CPU time per image (its process and workers), which
other work on a shared machine barely moves. The ceiling is the single-core full-decode rate (the faster of PIL
and torchvision.io.decode_jpeg, per CPU-second) times the thread count; train/ceiling compares CPU costs per image.
Figures only: nothing here asserts a speed.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.images import CLASSES, SAMPLES_ARCHIVE, extract_samples, make_images
from bench.photos import make_photos
from common import cli
from common.errors import DataError

VARIANTS = {  # name -> DataConfig overrides
    "dali": {"backend": "dali"},
    "torchvision-pil": {"backend": "torchvision", "torchvision_decoder": "pil"},
    "torchvision-tensor": {"backend": "torchvision", "torchvision_decoder": "tensor"},
}
REFERENCE = "torchvision-pil"

# Storage format -> a function of the folder root giving the DataConfig overrides that read that format's copy
# of the same images (writing the copy first where needed); the decode ceiling always reads the folder's files.
def _shards(root: str) -> dict:
    """The same images as WebDataset shards (python -m data.make_shards), written beside the folder once."""
    out = root.rstrip("/") + ".shards"
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        subprocess.run([sys.executable, "-m", "data.make_shards", root, "--out", out], check=True)
    return {"format": "webdataset", "root": out}


FORMATS = {"folder": lambda root: {}, "webdataset": _shards}


def _overrides(pairs) -> dict:
    """--set KEY=VALUE pairs as DataConfig arguments, each value read as YAML (4, false, [1, 2])."""
    import yaml

    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers) / 1024


def _cpu_seconds() -> float:
    """CPU time of this process and its live descendants (the DataLoader's workers are children of a forkserver).
    Other work on a shared machine halves images/s but barely moves this cost."""
    parent, used = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parent[int(entry.name)], used[int(entry.name)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, grown = {os.getpid()}, True
    while grown:
        children = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= children
        grown = bool(children)
    return sum(used.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def _measure(args) -> dict:
    """Runs in the subprocess: one variant, train then val."""
    import torch

    from data.build import build_loader
    from data.config import DataConfig

    overrides = dict(VARIANTS[args.variant], **_overrides(args.set))
    cfg = DataConfig(**{"root": args.root, "num_threads": args.threads, **overrides})
    result = {}
    for split in ("train", "val"):
        loader = build_loader(cfg, split, batch_size=args.batch_size, rank=0, world_size=1,
                              device=torch.device("cpu"), seed=0)
        batches = iter(loader)
        next(batches)  # start-up (pipeline build, worker start) is not throughput
        start, cpu, images = time.perf_counter(), _cpu_seconds(), 0
        for _ in range(min(args.batches, len(loader) - 1)):
            images += next(batches)[0].shape[0]
        result[split] = {"img_per_s": images / (time.perf_counter() - start),
                         "cpu_ms_per_img": (_cpu_seconds() - cpu) * 1000 / images, "images": images}
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def decode_ceiling(root: str, threads: int, sample: int = 200) -> dict:
    """Single-core full JPEG decode rate of PIL and of torchvision.io.decode_jpeg, times `threads`. The rates are per
    CPU-second (process time), which other work on a shared machine barely moves, of files spread over all classes."""
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    torch.set_num_threads(1)
    from data.folder import list_split

    paths = list_split(root, "train").paths()
    paths = paths[::max(1, len(paths) // sample)][:sample]
    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append(f.read())
    rates = {}
    start = time.process_time()
    for path in paths:
        Image.open(path).convert("RGB").load()
    rates["pil"] = len(paths) / (time.process_time() - start)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    start = time.process_time()
    for t in tensors:
        decode_jpeg(t)
    rates["decode_jpeg"] = len(paths) / (time.process_time() - start)
    best = max(rates.values())
    return {"single_core": rates, "threads": threads, "img_per_s": best * threads}


def screen_rate(root: str, cold: bool) -> dict:
    """Files/s of listing the train split and of build_loader's screen of its files. `cold` first drops the files'
    pages from the page cache (fdatasync + posix_fadvise: directory entries and inodes stay cached)."""
    from data.folder import list_split
    from data.image_files import screen

    start = time.perf_counter()
    paths = list_split(root, "train").paths()
    listing = time.perf_counter() - start
    if cold:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    start = time.perf_counter()
    bad = screen(paths)
    screening = time.perf_counter() - start
    return {"files": len(paths), "listing_files_per_s": len(paths) / listing,
            "screen_files_per_s": len(paths) / screening, "bad": len(bad), "cold": cold}


def _waits(batches, step_s: float):
    """Seconds spent in each next() of a pass over `batches`, and the pass's wall time; `step_s` of sleep before
    each next() stands for a training step (or, before the first, the training since the last pass), the time
    the loader has to prefetch."""
    waits, batches, begin = [], iter(batches), time.perf_counter()
    while True:
        time.sleep(step_s)
        start = time.perf_counter()
        try:
            next(batches)
        except StopIteration:
            return waits, start - begin
        waits.append(time.perf_counter() - start)


def stall(root: str, batch_size: int, threads: int, epochs: int, step_s: float, overrides: dict) -> dict:
    """The DALI loader's wait for the first batch of each epoch and evaluation pass against its median batch wait:
    "before" builds a fresh loader each time, as the loader did per epoch and evaluation until it kept one pipeline
    of each (timed from iter(): listing and screening the files were never redone per epoch); "after" is one loader
    crossing the epoch boundaries and running pass after pass."""
    import statistics

    import torch

    from data.build import build_loader
    from data.config import DataConfig
    from data.folder import list_split

    for split in ("train", "val"):  # both sides read from the page cache
        for path in list_split(root, split).paths():
            with open(path, "rb") as f:
                f.read()
    cfg = DataConfig(root=root, backend="dali", num_threads=threads, **overrides)

    def loader(split):
        return build_loader(cfg, split, batch_size=batch_size, rank=0, world_size=1, device=torch.device("cpu"),
                            seed=0)

    result = {}
    for split in ("train", "val"):
        kept = loader(split)
        after = [_waits(kept, step_s) for _ in range(epochs)]
        before = [_waits(loader(split), step_s) for _ in range(epochs)]
        images = epochs * (len(kept) * batch_size if split == "train" else kept.num_samples)
        result[split] = {"batches": len(kept), "epochs": epochs, "step_s": step_s}
        for name, runs in (("before", before), ("after", after)):
            result[split][name] = {
                # the first epoch's first batch builds the pipeline on both sides: not a boundary
                "first_batch_s": statistics.median(waits[0] for waits, _ in runs[1:]),
                "median_batch_s": statistics.median(x for waits, _ in runs for x in waits[1:]),
                "img_per_s": images / sum(seconds for _, seconds in runs),
            }
    return result


def _print_stall(r: dict):
    for split, one, many in (("train", "epoch", "epochs"), ("val", "evaluation pass", "evaluation passes")):
        s = r[split]
        b, a = s["before"], s["after"]
        print(f"DALI {split}: {s['batches']} batches per {one}, {s['epochs']} {many}, {s['step_s'] * 1000:.0f} ms step")
        print(f"  {'':<44}{'before (new pipeline)':>22}{'after (kept)':>14}")
        for label, key, scale in ((f"first batch of an {one} (median), ms", "first_batch_s", 1000),
                                  ("median batch, ms", "median_batch_s", 1000),
                                  (f"img/s over all {many}, step included", "img_per_s", 1)):
            print(f"  {label:<44}{b[key] * scale:>22.1f}{a[key] * scale:>14.1f}")
        print(f"  {'first / median batch':<44}{b['first_batch_s'] / b['median_batch_s']:>22.1f}"
              f"{a['first_batch_s'] / a['median_batch_s']:>14.1f}")


def _label(fmt: str, variant: str) -> str:
    return variant if fmt == "folder" else f"{variant} [{fmt}]"


def _run(args, variant: str, overrides: list) -> dict:
    command = [sys.executable, "-m", "bench.loader", "--root", args.root, "--variant", variant,
               "--batches", str(args.batches), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--set", *args.set, *overrides]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(args) -> dict:
    """Every (format, variant) once per round and the decode ceiling after them, for `args.repeats` rounds."""
    overrides = {fmt: [f"{k}={v}" for k, v in FORMATS[fmt](args.root).items()] for fmt in args.formats}
    rounds = []
    for _ in range(args.repeats):
        backends = {_label(fmt, variant): _run(args, variant, overrides[fmt])
                    for fmt in args.formats for variant in args.variants
                    if fmt == "folder" or VARIANTS[variant]["backend"] == "dali"}  # shards are read by DALI only
        rounds.append({"backends": backends, "ceiling": decode_ceiling(args.root, args.threads)})
    return summarise(rounds, batch_size=args.batch_size, threads=args.threads, overrides=args.set)


def summarise(rounds: list, **settings) -> dict:
    """Medians over rounds. `vs_reference`: the median of each round's images/s over torchvision-pil's (on folders);
    `cpu_vs_reference`: the same for torchvision-pil's CPU time per image over this one's (> 1 is cheaper)."""
    backends = {}
    for label in rounds[0]["backends"]:
        runs = [r["backends"][label] for r in rounds]
        backends[label] = {"peak_rss_mib": max(run["peak_rss_mib"] for run in runs)}
        for split in ("train", "val"):
            rates, costs = [run[split]["img_per_s"] for run in runs], [run[split]["cpu_ms_per_img"] for run in runs]
            figures = {"img_per_s": statistics.median(rates), "runs": rates,
                       "cpu_ms_per_img": statistics.median(costs), "cpu_runs": costs}
            if REFERENCE in rounds[0]["backends"]:
                reference = [r["backends"][REFERENCE][split] for r in rounds]
                figures["vs_reference"] = statistics.median(a / b["img_per_s"] for a, b in zip(rates, reference))
                figures["cpu_vs_reference"] = statistics.median(b["cpu_ms_per_img"] / a
                                                                for a, b in zip(costs, reference))
            backends[label][split] = figures
    ceilings = [r["ceiling"] for r in rounds]
    ceiling = {"img_per_s": statistics.median(c["img_per_s"] for c in ceilings), "threads": ceilings[0]["threads"],
               "single_core": {k: statistics.median(c["single_core"][k] for c in ceilings)
                               for k in ceilings[0]["single_core"]}}
    return {"backends": backends, "ceiling": ceiling, "reference": REFERENCE, "repeats": len(rounds),
            **settings, "rounds": rounds}


def print_report(report: dict):
    def ratio(figures, key):
        return f"{figures[key]:.2f}x" if key in figures else ""

    ceiling = report["ceiling"]
    header = ["train img/s", "vs pil", "CPU ms/img", "vs pil", "val img/s", "vs pil", "CPU ms/img", "vs pil",
              "train/ceil.", "RSS MiB"]
    print(f"{'backend':<26}" + "".join(f"{h:>12}" for h in header))
    for label, r in report["backends"].items():
        cells = []
        for figures in (r["train"], r["val"]):
            cells += [f"{figures['img_per_s']:.1f}", ratio(figures, "vs_reference"), f"{figures['cpu_ms_per_img']:.2f}",
                      ratio(figures, "cpu_vs_reference")]
        # The share in CPU cost (full decode's per image over the loader's): on an idle machine, where every loader
        # here keeps its threads busy, it is the share in images/s, and other work moves it less.
        share = 1000 * ceiling["threads"] / ceiling["img_per_s"] / r["train"]["cpu_ms_per_img"]
        cells += [f"{share:.0%}", f"{r['peak_rss_mib']:.0f}"]
        print(f"{label:<26}" + "".join(f"{c:>12}" for c in cells))
    single = ", ".join(f"{k} {v:.1f}" for k, v in ceiling["single_core"].items())
    print(f"{'decode ceiling':<26}{ceiling['img_per_s']:>12.1f}   (single core: {single} img/s; "
          f"x {ceiling['threads']})")
    if report["repeats"] > 1:
        print(f"medians of {report['repeats']} rounds; 'vs pil': the median of each round's ratio to {REFERENCE}")
    print("CPU ms/img: the loader's process and its workers; 'vs pil' there is how many times cheaper")


def _write_json(path, figures: dict):
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="dataset root with train/ and val/")
    parser.add_argument("--make-photos", metavar="DIR", help="write the photograph set (bench.photos) to DIR and exit")
    parser.add_argument("--make-images", metavar="DIR", help="write generated ImageNet-like JPEGs to DIR and exit")
    parser.add_argument("--make-imagenet", metavar="DIR",
                        help="extract the real ImageNet samples (val/, train/ symlinked to it) to DIR and exit")
    parser.add_argument("--from", dest="source", metavar="TAR", default=str(SAMPLES_ARCHIVE),
                        help="--make-imagenet: the imagenet-samples archive (default: %(default)s)")
    parser.add_argument("--count", type=int, default=2000, help="train images to make (val gets a fifth)")
    parser.add_argument("--batches", type=int, default=20, help="batches measured per split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI threads / DataLoader workers")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--formats", nargs="+", default=["folder"], choices=list(FORMATS),
                        help="storage formats, each measured with every variant")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all runs, taken in turn (medians)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DataConfig overrides")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--screen", action="store_true", help="measure listing and screening the train files")
    parser.add_argument("--cold", action="store_true", help="--screen with the files' pages dropped from the cache")
    parser.add_argument("--stall", action="store_true",
                        help="DALI: wait for each epoch's and evaluation pass's first batch, fresh vs kept pipeline")
    parser.add_argument("--epochs", type=int, default=4, help="--stall: epochs and evaluation passes per side")
    parser.add_argument("--step-ms", type=float, default=0.0, help="--stall: training step stood for by a sleep")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the subprocess' own variant
    args = parser.parse_args(argv)
    if not (args.root or args.make_photos or args.make_images or args.make_imagenet):
        parser.error("--root (or --make-photos, --make-images, --make-imagenet) is required")
    return args


def loader_command(args: argparse.Namespace) -> int:

    if args.make_photos:
        stats = make_photos(args.make_photos, args.count)
        print(f"wrote {stats['train']} train and {stats['val']} val JPEGs of {stats['classes']} photographs under "
              f"{args.make_photos}: mean {stats['mean_width']:.0f}x{stats['mean_height']:.0f}, "
              f"{stats['mean_kib']:.1f} KiB, {stats['bytes_per_pixel']:.2f} bytes/pixel")
        return
    if args.make_images:
        make_images(args.make_images, args.count)
        print(f"wrote {args.count} train and {max(args.count // 5, CLASSES)} val JPEGs under {args.make_images}")
        return
    if args.make_imagenet:
        try:
            stats = extract_samples(args.source, args.make_imagenet)
        except (OSError, ValueError) as error:
            raise DataError(f"--from {args.source}: {error}") from None
        print(f"wrote {stats['val']} val JPEGs of {stats['classes']} classes ({stats['grayscale']} grayscale) and as "
              f"many train symlinks to them under {args.make_imagenet}: mean {stats['mean_width']:.0f}x"
              f"{stats['mean_height']:.0f}, {stats['mean_kib']:.1f} KiB, {stats['bytes_per_pixel']:.2f} bytes/pixel")
        return
    if args.variant:
        print(json.dumps(_measure(args)))
        return
    if args.stall:
        r = stall(args.root, args.batch_size, args.threads, args.epochs, args.step_ms / 1000, _overrides(args.set))
        _print_stall(r)
        _write_json(args.json, r)
        return
    if args.screen:
        r = screen_rate(args.root, args.cold)
        print(f"{r['files']} train files: listing {r['listing_files_per_s']:,.0f} files/s, screen "
              f"{r['screen_files_per_s']:,.0f} files/s ({1000 / r['screen_files_per_s'] * 1000:.1f} ms per 1000 files"
              f"{', file data not cached' if args.cold else ''}); {r['bad']} bad")
        return

    report = compare(args)
    print_report(report)
    _write_json(args.json, report)



def main(argv=None) -> int:
    return cli.run(parse_args, loader_command, argv)


if __name__ == "__main__":
    sys.exit(main())
