"""ImageNet-like JPEGs for the benchmarks and the GPU check: `make_images` writes them in the folder layout."""
import os

import numpy as np

CLASSES = 10


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
