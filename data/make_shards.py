"""Write an ImageNet-layout dataset as WebDataset tar shards with DALI indexes, for data.format=webdataset.

    python -m data.make_shards ROOT --out DIR [--shard-size 1GB] [--seed 0] [--workers N] [--file-list FILE]
    python -m data.make_shards --verify DIR

Shared file systems (Lustre, GPFS, NFS) and object stores serve a few large files far better than 1.28 M small
ones. ROOT is listed as the folder loader lists it (ROOT/{train,val}/<class>/*.JPEG, classes sorted, the label a
class's index), and every image gets data.verify's full check: JPEGs (RGB, CMYK, grayscale) and PNGs go in, as
<key>.jpg or <key>.png beside <key>.cls (the label as an ASCII integer); any other file is skipped, named on stderr
and listed in the manifest. The key is the file's path under its split folder without the suffix
(n01440764/n01440764_10026; dots and blanks in it become _).

Train samples are shuffled once, across all train shards, with --seed, so that a shard is not one class; val keeps
the folder order. Shards (DIR/train-000000.tar ..., DIR/val-000000.tar ...) are filled to about --shard-size, each
with its DALI index (.idx, what DALI's wds2idx writes). DIR/manifest.json records the format version, the classes,
the samples per split and per shard, every file's size and sha256, the source and the tool version.

Same input, same bytes: tar headers carry no time, owner or mode of the source files. Run again after an
interruption (kill -9 included), the same command goes on where it stopped: a shard is written under a temporary
name, fsynced and renamed, and only then recorded in the manifest; DIR/make_shards.plan.json keeps the checked file
list and which shard each file goes to, so the images are not checked again. The result is byte-identical to an
uninterrupted run. On a finished DIR it rewrites the shards that are missing or of the wrong size, and otherwise does
nothing. --verify compares the sha256 of every shard and index with the manifest (the loader checks at start-up
only the sizes, the indexes and two tar headers per shard).
"""
import argparse
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

import numpy as np
from tqdm import tqdm

from common import cli
from common.errors import DataError, UserInputError
from data.folder import list_split
from data.image_files import CMYK, GRAYSCALE, NOT_JPEG, OK, check_file
from data.make_demo_dataset import DemoParams, make_demo_dataset
from data.shard_format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_VERSION,
    LABEL_EXT,
    MANIFEST,
    SPLITS,
    index_line,
    shard_name,
    verify_shards,
)

# Bump when the same input would give other bytes.
TOOL_VERSION = 1
PLAN = "make_shards.plan.json"
LOCK = ".make_shards.lock"
DEFAULT_SHARD_SIZE = 10**9
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
# Tests only: the worker writing this shard stops after its first sample, so that a test can kill the run mid-shard.
HANG_ENV = "MAKE_SHARDS_TEST_HANG_IN"


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KB', '4096B' (decimal units) or a plain number of MB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?b)?\s*", text.lower())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1GB, 500MB, 64KB or 4096B")
    return int(match[1]) * SIZE_UNITS[match[2] or "mb"]


def sample_key(relative: str) -> str:
    """The tar key of the file at `relative` (class/name) under its split folder: DALI takes a member's extension from
    the first dot of its last path part and its index splits on blanks, so those become _."""
    folder, _, name = relative.rpartition("/")
    stem = re.sub(r"[.\s]", "_", os.path.splitext(name)[0])
    return re.sub(r"\s", "_", f"{folder}/{stem}" if folder else stem)


def _tar_bytes(size: int) -> int:
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _image_extension(kind: str, detail: str) -> Optional[str]:
    """What the loader's decoders read to RGB (image_files.SIGNATURES): JPEGs of any colour model and PNGs."""
    if kind in (OK, CMYK, GRAYSCALE):
        return "jpg"
    if kind == NOT_JPEG and detail.startswith("PNG"):
        return "png"
    return None


def _check(path: str) -> tuple:
    return (*check_file(Path(path)), os.path.getsize(path) if os.path.isfile(path) else 0)


def _map(function: Callable, items: list, workers: int, what: str, unordered: bool = False) -> Iterator:
    bar = dict(total=len(items), desc=what, disable=not sys.stderr.isatty())
    if workers <= 1 or len(items) <= 1:
        yield from tqdm(map(function, items), **bar)
        return
    # spawn, not fork: the trainer calls this (the demo's shards) from a process whose other threads may hold a lock
    # that a forked child would wait on forever.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        imap = pool.imap_unordered if unordered else pool.imap
        yield from tqdm(imap(function, items, chunksize=1 if unordered else 64), **bar)


def _fill_shards(samples: list, shard_size: int) -> List[list]:
    """Consecutive samples into shards of at most shard_size tar bytes (a larger sample gets a shard of its own)."""
    shards, current, filled = [], [], 0
    for sample in samples:
        size = _tar_bytes(sample[3]) + _tar_bytes(len(str(sample[1])))
        if current and filled + size > shard_size:
            shards.append(current)
            current, filled = [], 0
        current.append(sample)
        filled += size
    return shards + [current] if current else shards


def _check_keys(split: str, samples: list):
    seen = {}
    for relative, _, ext, _ in samples:
        key = sample_key(relative)
        if key in seen:
            raise DataError(f"{split}/{seen[key]} and {split}/{relative} both become the key {key!r}: rename one")
        seen[key] = relative
        try:
            tarfile.TarInfo(f"{key}.{ext}").tobuf(format=tarfile.USTAR_FORMAT)
        except ValueError as error:
            raise DataError(f"{split}/{relative}: its name cannot be a tar member name ({error})") from None


def _listing(params: dict) -> dict:
    return {split: list_split(params["source"], split, params["file_list"]) for split in SPLITS}


def _plan(params: dict, workers: int) -> dict:
    """Checks every listed image and decides the shards: which samples, in which order."""
    listings = _listing(params)
    paths = [os.path.join(listings[s].split_dir, f) for s in SPLITS for f in listings[s].files]
    checks = iter(list(_map(_check, paths, workers, "check images")))
    plan = {"params": params, "classes": listings["train"].classes, "splits": {}}
    for split in SPLITS:
        samples, skipped = [], []
        for relative, label in zip(listings[split].files, listings[split].labels):
            kind, detail, size = next(checks)
            ext = _image_extension(kind, detail)
            if ext is None:
                skipped.append({"path": f"{split}/{relative}", "kind": kind, "detail": detail})
            else:
                samples.append([relative, label, ext, size])
        if not samples:
            raise DataError(f"{listings[split].split_dir}: none of its {len(skipped)} images can be used")
        _check_keys(split, samples)
        if split == "train":
            samples = [samples[i] for i in np.random.default_rng(params["seed"]).permutation(len(samples))]
        plan["splits"][split] = {"shards": _fill_shards(samples, params["shard_size"]), "skipped": skipped}
    return plan


def _write_atomically(path: Path, text: str):
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A file that hashes what is written to it, so that a shard is not read back for its sha256."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple:
    # TarInfo's defaults are mtime 0, mode 0644, uid/gid 0 and no user names: nothing of the source file's metadata.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    header = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return name.rsplit(".", 1)[1], header + tarfile.BLOCKSIZE, len(data), name


def write_shard(out: Path, name: str, samples: Iterable, hang: bool = False) -> dict:
    """Writes out/name.tar and its index out/name.idx from (key, [(ext, bytes), ...]) samples, under temporary names
    renamed once fsynced; returns the shard's manifest entry."""
    temporaries = [out / f".{name}{ext}.tmp" for ext in (".tar", ".idx")]
    lines = []
    with open(temporaries[0], "wb") as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                lines.append(index_line([_add_member(tar, f"{key}.{ext}", data) for ext, data in members]))
                if hang:
                    f.flush()
                    threading.Event().wait()
        f.flush()
        os.fsync(f.fileno())
    index = f"{INDEX_VERSION} {len(lines)}\n{''.join(lines)}".encode()
    with open(temporaries[1], "wb") as f:
        f.write(index)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporaries[1], out / f"{name}.idx")
    os.replace(temporaries[0], out / f"{name}.tar")
    _fsync_dir(out)
    return {"name": name, "samples": len(lines), "tar_bytes": writer.size, "tar_sha256": writer.sha256.hexdigest(),
            "index_bytes": len(index), "index_sha256": hashlib.sha256(index).hexdigest()}


def _read_samples(split_dir: str, samples: list) -> Iterator:
    for relative, label, ext, size in samples:
        path = os.path.join(split_dir, relative)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != size:
            raise DataError(f"{path} is {len(data)} bytes, {size} when make_shards checked it: the source changed "
                            f"during the run; remove the output directory and start again")
        yield sample_key(relative), [(ext, data), (LABEL_EXT, str(label).encode())]


def _write_planned(task: tuple) -> dict:
    out, split, split_dir, number, samples = task
    name = shard_name(split, number)
    return write_shard(Path(out), name, _read_samples(split_dir, samples), os.environ.get(HANG_ENV) == name)


def _intact(out: Path, shard: dict) -> bool:
    return all((out / f"{shard['name']}{ext}").is_file() and (out / f"{shard['name']}{ext}").stat().st_size == size
               for ext, size in ((".tar", shard["tar_bytes"]), (".idx", shard["index_bytes"])))


def _load_plan(out: Path, params: dict) -> Optional[dict]:
    path = out / PLAN
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if plan["params"] != params:
        differ = ", ".join(f"{k}={plan['params'].get(k)!r} (now {v!r})" for k, v in params.items()
                           if plan["params"].get(k) != v)
        raise DataError(f"{out} holds shards made with {differ}: rerun with the same arguments, or write to another "
                        f"--out")
    listings = _listing(params)
    for split in SPLITS:
        now = set(listings[split].files)
        planned = {s[0] for shard in plan["splits"][split]["shards"] for s in shard}
        planned |= {s["path"].split("/", 1)[1] for s in plan["splits"][split]["skipped"]}
        if now != planned:
            changed = sorted(now ^ planned)
            raise DataError(f"{listings[split].split_dir} has changed since {out} was planned ({len(changed)} files "
                            f"added or removed, e.g. {changed[:3]}): remove {out} and start again")
    return plan


def _manifest(plan: dict, finished: List[dict]) -> dict:
    params = plan["params"]
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tool": "data.make_shards",
                "tool_version": TOOL_VERSION, "complete": False, "source": params["source"],
                "file_list": params["file_list"], "seed": params["seed"], "shard_size": params["shard_size"],
                "classes": plan["classes"], "splits": {}}
    for split in SPLITS:
        planned = plan["splits"][split]
        names = {shard_name(split, n) for n in range(len(planned["shards"]))}
        manifest["splits"][split] = {
            "samples": sum(len(shard) for shard in planned["shards"]), "skipped": planned["skipped"],
            "shards": sorted((s for s in finished if s["name"] in names), key=lambda s: s["name"])}
    manifest["complete"] = all(len(manifest["splits"][s]["shards"]) == len(plan["splits"][s]["shards"])
                               for s in SPLITS)
    return manifest


def make_shards(root, out, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, workers: int = 1,
                file_list=None) -> dict:
    """Writes (or completes, or repairs) the shards of `root` in `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"source": str(Path(root).resolve()), "file_list": str(Path(file_list).resolve()) if file_list else None,
              "seed": seed, "shard_size": shard_size, "tool_version": TOOL_VERSION}
    with open(out / LOCK, "a") as lock:
        # One writer per directory; a second one waits, then finds the work done.
        fcntl.flock(lock, fcntl.LOCK_EX)
        plan = _load_plan(out, params)
        if plan is None:
            plan = _plan(params, workers)
            _write_atomically(out / PLAN, json.dumps(plan))
        for split in SPLITS:
            for skipped in plan["splits"][split]["skipped"]:
                print(f"skipped {skipped['kind']}: {skipped['path']}" +
                      (f" ({skipped['detail']})" if skipped["detail"] else ""), file=sys.stderr)
        finished, recorded = [], None
        if (out / MANIFEST).is_file():
            recorded = json.loads((out / MANIFEST).read_text())
            finished = [s for split in recorded["splits"].values() for s in split["shards"] if _intact(out, s)]
        manifest = _manifest(plan, finished)
        if manifest != recorded:  # a finished directory stays untouched
            _write_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        done = {s["name"] for s in finished}
        tasks = [(str(out), split, str(Path(params["source"]) / split), number, samples)
                 for split in SPLITS for number, samples in enumerate(plan["splits"][split]["shards"])
                 if shard_name(split, number) not in done]
        for shard in _map(_write_planned, tasks, workers, "write shards", unordered=True):
            finished.append(shard)
            manifest = _manifest(plan, finished)
            _write_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def ensure_demo_shards(out, params: Optional[DemoParams] = None) -> Path:
    """The demo dataset (DemoParams() by default), generated into out/source if needed, written as shards into out
    (data.demo=true with data.format=webdataset)."""
    out = Path(out)
    make_demo_dataset(out / "source", params or DemoParams())
    complete = (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("complete")
    manifest = make_shards(out / "source", out, workers=2)
    if not complete:
        shards = sum(len(s["shards"]) for s in manifest["splits"].values())
        print(f"made the demo shards in {out.resolve()}: {shards} shards", flush=True)
    return out


def _summary(manifest: dict, out) -> str:
    parts = [f"{split} {entry['samples']} samples in {len(entry['shards'])} shards"
             + (f" ({len(entry['skipped'])} files skipped, named above)" if entry["skipped"] else "")
             for split, entry in manifest["splits"].items()]
    return f"{out}: " + ", ".join(parts) + f"; {MANIFEST} lists them"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("root", nargs="?", type=Path, help="dataset root holding train/ and val/")
    parser.add_argument("--out", type=Path, help="shard directory to write (data.root for data.format=webdataset)")
    parser.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                        help="bytes of a shard, about: 1GB (default), 500MB, 64KB, 4096B; a plain number is MB")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train samples' one shuffle")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes checking images and writing shards")
    parser.add_argument("--file-list", type=Path, help="only these train files (data.verify --file-list's output)")
    parser.add_argument("--verify", type=Path, metavar="DIR", help="compare DIR's shards with its manifest, byte "
                                                                   "for byte (sha256), instead of writing")
    args = parser.parse_args(argv)
    if args.verify is not None and (args.root or args.out):
        parser.error("--verify DIR takes no ROOT or --out")
    if args.verify is None and (args.root is None or args.out is None):
        parser.error("ROOT and --out are required (or --verify DIR)")
    return args


def make_shards_command(args: argparse.Namespace) -> int:
    if args.verify is not None:
        problems = verify_shards(args.verify)
        for problem in problems:
            print(problem)
        print(f"{args.verify}: " + (f"{len(problems)} files differ from {MANIFEST}; rerun make_shards on the source "
                                    f"to rewrite them" if problems else f"every shard matches {MANIFEST}"))
        return 1 if problems else 0
    if not args.root.is_dir():
        raise UserInputError(f"ROOT {args.root}: no such directory")
    manifest = make_shards(args.root, args.out, args.shard_size, args.seed, args.workers, args.file_list)
    print(_summary(manifest, args.out))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, make_shards_command, argv)


if __name__ == "__main__":
    sys.exit(main())
