"""ImageNet-like JPEGs for the benchmarks and the GPU check, in the folder layout: `make_images` generates them,
`extract_samples` takes the real ImageNet samples of ../shared/datasets/ (test and benchmark data, never needed to
install or run the project)."""
import os
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

CLASSES = 10
ROOT = Path(__file__).resolve().parents[1]
SAMPLES_ARCHIVE = Path(os.environ.get("SHARED_DATASETS", ROOT.parent / "shared" / "datasets")) / "imagenet-samples.tar"
"""One real ImageNet val JPEG per class, 1000 in all, as imagenet-samples/val/<wnid>/*.JPEG (its README says more);
$SHARED_DATASETS moves the folder, as for the tests."""
SAMPLES_TOP = "imagenet-samples/"


def make_images(root: str, count: int, seed: int = 0):
    """`count` train and count // 5 val JPEGs in 10 classes: smooth colour fields plus noise, 500x375 or 375x500."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(count // 5, CLASSES))):
        for i in range(n):
            folder = os.path.join(root, split, f"n{i % CLASSES:08d}")
            os.makedirs(folder, exist_ok=True)
            size = (500, 375) if rng.random() < 0.75 else (375, 500)
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (size[1], size[0], 3)).astype(np.int16)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"img{i:06d}.JPEG"), quality=90)


def link_train_to_val(root) -> int:
    """Gives root a train/ of relative symlinks, train/<class>/<file> -> ../../val/<class>/<file>, one for every val
    file; returns how many. The samples hold only val/, one image a class: too few to train on, but the train
    paths (random crops, the shuffle, the screen) then read the same real files."""
    root, count = Path(root), 0
    for class_dir in sorted((root / "val").iterdir()):
        (root / "train" / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir()):
            link = root / "train" / class_dir.name / image.name
            if not link.is_symlink():
                link.symlink_to(Path("..", "..", "val", class_dir.name, image.name))
            count += 1
    return count


def _chosen_members(archive: Path, tar: tarfile.TarFile, classes: Optional[int]) -> list:
    """The archive's val files, of every class or of `classes` spread evenly over the sorted wnids, renamed to
    val/<wnid>/<file>."""
    members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(SAMPLES_TOP + "val/")]
    wnids = sorted({m.name.split("/")[2] for m in members})
    if not wnids:
        raise ValueError(f"{archive} holds no {SAMPLES_TOP}val/<wnid>/ files: not the imagenet-samples archive")
    if classes is not None and classes < len(wnids):
        wnids = [wnids[i * len(wnids) // classes] for i in range(classes)]
    keep = set(wnids)
    chosen = [m for m in members if m.name.split("/")[2] in keep]
    for member in chosen:
        member.name = member.name[len(SAMPLES_TOP):]
    return chosen


def extract_samples(archive, root, classes: Optional[int] = None) -> dict:
    """Extracts the samples' val/ into root/val (every class, or `classes` of them) and links train/ to the same
    files (link_train_to_val); returns the set's statistics, read from the JPEG headers."""
    from PIL import Image

    archive, root = Path(archive), Path(root)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive (the real ImageNet samples live in ../shared/datasets/ "
                                f"beside the checkout, or $SHARED_DATASETS)")
    try:
        with tarfile.open(archive) as tar:
            members = _chosen_members(archive, tar, classes)
            tar.extractall(root, members=members, filter="data")
    except tarfile.TarError as error:  # its message names no file
        raise ValueError(f"{archive}: {error}") from error
    train = link_train_to_val(root)
    sizes, grayscale, file_bytes = [], 0, 0
    for member in members:
        with Image.open(root / member.name) as image:
            sizes.append(image.size)
            grayscale += image.mode == "L"
        file_bytes += member.size
    widths, heights = np.array(sizes).T
    return {"train": train, "val": len(members), "classes": len({m.name.split("/")[1] for m in members}),
            "grayscale": grayscale, "mean_width": float(widths.mean()), "mean_height": float(heights.mean()),
            "portrait": float(np.mean(heights > widths)), "mean_kib": file_bytes / len(members) / 1024,
            "bytes_per_pixel": file_bytes / float(np.sum(widths * heights))}
