"""bench.photos, the loader benchmark's photograph set, and how bench.loader sums up its rounds."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bench import loader as bench_loader
from bench.photos import LONG_SIDE, QUALITY, load_photographs, make_photos
from data.folder import list_split


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def _quantization_at(quality: int) -> dict:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 200)).save(out, "JPEG", quality=quality)
    return Image.open(out).quantization


def test_photo_set_is_deterministic_in_the_folder_layout(tmp_path):
    classes = sorted(load_photographs())
    make_photos(str(tmp_path / "a"), 2 * len(classes), seed=3)
    make_photos(str(tmp_path / "b"), 2 * len(classes), seed=3)
    make_photos(str(tmp_path / "c"), 2 * len(classes), seed=4)
    first, again, other_seed = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert first == again
    assert first.keys() == other_seed.keys() and first != other_seed
    train, val = list_split(str(tmp_path / "a"), "train"), list_split(str(tmp_path / "a"), "val")
    assert train.classes == val.classes == classes
    assert np.bincount(train.labels).tolist() == [2] * len(classes)
    assert np.bincount(val.labels).tolist() == [1] * len(classes)


def test_photos_are_imagenet_sized_quality_90_jpegs(tmp_path):
    stats = make_photos(str(tmp_path), 45)
    quality_90 = _quantization_at(QUALITY)
    sizes = []
    for path in tmp_path.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.quantization == quality_90
            image.load()
            sizes.append(image.size)
    assert len(sizes) == stats["files"] == 45 + 9
    long_sides = [max(s) for s in sizes]
    aspects = [max(s) / min(s) for s in sizes]
    assert all(320 <= side <= 640 for side in long_sides) and long_sides.count(LONG_SIDE) > len(sizes) / 2
    assert all(1 <= a <= 1.51 for a in aspects)
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)
    assert 0.1 < stats["bytes_per_pixel"] < 1


def test_make_photos_command(tmp_path, capsys):
    bench_loader.main(["--make-photos", str(tmp_path), "--count", "9"])
    assert len(list((tmp_path / "train").rglob("*.JPEG"))) == 9
    assert "9 photographs" in capsys.readouterr().out


def test_ratios_are_taken_within_each_round():
    def run(train, val):
        return {"train": {"img_per_s": train, "cpu_ms_per_img": 2000 / train},
                "val": {"img_per_s": val, "cpu_ms_per_img": 2000 / val}, "peak_rss_mib": 1.0}

    ceiling = {"img_per_s": 1000.0, "threads": 2, "single_core": {"pil": 500.0}}
    # The second round ran on a machine twice as busy: both sides of the ratio halved.
    rounds = [{"backends": {"dali": run(800, 600), "torchvision-pil": run(400, 400)}, "ceiling": ceiling},
              {"backends": {"dali": run(400, 300), "torchvision-pil": run(200, 200)}, "ceiling": ceiling},
              {"backends": {"dali": run(700, 600), "torchvision-pil": run(350, 300)}, "ceiling": ceiling}]
    report = bench_loader.summarise(rounds, threads=2)
    train = report["backends"]["dali"]["train"]
    assert (train["img_per_s"], train["runs"], train["vs_reference"]) == (700, [800, 400, 700], 2.0)
    assert train["cpu_ms_per_img"] == pytest.approx(2000 / 700) and train["cpu_vs_reference"] == pytest.approx(2.0)
    assert report["backends"]["dali"]["val"]["vs_reference"] == 1.5
    assert report["backends"]["torchvision-pil"]["train"]["vs_reference"] == 1.0


def test_cpu_time_counts_descendants():
    # A grandchild burns half a CPU second, as a DataLoader worker under the forkserver does, then waits.
    burn = ("import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.5:\n    pass\n"
            "print(1, flush=True)\ninput()")
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    child = subprocess.Popen([sys.executable, "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        own = sum(os.times()[:2])
        assert bench_loader._cpu_seconds() - own >= 0.45
    finally:
        child.communicate("\n", timeout=10)
