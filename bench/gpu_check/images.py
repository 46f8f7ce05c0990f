"""Part images: the real ImageNet samples of ../shared/datasets/ where the archive is there, else ImageNet-like JPEGs
generated in parallel (bench.images), hard-linked into a split big enough for every measurement; and the small demo
dataset of the fp16/bf16 parts."""
import math
import os
import shutil
from multiprocessing import Pool
from pathlib import Path

from bench.gpu_check.context import Context, Passed
from bench.images import SAMPLES_ARCHIVE, extract_samples, make_images
from data.make_demo_dataset import make_demo_dataset


def _link_tree(source: Path, target: Path, prefix: str, copies: int) -> int:
    """Hard-links every JPEG of source/<class>/ into target/<class>/ `copies` times under distinct names; for a
    symlink, the file it points at."""
    count = 0
    for class_dir in sorted(source.iterdir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir()):
            image = image.resolve()  # os.link would link a relative symlink itself, which breaks in another folder
            for copy in range(copies):
                link = target / class_dir.name / f"{prefix}c{copy}_{image.name}"
                try:
                    os.link(image, link)
                except OSError:  # a file system without hard links: the copies cost disk space, nothing else
                    shutil.copyfile(image, link)
                count += 1
    return count


def _real_samples(ctx: Context) -> dict:
    """The archive's images of `unique_images` classes (all 1000 on a GPU): one file a class, val and train alike."""
    s = ctx.sizes
    source = ctx.work / "imagenet-samples"
    stats = extract_samples(SAMPLES_ARCHIVE, source, classes=s.unique_images)
    return {"train_images": _link_tree(source / "train", ctx.images / "train", "", s.copies),
            "unique_train_images": stats["train"], "val_images": _link_tree(source / "val", ctx.images / "val", "", 1),
            "source": "imagenet-samples", "archive": str(SAMPLES_ARCHIVE), "classes": stats["classes"],
            "grayscale": stats["grayscale"], "mean_size": f"{stats['mean_width']:.0f}x{stats['mean_height']:.0f}"}


def _generated(ctx: Context, workers: int) -> dict:
    s = ctx.sizes
    per_worker = math.ceil(s.unique_images / workers)
    generated = ctx.work / "generated"
    with Pool(workers) as pool:
        pool.starmap(make_images, [(str(generated / f"w{k}"), per_worker, k) for k in range(workers)])
    train = val = 0
    for k in range(workers):
        train += _link_tree(generated / f"w{k}" / "train", ctx.images / "train", f"w{k}", s.copies)
        val += _link_tree(generated / f"w{k}" / "val", ctx.images / "val", f"w{k}", 1)
    return {"train_images": train, "unique_train_images": workers * per_worker, "val_images": val,
            "source": "generated", "generator": "bench.images.make_images (about 500x375, quality 90)",
            "processes": workers}


def check_images(ctx: Context) -> Passed:
    s = ctx.sizes
    workers = max(1, min(8, s.threads))
    if SAMPLES_ARCHIVE.is_file():
        figures = _real_samples(ctx)
        what = (f"real ImageNet, {figures['classes']} classes ({figures['grayscale']} grayscale) from "
                f"{SAMPLES_ARCHIVE.name}")
    else:
        figures = _generated(ctx, workers)
        what = f"generated (bench.images; no {SAMPLES_ARCHIVE})"
    make_demo_dataset(ctx.demo, s.demo, workers=workers)
    figures["demo_dataset"] = {"classes": s.demo.classes, "train": s.demo.classes * s.demo.train_per_class}
    return Passed(f"{figures['train_images']} train / {figures['val_images']} val JPEGs: {what}", figures)
