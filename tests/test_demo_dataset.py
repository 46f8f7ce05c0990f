import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError, UserInputError
from data.make_demo_dataset import (
    CLASS_NAMES,
    COMPLETE_MARKER,
    SMALL_CLASS_NAMES,
    DemoParams,
    class_folder,
    main,
    make_demo_dataset,
)

SMALL = DemoParams(seed=3, classes=len(CLASS_NAMES), train_per_class=3, val_per_class=2)
SMALL_VARIANT = DemoParams(seed=3, classes=len(SMALL_CLASS_NAMES), train_per_class=2, val_per_class=1, small_side=40)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_layout_and_images_look_like_imagenet(tmp_path):
    make_demo_dataset(tmp_path, SMALL, workers=1)
    folders = [class_folder(c) for c in range(SMALL.classes)]
    assert folders == sorted(folders)
    for split, count in (("train", SMALL.train_per_class), ("val", SMALL.val_per_class)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == folders
        for folder in folders:
            files = sorted((tmp_path / split / folder).iterdir())
            assert [f.name for f in files] == sorted(f"{folder}_{i}.JPEG" for i in range(count))
            for f in files:
                with Image.open(f) as image:
                    assert (image.format, image.mode) == ("JPEG", "RGB")
                    assert 200 <= min(image.size) and max(image.size) <= 500
    assert (tmp_path / "classes.txt").read_text().split() == folders


def test_same_seed_is_byte_identical_whatever_the_worker_count(tmp_path):
    make_demo_dataset(tmp_path / "serial", SMALL, workers=1)
    make_demo_dataset(tmp_path / "parallel", SMALL, workers=2)
    serial = _files(tmp_path / "serial")
    assert len(serial) == SMALL.classes * (SMALL.train_per_class + SMALL.val_per_class)
    assert serial == _files(tmp_path / "parallel")


def test_another_seed_gives_other_images(tmp_path):
    make_demo_dataset(tmp_path / "a", SMALL, workers=1)
    make_demo_dataset(tmp_path / "b", DemoParams(4, SMALL.classes, SMALL.train_per_class, SMALL.val_per_class),
                      workers=1)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_complete_dataset_is_left_alone(tmp_path):
    make_demo_dataset(tmp_path, SMALL, workers=1)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    make_demo_dataset(tmp_path, SMALL, workers=1)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_partial_dataset_is_regenerated(tmp_path):
    make_demo_dataset(tmp_path, SMALL, workers=1)
    expected = _files(tmp_path)
    # What an interruption leaves: no completion marker, a file missing, another cut short.
    (tmp_path / COMPLETE_MARKER).unlink()
    victims = sorted((tmp_path / "train").rglob("*.JPEG"))[:2]
    victims[0].unlink()
    victims[1].write_bytes(victims[1].read_bytes()[:100])
    make_demo_dataset(tmp_path, SMALL, workers=1)
    assert _files(tmp_path) == expected
    assert json.loads((tmp_path / COMPLETE_MARKER).read_text())["seed"] == SMALL.seed


def test_other_parameters_replace_the_dataset(tmp_path):
    make_demo_dataset(tmp_path, SMALL, workers=1)
    fewer = DemoParams(SMALL.seed, 2, 1, 1)
    make_demo_dataset(tmp_path, fewer, workers=1)
    assert sorted(_files(tmp_path)) == sorted(f"{split}/{class_folder(c)}/{class_folder(c)}_0.JPEG"
                                              for split in ("train", "val") for c in range(2))


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path):
    precious = tmp_path / "train" / "n01440764" / "n01440764_1.JPEG"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"not ours")
    with pytest.raises(DataError, match="refusing"):
        make_demo_dataset(tmp_path, SMALL, workers=1)
    assert precious.read_bytes() == b"not ours"


def test_colour_statistics_do_not_give_the_class_away(tmp_path):
    params = DemoParams(seed=0, classes=len(CLASS_NAMES), train_per_class=20, val_per_class=10)
    make_demo_dataset(tmp_path, params, workers=2)

    def features(split):
        xs, ys = [], []
        for label in range(params.classes):
            for f in sorted((tmp_path / split / class_folder(label)).iterdir()):
                pixels = np.asarray(Image.open(f).convert("RGB").resize((56, 56)), dtype=np.float64) / 255
                xs.append(np.concatenate([pixels.mean((0, 1)), pixels.std((0, 1))]))
                ys.append(label)
        return np.array(xs), np.array(ys)

    train_x, train_y = features("train")
    val_x, val_y = features("val")
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(params.classes)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    # Chance is 10 %; a colour lookup would be near 100 %.
    assert (predicted == val_y).mean() < 0.3


def test_the_small_variant_is_30_classes_of_square_images_whatever_the_worker_count(tmp_path):
    make_demo_dataset(tmp_path / "serial", SMALL_VARIANT, workers=1)
    make_demo_dataset(tmp_path / "parallel", SMALL_VARIANT, workers=2)
    folders = [class_folder(c, SMALL_CLASS_NAMES) for c in range(len(SMALL_CLASS_NAMES))]
    assert len(folders) == 30 and folders[:2] == ["n00000001_disc-solid", "n00000002_disc-stripes"]
    for split in ("train", "val"):
        assert sorted(p.name for p in (tmp_path / "serial" / split).iterdir()) == folders
    serial = _files(tmp_path / "serial")
    assert len(serial) == 30 * 3 and serial == _files(tmp_path / "parallel")
    for path in (tmp_path / "serial").rglob("*.JPEG"):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))
    assert json.loads((tmp_path / "serial" / COMPLETE_MARKER).read_text())["small_side"] == 40


def test_the_demo_manifest_is_unchanged_by_the_small_variant(tmp_path):
    # Folders made before the small variant existed must stay complete, not be made again.
    make_demo_dataset(tmp_path, SMALL, workers=1)
    manifest = json.loads((tmp_path / COMPLETE_MARKER).read_text())
    assert set(manifest) == {"generator_version", "seed", "classes", "train_per_class", "val_per_class"}
    with pytest.raises(UserInputError, match="--small-side"):
        make_demo_dataset(tmp_path / "x", DemoParams(small_side=4), workers=1)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert main(["--out", str(tmp_path), "--classes", "2", "--train-per-class", "1", "--val-per-class", "1",
                 "--workers", "1"]) == 0
    assert len(_files(tmp_path)) == 4
    assert main(["--out", str(tmp_path / "x"), "--classes", "99"]) == 2
    assert "classes" in capsys.readouterr().err
