"""The ImageNet folder layout: root/{train,val}/<wnid>/*.JPEG -> class names, file lists and labels. Lossless
small-image sets (data.prepare_cifar's) come as .png files in the same layout."""
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from common.errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageList:
    split_dir: str
    """The split folder the relative paths in `files` start from."""
    classes: List[str]
    """Class folder names, sorted: the index is the label (as torchvision's ImageFolder)."""
    files: List[str]
    """Image paths relative to split_dir, sorted by class then name."""
    labels: List[int]
    """The class index of each file."""

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> List[str]:
        return [os.path.join(self.split_dir, f) for f in self.files]


def _class_folders(split_dir: str) -> List[str]:
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop: listed, so that the loader's screen names it instead of the listing failing
        return True


def _images(class_dir: str) -> List[str]:
    with os.scandir(class_dir) as entries:
        return sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and _is_file(e))


def _read_file_list(path: str) -> List[str]:
    """Entries are relative to the train folder; a leading 'train/' (relative to the root) is accepted too."""
    if not os.path.isfile(path):
        raise DataError(f"data.file_list: {path} does not exist")
    with open(path) as f:
        entries = [line.strip() for line in f if line.strip()]
    return [e[len("train/"):] if e.startswith("train/") else e for e in entries]


def list_split(root: str, split: str, file_list: Optional[str] = None) -> ImageList:
    """Lists one split; `file_list` (train only) keeps just the files it names, e.g. those data.verify passed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir} does not exist: expected {root}/{split}/<class>/*.JPEG")
    classes = _class_folders(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir}/<class>/*.JPEG")

    other_dir = os.path.join(root, SPLITS[1 - SPLITS.index(split)])
    if os.path.isdir(other_dir):
        other = _class_folders(other_dir)
        if other != classes:
            only_here = sorted(set(classes) - set(other))[:5]
            only_there = sorted(set(other) - set(classes))[:5]
            raise DataError(
                f"class folders differ between {split_dir} ({len(classes)}) and {other_dir} ({len(other)}): "
                f"only in {split}: {only_here}, only in the other: {only_there}"
            )

    files, labels = [], []
    for label, name in enumerate(classes):
        images = _images(os.path.join(split_dir, name))
        if not images:
            raise DataError(f"{os.path.join(split_dir, name)} holds no .JPEG/.jpg/.jpeg/.png images")
        files.extend(f"{name}/{image}" for image in images)
        labels.extend([label] * len(images))

    if file_list is not None and split == "train":
        keep = _read_file_list(file_list)
        index = {f: i for i, f in enumerate(files)}
        unknown = [e for e in keep if e not in index]
        if unknown:
            raise DataError(
                f"data.file_list {file_list}: {len(unknown)} entries are not images under {split_dir}, "
                f"e.g. {unknown[:3]}"
            )
        chosen = sorted(set(index[e] for e in keep))
        if not chosen:
            raise DataError(f"data.file_list {file_list} names no images")
        files = [files[i] for i in chosen]
        labels = [labels[i] for i in chosen]
    return ImageList(split_dir=split_dir, classes=classes, files=files, labels=labels)


def layout_root(path: Path, scratch: Path) -> Path:
    """The first folder at or under `path` with train/ and val/; a tar `path` is extracted to `scratch` first (once:
    into scratch.partial, renamed when complete, so a rerun reuses it). For datasets handed over as an archive,
    such as ../shared/datasets/cifar10-jpeg.tar."""
    if path.is_file():
        if not scratch.is_dir():
            partial = scratch.with_name(scratch.name + ".partial")
            with tarfile.open(path) as archive:
                archive.extractall(partial, filter="data")
            partial.rename(scratch)
        path = scratch
    found = sorted(p.parent for p in path.glob("**/train") if (p.parent / "val").is_dir())
    if not found:
        raise DataError(f"{path} holds no folder with train/ and val/ (the ImageNet layout)")
    return found[0]
