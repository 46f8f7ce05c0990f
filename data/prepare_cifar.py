"""Unpack the official CIFAR-10 or CIFAR-100 python archive into the ImageNet folder layout, as lossless PNGs.

    python -m data.prepare_cifar cifar-10-python.tar.gz --out OUT
    python -m data.prepare_cifar cifar-100-python.tar.gz --out OUT

Which of the two it is comes from the archive's members. OUT/train/<k>_<class>/<n>.png holds the training images
(50000) and OUT/val/<k>_<class>/<n>.png the official test set (10000), as ImageNet's val is its test set. Class
folders are numbered in the official label order (00_airplane ... 09_truck, 000_apple ... 099_worm, CIFAR-100's
fine labels), so the folder loader, which labels classes by sorted folder name, gives class k label k; <n> is the
image's index in the split's official array (train: data_batch_1 to 5 in turn).

The batches are pickles: they are read by an unpickler that builds numpy arrays and nothing else. Same archive,
same bytes. Each split is written under OUT/.partial/ and renamed into place once complete: a rerun (after kill -9
too) skips the finished splits and redoes the other. Then:

    python -m trainer.main --config configs/resnet_cifar10.yaml data.root=OUT
    python -m data.make_shards OUT --out DIR      (WebDataset shards, for data.format=webdataset)
"""
import argparse
import gzip
import io
import os
import pickle
import re
import shutil
import sys
import tarfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import cli
from common.errors import DataError, UserInputError

SPLITS = ("train", "val")
PARTIAL = ".partial"
SIDE = 32
# What a damaged archive raises while being read (not OSError as a whole: a full disk is not a corrupt archive).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# What a malformed pickle raises while being loaded (the refused globals raise DataError themselves).
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)
# numpy's array reconstruction, under the module name the official (numpy 1) files use and numpy 2's.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}
PNG_COMPRESS_LEVEL = 6
# Tests only: the run stops after the first image of this split, so that a test can kill it mid-split.
HANG_ENV = "PREPARE_CIFAR_TEST_HANG_IN"


@dataclass(frozen=True)
class Layout:
    name: str
    meta: str
    """The member holding the class names."""
    names_key: bytes
    labels_key: bytes
    batches: Dict[str, Tuple[str, ...]]
    """The members of each split, in the official order."""


CIFAR10 = Layout("CIFAR-10", "cifar-10-batches-py/batches.meta", b"label_names", b"labels",
                 {"train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                  "val": ("cifar-10-batches-py/test_batch",)})
CIFAR100 = Layout("CIFAR-100", "cifar-100-python/meta", b"fine_label_names", b"fine_labels",
                  {"train": ("cifar-100-python/train",), "val": ("cifar-100-python/test",)})
LAYOUTS = (CIFAR10, CIFAR100)


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        # encoding='bytes': the files were written by Python 2, whose str keys and raw pixel data load as bytes.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise DataError(f"{self.where}: refused to load the global {module}.{name}: a CIFAR batch needs only "
                            f"numpy arrays; this is not the official file")
        return super().find_class(*target)


def _unpickle(archive: Path, member: str, data: bytes) -> dict:
    where = f"{archive}: {member}"
    try:
        loaded = _ArrayUnpickler(data, where).load()
    except PICKLE_ERRORS as error:
        raise DataError(f"{where}: not a readable pickle ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, dict):
        raise DataError(f"{where}: holds a {type(loaded).__name__}, not the dict of a CIFAR batch")
    return loaded


def read_archive(archive: Path, splits: Tuple[str, ...]) -> Tuple[Layout, Dict[str, bytes]]:
    """Which CIFAR the archive holds, and the bytes of its meta member and of the batches of `splits`."""
    if not archive.is_file():
        raise UserInputError(f"{archive}: archive not found")
    wanted = {m for layout in LAYOUTS for m in (layout.meta, *(b for s in splits for b in layout.batches[s]))}
    found, last = {}, None
    try:
        # One pass through the gzip stream: the official archives list their batches in no useful order.
        with gzip.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                last = member.name
                if member.isfile() and member.name in wanted:
                    found[member.name] = tar.extractfile(member).read()
            last = None  # a failed CRC check says nothing about where the damage is
            while stream.read(1 << 20):  # gzip checks its CRC only at the end of the stream
                pass
    except ARCHIVE_ERRORS as error:
        where = f" in or after {last}" if last else ""
        raise DataError(f"{archive}: corrupt or truncated{where} ({error})") from error
    layouts = [layout for layout in LAYOUTS if layout.meta in found]
    if not layouts:
        raise DataError(f"{archive}: is neither cifar-10-python.tar.gz nor cifar-100-python.tar.gz (it has no "
                        f"{CIFAR10.meta} or {CIFAR100.meta})")
    layout = layouts[0]
    missing = [m for s in splits for m in layout.batches[s] if m not in found]
    if missing:
        raise DataError(f"{archive}: {layout.name} archive without {', '.join(missing)}")
    return layout, found


def class_folders(archive: Path, layout: Layout, meta: bytes) -> List[str]:
    """<k>_<name> for each class in label order, k zero-padded so that the names sort in that order."""
    where = f"{archive}: {layout.meta}"
    names = _unpickle(archive, layout.meta, meta).get(layout.names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{where}: has no list of class names under {layout.names_key!r}")
    width = len(str(len(names)))
    folders = []
    for k, name in enumerate(names):
        # A class name becomes a folder name: nothing that could leave OUT or need quoting.
        text = name.decode("ascii", errors="replace")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise DataError(f"{where}: class {k} is named {text!r}, not a plain folder name")
        folders.append(f"{k:0{width}d}_{text}")
    return folders


def _check_out(out: Path, folders: List[str], layout: Layout) -> None:
    """Refuses an OUT that holds anything but what this tool writes for this archive's classes."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (*SPLITS, PARTIAL))
    if foreign:
        raise DataError(f"{out}: is not empty and not data.prepare_cifar's output (it holds {foreign[0]}): "
                        f"choose a new or empty folder")
    for split in SPLITS:
        if (out / split).exists():
            listed = sorted(p.name for p in (out / split).iterdir()) if (out / split).is_dir() else None
            if listed != folders:
                raise DataError(f"{out / split}: does not hold the {len(folders)} {layout.name} class folders "
                                f"of this archive: choose a new or empty folder")


def batch_images(archive: Path, layout: Layout, member: str, data: bytes, classes: int):
    """The images (N x 32 x 32 x 3 uint8, RGB) and labels of one batch, checked against each other."""
    where = f"{archive}: {member}"
    batch = _unpickle(archive, member, data)
    pixels, labels = batch.get(b"data"), batch.get(layout.labels_key)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 \
            or pixels.shape[1] != 3 * SIDE * SIDE:
        seen = f"{pixels.shape} {pixels.dtype}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DataError(f"{where}: b'data' is {seen}, expected N x {3 * SIDE * SIDE} uint8")
    if not isinstance(labels, list) or len(labels) != len(pixels):
        count = len(labels) if isinstance(labels, list) else "no"
        raise DataError(f"{where}: {count} labels under {layout.labels_key!r} for {len(pixels)} images")
    bad = [label for label in labels if not isinstance(label, int) or not 0 <= label < classes]
    if bad:
        raise DataError(f"{where}: label {bad[0]!r} is not one of the {classes} classes")
    # Each row holds the R, G and B planes of a 32x32 image, row-major.
    return pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    # PIL's PNG carries no time or text chunks: the bytes depend on the pixels and the compression level only.
    Image.fromarray(image).save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def write_split(out: Path, split: str, archive: Path, layout: Layout, members: Dict[str, bytes],
                folders: List[str]) -> int:
    """Writes out/split from its batches under out/.partial, renamed into place once complete; returns how many."""
    partial = out / PARTIAL / split
    # Whatever an interrupted run left here is incomplete by construction: start the split over.
    shutil.rmtree(partial, ignore_errors=True)
    for folder in folders:
        (partial / folder).mkdir(parents=True)
    hang = os.environ.get(HANG_ENV) == split
    index = 0
    with tqdm(desc=f"{split} images", unit="img", disable=not sys.stderr.isatty()) as bar:
        for member in layout.batches[split]:
            images, labels = batch_images(archive, layout, member, members[member], len(folders))
            bar.total = (bar.total or 0) + len(images)
            for image, label in zip(images, labels):
                (partial / folders[label] / f"{index:05d}.png").write_bytes(png(image))
                index += 1
                bar.update()
                if hang:
                    threading.Event().wait()
    partial.rename(out / split)
    return index


def prepare_cifar(archive: Path, out: Path) -> Dict[str, int]:
    """Writes the splits missing under out; returns the images written per split by this run (0: already there)."""
    todo = tuple(split for split in SPLITS if not (out / split).is_dir())
    layout, members = read_archive(archive, todo)
    folders = class_folders(archive, layout, members[layout.meta])
    _check_out(out, folders, layout)
    out.mkdir(parents=True, exist_ok=True)
    done = {split: 0 for split in SPLITS}
    for split in todo:
        done[split] = write_split(out, split, archive, layout, members, folders)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return {"dataset": layout.name, **done}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.prepare_cifar", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("archive", type=Path, help="cifar-10-python.tar.gz or cifar-100-python.tar.gz, as downloaded")
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create (gets train/ and val/)")
    return parser.parse_args(argv)


def prepare_command(args: argparse.Namespace) -> int:
    done = prepare_cifar(args.archive, args.out)
    print(f"{args.out}: wrote {done['train']} train and {done['val']} val images of {done['dataset']} "
          f"(0 means already there)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, prepare_command, argv)


if __name__ == "__main__":
    sys.exit(main())
