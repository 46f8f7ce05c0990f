"""Unpack the official ILSVRC2012 archives into OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG.

Reads straight from the tars (no full extraction to a scratch copy). Each train class, and the val split as a whole,
is written under OUT/.partial/ and renamed into place once complete, so the final folder's existence is the
completion marker: a rerun skips what is done and redoes what an interruption cut short.
"""
import argparse
import gzip
import io
import re
import shutil
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from tqdm import tqdm

from common import cli
from common.errors import DataError, UserInputError

META_MAT = "data/meta.mat"
VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
PARTIAL = ".partial"
# What a damaged archive raises while being read (not OSError as a whole: a full disk is not a corrupt archive).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class Devkit:
    wnids: List[str]
    """The 1000 leaf classes, in ILSVRC2012_ID order."""
    val_wnids: List[str]
    """The class of each validation image: val_wnids[k - 1] for ILSVRC2012_val_<k>.JPEG."""


def _devkit_member(archive: tarfile.TarFile, devkit: Path, suffix: str) -> bytes:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return archive.extractfile(member).read()
    raise DataError(f"{devkit}: has no {suffix}; is it ILSVRC2012_devkit_t12.tar.gz?")


def read_devkit(devkit: Path) -> Devkit:
    """The leaf classes and validation labels from ILSVRC2012_devkit_t12.tar.gz."""
    # Imported here: only this tool needs scipy, not the loaders or the trainer.
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    _require_file(devkit)
    try:
        with tarfile.open(devkit, "r:*") as archive:
            meta = _devkit_member(archive, devkit, META_MAT)
            ground_truth = _devkit_member(archive, devkit, VAL_GROUND_TRUTH)
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    except (KeyError, ValueError, MatReadError) + ARCHIVE_ERRORS as error:
        raise DataError(f"{devkit}: unreadable ({error})") from error
    # meta.mat lists all 1860 synsets of the hierarchy; the 1000 classes are its leaves.
    leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0)
    wnid_of_id = dict(leaves)
    try:
        val_wnids = [wnid_of_id[int(line)] for line in ground_truth.decode().split()]
    except (KeyError, ValueError) as error:
        raise DataError(f"{devkit}: {VAL_GROUND_TRUTH} holds an ID that is not a leaf class: {error}") from error
    return Devkit([wnid for _, wnid in leaves], val_wnids)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise UserInputError(f"{path}: archive not found")


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, folder: Path) -> None:
    # Flatten to the base name: a member path must never write outside the class folder.
    (folder / Path(member.name).name).write_bytes(archive.extractfile(member).read())


def _fresh_partial(partial: Path) -> Path:
    # Whatever an interrupted run left here is incomplete by construction: start the unit over.
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def prepare_train(train_tar: Path, out: Path, wnids: List[str]) -> int:
    """Unpack the classes not yet under out/train; returns how many were unpacked."""
    todo = [w for w in wnids if not (out / "train" / w).is_dir()]
    if not todo:
        return 0
    _require_file(train_tar)
    (out / "train").mkdir(parents=True, exist_ok=True)
    expected = set(wnids)
    try:
        # Random access to the outer tar: done classes are skipped without reading their bytes.
        with tarfile.open(train_tar, "r:") as outer:
            members = {Path(m.name).name.removesuffix(".tar"): m for m in outer.getmembers() if m.isfile()}
            missing = sorted(set(todo) - members.keys())
            if missing:
                raise DataError(f"{train_tar}: lacks the class archives of {len(missing)} classes, "
                                f"e.g. {missing[0]}.tar")
            for wnid in tqdm(todo, desc="train classes", unit="class", disable=not sys.stderr.isatty()):
                partial = _fresh_partial(out / PARTIAL / "train" / wnid)
                with tarfile.open(fileobj=outer.extractfile(members[wnid]), mode="r|") as inner:
                    for member in inner:
                        if member.isfile():
                            _write_member(inner, member, partial)
                partial.rename(out / "train" / wnid)
    except ARCHIVE_ERRORS as error:
        raise DataError(f"{train_tar}: corrupt or truncated ({error})") from error
    unexpected = sorted(p.name for p in (out / "train").iterdir() if p.name not in expected)
    if unexpected:
        raise DataError(f"{out / 'train'}: holds folders that are not devkit classes, e.g. {unexpected[0]}")
    return len(todo)


def prepare_val(val_tar: Path, out: Path, devkit: Devkit) -> int:
    """Unpack the validation images into per-class folders unless out/val exists; returns how many."""
    if (out / "val").is_dir():
        return 0
    _require_file(val_tar)
    partial = _fresh_partial(out / PARTIAL / "val")
    for wnid in devkit.wnids:
        (partial / wnid).mkdir()
    written = 0
    try:
        with tarfile.open(val_tar, "r|") as archive:
            bar = tqdm(total=len(devkit.val_wnids), desc="val images", unit="img", disable=not sys.stderr.isatty())
            for member in archive:
                if not member.isfile():
                    continue
                match = VAL_NAME.fullmatch(Path(member.name).name)
                if match is None or not 1 <= int(match[1]) <= len(devkit.val_wnids):
                    raise DataError(f"{val_tar}: unexpected member {member.name}")
                _write_member(archive, member, partial / devkit.val_wnids[int(match[1]) - 1])
                written += 1
                bar.update()
            bar.close()
    except ARCHIVE_ERRORS as error:
        raise DataError(f"{val_tar}: corrupt or truncated ({error})") from error
    if written != len(devkit.val_wnids):
        raise DataError(f"{val_tar}: holds {written} images, the devkit's ground truth labels "
                        f"{len(devkit.val_wnids)}")
    partial.rename(out / "val")
    return written


def prepare_imagenet(train_tar: Path, val_tar: Path, devkit: Path, out: Path) -> Dict[str, int]:
    """Unpack what is missing under out; returns the classes and val images written by this run."""
    kit = read_devkit(devkit)
    out.mkdir(parents=True, exist_ok=True)
    classes = prepare_train(train_tar, out, kit.wnids)
    images = prepare_val(val_tar, out, kit)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return {"train_classes": classes, "val_images": images}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.prepare_imagenet", description=__doc__.split("\n")[0])
    parser.add_argument("--train-tar", required=True, type=Path, help="ILSVRC2012_img_train.tar")
    parser.add_argument("--val-tar", required=True, type=Path, help="ILSVRC2012_img_val.tar")
    parser.add_argument("--devkit", required=True, type=Path, help="ILSVRC2012_devkit_t12.tar.gz")
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create (gets train/ and val/)")
    return parser.parse_args(argv)


def prepare_command(args: argparse.Namespace) -> int:
    done = prepare_imagenet(args.train_tar, args.val_tar, args.devkit, args.out)
    print(f"{args.out}: unpacked {done['train_classes']} train classes and {done['val_images']} val images "
          f"(0 means already there)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, prepare_command, argv)


if __name__ == "__main__":
    sys.exit(main())
