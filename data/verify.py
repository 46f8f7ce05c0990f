"""Find the files of an ImageNet-layout dataset that are not decodable RGB JPEGs, and optionally fix them.

What counts as a problem is data/image_files.py's check_file, the check the loaders fall back on too.
"""
import argparse
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from PIL import Image
from tqdm import tqdm

from common import cli
from common.errors import UserInputError
from data.image_files import OK, UNFIXABLE, check_file

SPLITS = ("train", "val")
BACKUP_SUFFIX = ".orig"
FIXED_JPEG_QUALITY = 95


@dataclass(frozen=True)
class FileCheck:
    path: str
    """Relative to the dataset root, e.g. train/n01440764/n01440764_10026.JPEG."""
    kind: str
    """OK or one of the problem kinds of data/image_files.py."""
    detail: str = ""
    """What was seen: the real format, the colour mode, the decoder's message."""

    @property
    def fixable(self) -> bool:
        return self.kind not in UNFIXABLE and self.kind != OK


def _check(args: Tuple[Path, str]) -> FileCheck:
    root, relative = args
    return FileCheck(relative, *check_file(root / relative))


def dataset_files(root: Path) -> List[str]:
    """Every file under root/train and root/val except fix backups, relative to root, sorted."""
    files = []
    for split in SPLITS:
        for dirpath, _, names in os.walk(root / split):
            files += [os.path.relpath(os.path.join(dirpath, n), root) for n in names if not n.endswith(BACKUP_SUFFIX)]
    return sorted(files)


def scan(root: Path, workers: int) -> List[FileCheck]:
    """Check every dataset file under root in parallel; the result is in dataset_files order."""
    files = dataset_files(root)
    tasks = [(root, f) for f in files]
    bar = dict(total=len(files), desc=f"verify {root}", unit="file", disable=not sys.stderr.isatty())
    if workers <= 1:
        return [_check(t) for t in tqdm(tasks, **bar)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(_check, tasks, chunksize=64), **bar))


def fix_file(path: Path) -> None:
    """Re-encode a decodable file as an RGB JPEG in place (an RGB PNG where it is named .png: lossless stays
    lossless); the original is kept as path + BACKUP_SUFFIX."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    temporary = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".png":
        rgb.save(temporary, "PNG")
    else:
        rgb.save(temporary, "JPEG", quality=FIXED_JPEG_QUALITY)
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    # A backup from an earlier run is the true original: keep it.
    if not backup.exists():
        os.link(path, backup)
    os.replace(temporary, path)


def write_file_list(out: Path, checks: Iterable[FileCheck]) -> int:
    """Write the usable train files relative to root/train, one per line; returns how many."""
    prefix = "train" + os.sep
    good = [c.path[len(prefix):] for c in checks if c.path.startswith(prefix) and c.kind == OK]
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text("".join(f"{p}\n" for p in good))
    os.replace(temporary, out)
    return len(good)


def verify(root: Path, fix: bool, file_list: Optional[Path], workers: int) -> int:
    """Scan, report, optionally fix and write the list; returns the exit code (0: nothing left to act on)."""
    checks = scan(root, workers)
    problems = [c for c in checks if c.kind != OK]
    for check in problems:
        print(f"{check.kind}\t{check.path}" + (f"\t{check.detail}" if check.detail else ""))
    fixed = 0
    if fix:
        for check in problems:
            if check.fixable:
                fix_file(root / check.path)
                fixed += 1
        checks = [FileCheck(c.path, OK) if c.fixable else c for c in checks]
    if file_list is not None:
        listed = write_file_list(file_list, checks)
        print(f"wrote {listed} train files to {file_list}")
    # Unfixable train files are harmless once left out of the list; unfixable val files and unfixed ones are not.
    left_out = file_list is not None
    remaining = [c for c in checks if c.kind != OK and not (left_out and c.path.startswith("train" + os.sep))]
    print(f"checked {len(checks)} files: {len(problems)} problems, {fixed} fixed, {len(remaining)} left to act on")
    return 1 if remaining else 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.verify", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="dataset root holding train/ and val/")
    parser.add_argument("--fix", action="store_true",
                        help=f"re-encode PNG, CMYK and grayscale files as RGB JPEG (backup: <file>{BACKUP_SUFFIX})")
    parser.add_argument("--file-list", type=Path, help="write the usable train files here, relative to ROOT/train")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="checking processes")
    return parser.parse_args(argv)


def verify_command(args: argparse.Namespace) -> int:
    if not any((args.root / split).is_dir() for split in SPLITS):
        raise UserInputError(f"{args.root}: has neither train/ nor val/")
    return verify(args.root, args.fix, args.file_list, args.workers)


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, verify_command, argv)


if __name__ == "__main__":
    sys.exit(main())
