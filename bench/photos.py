"""Photographs for the loader benchmark: crops of scikit-image's bundled sample photographs at ImageNet's sizes,
JPEG quality 90, in the folder layout (train/<photo>/*.JPEG, val/<photo>/*.JPEG), one class per source photograph.

Generated images (bench.images) decode and resize differently from photographs; these have photographic content
(natural textures, real JPEG statistics) but far fewer distinct scenes than ImageNet: every file of a class is a
shifted, rescaled, possibly mirrored view of the same photograph. Nothing is downloaded: the photographs ship
inside scikit-image (the `bench` extra).
"""
import os
from typing import Dict

import numpy as np

QUALITY = 90
# Output width / height and its share: mostly 4:3 landscape like ImageNet's Flickr photographs, some portraits.
ASPECTS = ((4 / 3, 0.55), (3 / 2, 0.15), (1.0, 0.10), (3 / 4, 0.15), (2 / 3, 0.05))
LONG_SIDE = 500
"""Most files' longer side, as most of ImageNet's; a quarter get one drawn from [320, 640] instead."""
MAX_UPSCALE = 1.6
"""A crop is enlarged at most this much where its source allows: small crops blown up are no longer sharp."""


def load_photographs() -> Dict[str, np.ndarray]:
    """The RGB photographs among skimage.data's bundled files (none needs a fetch); the others are grey,
    synthetic or drawings (camera, coins, colorwheel, logo, ...)."""
    import skimage.data as sample

    left, right, _ = sample.stereo_motorcycle()
    return {"astronaut": sample.astronaut(), "chelsea": sample.chelsea(), "coffee": sample.coffee(),
            "hubble_deep_field": sample.hubble_deep_field(), "immunohistochemistry": sample.immunohistochemistry(),
            "motorcycle_left": left, "motorcycle_right": right, "retina": sample.retina(), "rocket": sample.rocket()}


def photo_size(rng: np.random.Generator) -> tuple:
    """(width, height) of one file."""
    aspect = rng.choice([a for a, _ in ASPECTS], p=[p for _, p in ASPECTS])
    long_side = LONG_SIDE if rng.random() < 0.75 else int(rng.integers(320, 641))
    if aspect >= 1:
        return long_side, round(long_side / aspect)
    return round(long_side * aspect), long_side


def crop_box(rng: np.random.Generator, source_size: tuple, size: tuple) -> tuple:
    """A random (left, top, right, bottom) of the output's aspect inside the source, between the largest such box
    and half its side, but no smaller than the output / MAX_UPSCALE (unless even the largest box is)."""
    source_width, source_height = source_size
    width, height = size
    scale_max = min(source_width / width, source_height / height)  # the largest box, in output pixels
    scale_min = min(scale_max, max(scale_max / 2, 1 / MAX_UPSCALE))
    scale = rng.uniform(scale_min, scale_max)
    box_width, box_height = min(round(width * scale), source_width), min(round(height * scale), source_height)
    left = int(rng.integers(0, source_width - box_width + 1))
    top = int(rng.integers(0, source_height - box_height + 1))
    return left, top, left + box_width, top + box_height


def make_photos(root: str, count: int, seed: int = 0) -> dict:
    """`count` train and count // 5 val JPEGs (at least one per class), classes in turn; each file's crop, size
    and flip come from its own seed, so the set depends only on (count, seed). Returns the set's statistics."""
    from PIL import Image

    photos = {name: Image.fromarray(pixels) for name, pixels in load_photographs().items()}
    names = sorted(photos)
    widths, heights, sizes = [], [], []
    splits = {"train": count, "val": max(count // 5, len(names))}
    for split_index, (split, n) in enumerate(splits.items()):
        for i in range(n):
            rng = np.random.default_rng([seed, split_index, i])
            name = names[i % len(names)]
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            size = photo_size(rng)
            image = photos[name].resize(size, Image.Resampling.LANCZOS, box=crop_box(rng, photos[name].size, size))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            path = os.path.join(folder, f"{name}_{i:06d}.JPEG")
            image.save(path, quality=QUALITY)
            widths.append(size[0])
            heights.append(size[1])
            sizes.append(os.path.getsize(path))
    return {"files": len(sizes), **splits, "classes": len(names), "mean_width": float(np.mean(widths)),
            "mean_height": float(np.mean(heights)), "mean_kib": float(np.mean(sizes)) / 1024,
            "bytes_per_pixel": float(np.sum(sizes) / np.sum(np.multiply(widths, heights)))}
