"""A small ImageNet-layout JPEG dataset of shapes and textures over clutter: the demo's default data.

Each class is a shape or texture (disc, ring, triangle, ...) drawn big, at a random position, scale, rotation and
colour over a cluttered background. Background, clutter and object colours come from one class-independent
distribution, so colour statistics say nothing about the class: telling classes apart takes spatial features, which
a small ResNet at ~56 px learns in a few CPU minutes.

The small variant (`small_side`, e.g. 40) is harder, for experiments that need a task a small net does not solve
in minutes: CIFAR-sized square images, 30 classes (each of the six shapes filled solid or with one of the four
textures, so the class takes both the outline and the fill) and more clutter.

Every image is generated from its own seed (dataset seed, split, class, index), so the output is byte-identical
whatever the number of worker processes.
"""
import argparse
import fcntl
import functools
import io
import json
import math
import multiprocessing
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from common import cli
from common.errors import DataError, UserInputError

# Bump when the drawing changes, so that datasets made by an older generator are regenerated.
GENERATOR_VERSION = 2
# Chosen to differ in topology (holes), corners and concavities, not only in fine outline detail, so that a small
# network tells them apart at 56 px after a few epochs.
CLASS_NAMES = ("disc", "ring", "triangle", "cross", "crescent", "target", "stripes", "checker", "dots", "grid")
SPLITS = ("train", "val")
COMPLETE_MARKER = ".complete.json"
# Written before the first image and kept: marks the folder as ours, so a rerun may delete a partial dataset.
OWNER_MARKER = ".demo_dataset"
LOCK_FILE = ".lock"
TEXTURES = ("stripes", "checker", "dots", "grid")
MAX_SIDE = 500
# Sensor-like noise: windows of a few fixed tiles, far cheaper than drawing fresh Gaussian noise per image.
NOISE_SIGMAS = (3, 5, 7, 9)
NOISE_TILE = 600
SHAPES = CLASS_NAMES[:6]
FILLS = ("solid",) + TEXTURES
SMALL_CLASS_NAMES = tuple(f"{shape}-{fill}" for shape in SHAPES for fill in FILLS)
# Bump when the small variant's drawing changes (GENERATOR_VERSION covers the demo's own images).
SMALL_VERSION = 1
# The small variant is drawn at this multiple of its side and downscaled: PIL draws without antialiasing.
SMALL_OVERSAMPLE = 4


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    """Base seed; every image derives its own seed from it."""
    classes: int = 10
    """Number of classes, at most len(CLASS_NAMES)."""
    train_per_class: int = 260
    """Training images per class."""
    val_per_class: int = 50
    """Validation images per class."""
    small_side: int = 0
    """0 makes the demo's images; N makes the small variant: N x N images, 30 classes (SMALL_CLASS_NAMES)."""

    @property
    def class_names(self) -> tuple:
        return SMALL_CLASS_NAMES if self.small_side else CLASS_NAMES


def class_folder(index: int, names: Sequence[str] = CLASS_NAMES) -> str:
    """A wnid-like folder name that sorts in class order: n00000001_disc, n00000002_ring, ..."""
    return f"n{index + 1:08d}_{names[index]}"


def image_path(split: str, class_index: int, image_index: int, names: Sequence[str] = CLASS_NAMES) -> Path:
    folder = class_folder(class_index, names)
    return Path(split) / folder / f"{folder}_{image_index}.JPEG"


@functools.lru_cache(maxsize=1)
def _noise_tiles() -> list:
    rng = np.random.default_rng(20120)
    return [np.rint(rng.normal(0, sigma, size=(NOISE_TILE, NOISE_TILE, 3))).astype(np.int16) for sigma in NOISE_SIGMAS]


def _contrasting_colour(rng: np.random.Generator, background_luma: float) -> tuple:
    # Objects and clutter share this draw; a luma gap keeps both visible after downscaling to ~56 px.
    while True:
        rgb = rng.integers(0, 256, size=3)
        if abs(float(rgb @ [0.299, 0.587, 0.114]) - background_luma) > 80:
            return tuple(int(c) for c in rgb)


def _background(rng: np.random.Generator, width: int, height: int) -> tuple:
    """A smooth, varied, class-independent background and its mean luma.

    A few random colours on a coarse grid, bilinearly upsampled.
    """
    grid = rng.integers(40, 216, size=(rng.integers(2, 5), rng.integers(2, 5), 3), dtype=np.uint8)
    luma = float(grid.mean(axis=(0, 1)) @ [0.299, 0.587, 0.114])
    return Image.fromarray(grid).resize((width, height), Image.BILINEAR), luma


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int, luma: float,
             blobs: int, lines: int) -> None:
    short = min(width, height)
    for _ in range(blobs):
        rx, ry = rng.uniform(0.02, 0.06, size=2) * short
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_contrasting_colour(rng, luma))
    for _ in range(lines):
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        line_width = max(1, int(rng.uniform(0.008, 0.02) * short))
        draw.line((x0, y0, x1, y1), fill=_contrasting_colour(rng, luma), width=line_width)


def _polygon(cx: float, cy: float, radii: Sequence[float], angle: float) -> List[tuple]:
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)]


def _bar(start: tuple, end: tuple, half_width: float) -> List[tuple]:
    length = math.dist(start, end)
    nx, ny = (start[1] - end[1]) / length * half_width, (end[0] - start[0]) / length * half_width
    return [(start[0] + nx, start[1] + ny), (end[0] + nx, end[1] + ny), (end[0] - nx, end[1] - ny),
            (start[0] - nx, start[1] - ny)]


def _texture_mask(rng: np.random.Generator, kind: str, shape: tuple, cx: float, cy: float, radius: float,
                  angle: float) -> np.ndarray:
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
    v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
    # The outline is a disc or a square at random, so only the texture inside tells the class.
    if rng.random() < 0.5:
        region = u * u + v * v < radius * radius
    else:
        half = radius * 0.85
        region = (np.abs(u) < half) & (np.abs(v) < half)
    period = radius * rng.uniform(0.4, 0.55)
    phase = rng.uniform(0, period, size=2)
    if kind == "stripes":
        pattern = np.floor((u + phase[0]) / period) % 2 == 0
    elif kind == "checker":
        pattern = (np.floor((u + phase[0]) / period) + np.floor((v + phase[1]) / period)) % 2 == 0
    elif kind == "grid":
        line = 0.3 * period
        pattern = ((u + phase[0]) % period < line) | ((v + phase[1]) % period < line)
    else:
        du = (u + phase[0]) % period - period / 2
        dv = (v + phase[1]) % period - period / 2
        pattern = du * du + dv * dv < (0.3 * period) ** 2
    return region & pattern


def _object_mask(rng: np.random.Generator, kind: str, width: int, height: int, cx: float, cy: float,
                 radius: float, angle: float) -> Image.Image:
    if kind in TEXTURES:
        return Image.fromarray(_texture_mask(rng, kind, (height, width), cx, cy, radius, angle).astype(np.uint8) * 255)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    disc = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "disc":
        draw.ellipse(disc, fill=255)
    elif kind == "ring":
        draw.ellipse(disc, fill=255)
        inner = radius * rng.uniform(0.5, 0.65)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, [radius * 1.1] * 3, angle), fill=255)
    elif kind == "target":
        for fraction, fill in ((1.0, 255), (0.72, 0), (0.4, 255)):
            r = radius * fraction
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "cross":
        half_width = radius * rng.uniform(0.25, 0.35)
        for a in (angle, angle + math.pi / 2):
            end = (math.cos(a) * radius, math.sin(a) * radius)
            draw.polygon(_bar((cx - end[0], cy - end[1]), (cx + end[0], cy + end[1]), half_width), fill=255)
    elif kind == "crescent":
        draw.ellipse(disc, fill=255)
        shift, inner = radius * rng.uniform(0.4, 0.55), radius * rng.uniform(0.8, 0.9)
        ox, oy = cx + shift * math.cos(angle), cy + shift * math.sin(angle)
        draw.ellipse((ox - inner, oy - inner, ox + inner, oy + inner), fill=0)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return mask


def render_image(seed: int, split: str, class_index: int, image_index: int) -> bytes:
    """The JPEG bytes of one image; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), class_index, image_index])
    short = int(rng.integers(200, 401))
    long = min(MAX_SIDE, int(short * rng.uniform(1.0, 1.5)))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)

    image, luma = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, width, height, luma, blobs=int(rng.integers(2, 7)), lines=int(rng.integers(1, 5)))

    # Big (50-76 % of the shorter side across) and near the centre: it survives 25 %-area crops and 56 px inputs.
    radius = rng.uniform(0.25, 0.38) * short
    cx = width / 2 + rng.uniform(-1, 1) * max(0.0, min(0.12 * width, width / 2 - radius))
    cy = height / 2 + rng.uniform(-1, 1) * max(0.0, min(0.12 * height, height / 2 - radius))
    mask = _object_mask(rng, CLASS_NAMES[class_index], width, height, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    image.paste(_contrasting_colour(rng, luma), mask=mask)
    _clutter(rng, draw, width, height, luma, blobs=0, lines=int(rng.integers(0, 2)))

    noise = _noise_tiles()[rng.integers(len(NOISE_SIGMAS))]
    top, left = rng.integers(0, NOISE_TILE - height + 1), rng.integers(0, NOISE_TILE - width + 1)
    pixels = np.asarray(image, dtype=np.int16) + noise[top:top + height, left:left + width]
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=int(rng.integers(85, 91)))
    return out.getvalue()


def render_small_image(seed: int, split: str, class_index: int, image_index: int, side: int) -> bytes:
    """The JPEG bytes of one image of the small variant: a shape, filled solid or with a texture, over more
    clutter than the demo's; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), class_index, image_index, side])
    size = side * SMALL_OVERSAMPLE
    image, luma = _background(rng, size, size)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size, size, luma, blobs=int(rng.integers(4, 11)), lines=int(rng.integers(2, 6)))

    radius = rng.uniform(0.25, 0.38) * size
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    angle = rng.uniform(0, 2 * math.pi)
    shape, fill = SHAPES[class_index // len(FILLS)], FILLS[class_index % len(FILLS)]
    mask = _object_mask(rng, shape, size, size, cx, cy, radius, angle)
    if fill != "solid":
        # The texture's own outline (a disc or square of 1.5 r) contains the shape, so the shape cuts it out.
        texture = _texture_mask(rng, fill, (size, size), cx, cy, 1.5 * radius, angle)
        mask = Image.fromarray(np.asarray(mask) & (texture.astype(np.uint8) * 255))
    image.paste(_contrasting_colour(rng, luma), mask=mask)
    _clutter(rng, draw, size, size, luma, blobs=0, lines=int(rng.integers(0, 3)))
    image = image.resize((side, side), Image.BOX)

    noise = _noise_tiles()[rng.integers(len(NOISE_SIGMAS))]
    top, left = rng.integers(0, NOISE_TILE - side + 1, size=2)
    pixels = np.asarray(image, dtype=np.int16) + noise[top:top + side, left:left + side]
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=int(rng.integers(85, 91)))
    return out.getvalue()


def _write_image(task: tuple) -> None:
    out, params, split, class_index, image_index = task
    if params.small_side:
        data = render_small_image(params.seed, split, class_index, image_index, params.small_side)
    else:
        data = render_image(params.seed, split, class_index, image_index)
    (out / image_path(split, class_index, image_index, params.class_names)).write_bytes(data)


def _is_complete(out: Path, params: DemoParams) -> bool:
    marker = out / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _manifest(params)
    except json.JSONDecodeError:
        return False


def _manifest(params: DemoParams) -> dict:
    fields = asdict(params)
    if not params.small_side:
        # Without the key, as folders made before the small variant existed: they stay complete.
        del fields["small_side"]
        return {"generator_version": GENERATOR_VERSION, **fields}
    return {"generator_version": GENERATOR_VERSION, "small_version": SMALL_VERSION, **fields}


def _refuse_foreign(out: Path) -> None:
    """Generates only into a folder that is absent, empty or made by this generator: a data.root with a typo must
    not turn into 90 MB of pictures next to somebody's files."""
    if not out.is_dir() or (out / OWNER_MARKER).exists():
        return
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if others:
        raise DataError(f"{out}: not empty and not made by make_demo_dataset ({', '.join(others[:5])}); refusing "
                        f"to generate the demo dataset there (only into an empty or absent folder). Check "
                        f"data.root, or set data.demo=false to train on what is there")


def _clear_previous(out: Path) -> None:
    _refuse_foreign(out)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)


def make_demo_dataset(out: Path, params: DemoParams, workers: int = 2) -> Path:
    """Generate the dataset into out unless a complete one with the same params is there already."""
    names = params.class_names
    if not 1 <= params.classes <= len(names):
        raise UserInputError(f"--classes: must be in [1, {len(names)}], got {params.classes}")
    if params.train_per_class < 1 or params.val_per_class < 1:
        raise UserInputError("--train-per-class and --val-per-class must be >= 1")
    if params.small_side < 0 or 0 < params.small_side < 8:
        raise UserInputError(f"--small-side: must be 0 (the demo's images) or >= 8 pixels, got {params.small_side}")
    out = Path(out)
    if not _is_complete(out, params):
        _refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    # Ranks of a distributed demo may call this at once: one generates, the others wait and find it complete.
    with open(out / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out, params):
            return out
        _clear_previous(out)
        (out / OWNER_MARKER).touch()
        tasks = []
        for split, per_class in (("train", params.train_per_class), ("val", params.val_per_class)):
            for class_index in range(params.classes):
                (out / split / class_folder(class_index, names)).mkdir(parents=True)
                tasks += [(out, params, split, class_index, i) for i in range(per_class)]
        bar = tqdm(total=len(tasks), desc=f"demo dataset -> {out}", unit="img", disable=not sys.stderr.isatty())
        if workers > 1:
            # spawn, not fork: a child forked from a process whose other threads (DALI's, torch's, a trainer's) held
            # a lock at that moment can hang on it; the children need nothing but this module.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_image, tasks, chunksize=16):
                    bar.update()
        else:
            for task in tasks:
                _write_image(task)
                bar.update()
        bar.close()
        (out / "classes.txt").write_text("".join(class_folder(c, names) + "\n" for c in range(params.classes)))
        (out / COMPLETE_MARKER).write_text(json.dumps(_manifest(params)))
    return out


def ensure_demo_dataset(out, seed: int = 0) -> Path:
    """The default demo dataset under out, generated if absent or incomplete (and says so); returns out."""
    out, params = Path(out), DemoParams(seed=seed)
    if _is_complete(out, params):
        return out
    make_demo_dataset(out, params)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    images = params.classes * (params.train_per_class + params.val_per_class)
    print(f"made the demo dataset in {out.resolve()}: {images} images, {size / 2**20:.0f} MB", flush=True)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    defaults = DemoParams()
    parser = argparse.ArgumentParser(prog="python -m data.make_demo_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (gets train/, val/, classes.txt)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--classes", type=int, default=defaults.classes,
                        help=f"1-{len(CLASS_NAMES)}, or 1-{len(SMALL_CLASS_NAMES)} with --small-side")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    parser.add_argument("--val-per-class", type=int, default=defaults.val_per_class)
    parser.add_argument("--small-side", type=int, default=defaults.small_side,
                        help="make the small variant with images of this side (e.g. 40); 0: the demo's images")
    parser.add_argument("--workers", type=int, default=2, help="generating processes")
    return parser.parse_args(argv)


def make_demo_command(args: argparse.Namespace) -> int:
    params = DemoParams(args.seed, args.classes, args.train_per_class, args.val_per_class, args.small_side)
    make_demo_dataset(args.out, params, workers=args.workers)
    print(f"demo dataset ready: {args.out} ({params.classes} classes, "
          f"{params.train_per_class}/{params.val_per_class} train/val images per class)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, make_demo_command, argv)


if __name__ == "__main__":
    sys.exit(main())
