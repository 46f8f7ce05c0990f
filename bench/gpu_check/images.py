"""Part images: ImageNet-like JPEGs (bench.images), generated in parallel and hard-linked into a split big enough
for every measurement, and the small demo dataset of the fp16/bf16 parts."""
import math
import os
import shutil
from multiprocessing import Pool
from pathlib import Path

from bench.gpu_check.context import Context, Passed
from bench.images import make_images
from data.make_demo_dataset import make_demo_dataset


def _link_tree(source: Path, target: Path, prefix: str, copies: int) -> int:
    """Hard-links every JPEG of source/<class>/ into target/<class>/ `copies` times under distinct names."""
    count = 0
    for class_dir in sorted(source.iterdir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir()):
            for copy in range(copies):
                link = target / class_dir.name / f"{prefix}c{copy}_{image.name}"
                try:
                    os.link(image, link)
                except OSError:  # a file system without hard links: the copies cost disk space, nothing else
                    shutil.copyfile(image, link)
                count += 1
    return count


def check_images(ctx: Context) -> Passed:
    s = ctx.sizes
    workers = max(1, min(8, s.threads))
    per_worker = math.ceil(s.unique_images / workers)
    generated = ctx.work / "generated"
    with Pool(workers) as pool:
        pool.starmap(make_images, [(str(generated / f"w{k}"), per_worker, k) for k in range(workers)])
    train = val = 0
    for k in range(workers):
        train += _link_tree(generated / f"w{k}" / "train", ctx.images / "train", f"w{k}", s.copies)
        val += _link_tree(generated / f"w{k}" / "val", ctx.images / "val", f"w{k}", 1)
    make_demo_dataset(ctx.demo, s.demo, workers=workers)
    return Passed(f"{train} train / {val} val JPEGs", {
        "train_images": train, "unique_train_images": workers * per_worker, "val_images": val,
        "generator": "bench.images.make_images (about 500x375, quality 90)", "processes": workers,
        "demo_dataset": {"classes": s.demo.classes, "train": s.demo.classes * s.demo.train_per_class}})
