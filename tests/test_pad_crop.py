"""data.train_crop=pad_crop, He et al.'s CIFAR augmentation, on both image backends: each training crop is one of
torchvision's RandomCrop(image_size, padding=pad) + flip of its source image to the pixel, every offset and both
flips occur, val sees the unpadded image, and resume stays bitwise."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.build import build_loader, merge_states
from data.config import DataConfig
from tests.helpers import CLASSES, run

CPU = torch.device("cpu")
SIZE, PAD = 32, 4
MEAN, STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """Random-pixel PNGs (lossless, so both decoders give the same pixels): 32x32 like CIFAR, and some larger ones,
    where the offsets span more than 2 x pad. Returns {label: [HWC uint8 arrays]} of the train split."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(7)
    train = {}
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            for i in range(4):
                shape = (SIZE, SIZE) if i < 3 else (SIZE + 3, SIZE + 6)
                pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
                os.makedirs(root / split / name, exist_ok=True)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
                if split == "train":
                    train.setdefault(label, []).append(pixels)
    return str(root), train


def loader(root, backend, split="train", **overrides):
    cfg = DataConfig(root=root, backend=backend, image_size=SIZE, val_resize=SIZE, train_crop="pad_crop", pad=PAD,
                     mean=MEAN, std=STD, num_threads=1, **overrides)
    return build_loader(cfg, split, batch_size=4, rank=0, world_size=1, device=CPU, seed=3)


def normalized(pixels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)


def candidates(pixels: np.ndarray):
    """Every output of RandomCrop(SIZE, padding=PAD) + flip: the (top, left, flipped) of each, and the crops."""
    padded = np.pad(pixels, ((PAD, PAD), (PAD, PAD), (0, 0)))
    keys, crops = [], []
    for top in range(padded.shape[0] - SIZE + 1):
        for left in range(padded.shape[1] - SIZE + 1):
            crop = normalized(padded[top:top + SIZE, left:left + SIZE])
            keys += [(top, left, False), (top, left, True)]
            crops += [crop, crop.flip(-1)]
    return keys, torch.stack(crops)


def draws(batches, train):
    """The (source index, top, left, flipped) of every crop; fails on a crop that no candidate gives to the pixel."""
    options = {label: [candidates(p) for p in images] for label, images in train.items()}
    found = []
    for images, labels in batches:
        for image, label in zip(images, labels.tolist()):
            match = [(i, *keys[k]) for i, (keys, crops) in enumerate(options[label])
                     # 1e-4: DALI multiplies by 1 / std
                     for k in torch.nonzero((crops - image).abs().amax(dim=(1, 2, 3)) < 1e-4).flatten().tolist()]
            assert len(match) == 1, f"a crop of class {label} is {len(match)} candidates"
            found.append(match[0])
    return found


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_each_crop_is_a_padded_random_crop_and_every_offset_and_flip_occurs(noise, backend):
    root, train = noise
    found = draws(run(loader(root, backend), 30), train)  # 10 epochs of 12 images
    assert len(found) == 120
    small = [draw for draw in found if draw[0] < 3]  # 32x32: offsets 0..2 x pad on each axis
    assert {top for _, top, _, _ in small} == set(range(2 * PAD + 1))
    assert {left for _, _, left, _ in small} == set(range(2 * PAD + 1))
    large = [draw for draw in found if draw[0] == 3]  # 35x38: up to 11 and 14
    assert max(left for _, _, left, _ in large) > 2 * PAD
    flips = sum(flipped for *_, flipped in found)
    assert 30 < flips < 90  # 120 fair coins: 60 +- 5.5


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_val_is_the_unpadded_image(noise, backend):
    root, _ = noise
    expected = [np.asarray(Image.open(os.path.join(root, "val", name, f"{i}.png")))
                for name in CLASSES for i in range(3)]
    images = torch.cat([x for x, _ in loader(root, backend, "val")])  # sorted by class, then file: 0..3.png
    small = [images[k * 4 + i] for k in range(len(CLASSES)) for i in range(3)]
    for image, pixels in zip(small, expected, strict=True):
        assert torch.allclose(image, normalized(pixels), atol=1e-5)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
@pytest.mark.parametrize("stop", [2, 4])  # mid-epoch, and past an epoch's end
def test_resume_is_bitwise_identical(noise, backend, stop):
    root, _ = noise
    expected = run(loader(root, backend), 6)
    first = loader(root, backend)
    run(first, stop)
    resumed = loader(root, backend)
    resumed.load_state_dict(merge_states([first.state_dict()]))
    for (x, y), (ex, ey) in zip(run(resumed, 6 - stop), expected[stop:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
