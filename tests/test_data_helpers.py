"""Tiny generated ImageNet-style folders for the data tests (no test functions here)."""
import io
import os

import numpy as np
from PIL import Image

CLASSES = ("n01", "n02", "n03")


def code_colour(code: int):
    """A solid colour that identifies one image: the red channel carries the code."""
    return (20 + 6 * code, 200 - 4 * code, 90)


def decode_code(red: float) -> int:
    return int(round((red - 20) / 6))


def write_image(path: str, pixels: np.ndarray):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def make_coded(root: str, train_per_class: int = 8, val_per_class: int = 3):
    """Solid-colour images of varied sizes; returns {split: [(class index, code)]} in file order.

    The colour of each image encodes its code (see code_colour), so a test can tell which file a sample came
    from after any crop, resize or flip.
    """
    rng = np.random.default_rng(1)
    index = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        index[split] = []
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                code = len(index[split])
                h, w = rng.integers(40, 121, 2)
                suffix = (".JPEG", ".jpg", ".jpeg")[code % 3]
                write_image(os.path.join(root, split, name, f"img{i:02d}{suffix}"),
                            np.full((h, w, 3), code_colour(code), np.uint8))
                index[split].append((label, code))
    return index


def make_smooth(root: str, per_class: int = 3):
    """Smooth random images (low-frequency content) of varied sizes, for comparing resize implementations."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for name in CLASSES:
            for i in range(per_class):
                h, w = rng.integers(40, 121, 2)
                coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
                write_image(os.path.join(root, split, name, f"s{i}.JPEG"),
                            np.asarray(coarse.resize((int(w), int(h)), Image.BICUBIC)))


def encoded(mode: str = "RGB", image_format: str = "JPEG", seed: int = 0, size=(48, 64)) -> bytes:
    """Random pixels converted to `mode` and encoded as `image_format`: noise, so that a cut lands in scan data."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, image_format)
    return out.getvalue()
