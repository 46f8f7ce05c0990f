import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from common.errors import DataError, UserInputError
from data.prepare_imagenet import PARTIAL, main, prepare_imagenet, read_devkit

# ILSVRC2012_ID -> WNID of the leaf classes; the real devkit numbers 1000 of them among 1860 synsets.
LEAVES = {1: "n01440764", 2: "n01443537", 3: "n01484850"}
TRAIN_PER_CLASS = 3
VAL_LABELS = [2, 1, 3, 3, 1, 2, 2]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def _tar(members: dict, mode: str = "w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _meta_mat() -> bytes:
    # The real meta.mat is a 1860x1 MATLAB struct array; an inner node (num_children > 0) must be ignored.
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, wnid, f"class {i}", "a leaf", 0, np.zeros((1, 0)), 0, TRAIN_PER_CLASS) for i, wnid in LEAVES.items()]
    rows.append((len(LEAVES) + 1, "n00001740", "entity", "the root", len(LEAVES),
                 np.array(list(LEAVES), dtype=np.uint16), 19, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    out = io.BytesIO()
    savemat(out, {"synsets": synsets})
    return out.getvalue()


@pytest.fixture
def archives(tmp_path) -> dict:
    train = {f"{wnid}.tar": _tar({f"{wnid}_{i}.JPEG": _jpeg(100 * k + i) for i in range(TRAIN_PER_CLASS)})
             for k, wnid in enumerate(LEAVES.values())}
    val = {f"ILSVRC2012_val_{k:08d}.JPEG": _jpeg(1000 + k) for k in range(1, len(VAL_LABELS) + 1)}
    devkit = {"ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat(),
              "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                  "".join(f"{label}\n" for label in VAL_LABELS).encode(),
              "ILSVRC2012_devkit_t12/COPYING": b"..."}
    paths = {"train_tar": tmp_path / "ILSVRC2012_img_train.tar", "val_tar": tmp_path / "ILSVRC2012_img_val.tar",
             "devkit": tmp_path / "ILSVRC2012_devkit_t12.tar.gz"}
    paths["train_tar"].write_bytes(_tar(train))
    paths["val_tar"].write_bytes(_tar(val))
    paths["devkit"].write_bytes(_tar(devkit, mode="w:gz"))
    paths["train_members"] = train
    return paths


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare(archives: dict, out: Path) -> dict:
    return prepare_imagenet(archives["train_tar"], archives["val_tar"], archives["devkit"], out)


def test_devkit_gives_leaf_classes_and_val_labels(archives):
    kit = read_devkit(archives["devkit"])
    assert kit.wnids == list(LEAVES.values())
    assert kit.val_wnids == [LEAVES[label] for label in VAL_LABELS]


def test_layout(archives, tmp_path):
    out = tmp_path / "imagenet"
    assert _prepare(archives, out) == {"train_classes": len(LEAVES), "val_images": len(VAL_LABELS)}
    for k, wnid in enumerate(LEAVES.values()):
        files = sorted((out / "train" / wnid).iterdir())
        assert [f.name for f in files] == [f"{wnid}_{i}.JPEG" for i in range(TRAIN_PER_CLASS)]
        assert [f.read_bytes() for f in files] == [_jpeg(100 * k + i) for i in range(TRAIN_PER_CLASS)]
    for k, label in enumerate(VAL_LABELS, start=1):
        image = out / "val" / LEAVES[label] / f"ILSVRC2012_val_{k:08d}.JPEG"
        assert image.read_bytes() == _jpeg(1000 + k)
    assert sum(1 for p in (out / "val").rglob("*") if p.is_file()) == len(VAL_LABELS)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]


def test_second_run_changes_nothing(archives, tmp_path):
    out = tmp_path / "imagenet"
    _prepare(archives, out)
    before = _snapshot(out)
    assert _prepare(archives, out) == {"train_classes": 0, "val_images": 0}
    assert _snapshot(out) == before


def test_resumes_after_an_interruption(archives, tmp_path):
    out = tmp_path / "imagenet"
    wnids = list(LEAVES.values())
    # A run that dies inside the second class: its tar ends mid-way.
    good_train = archives["train_tar"].read_bytes()
    damaged = dict(archives["train_members"])
    damaged[f"{wnids[1]}.tar"] = damaged[f"{wnids[1]}.tar"][:1500]
    archives["train_tar"].write_bytes(_tar(damaged))
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar"):
        _prepare(archives, out)
    assert sorted(p.name for p in (out / "train").iterdir()) == wnids[:1]
    assert any((out / PARTIAL / "train" / wnids[1]).iterdir()), "the cut class should be half-written"
    first_class = _snapshot(out / "train" / wnids[0])

    archives["train_tar"].write_bytes(good_train)
    assert _prepare(archives, out) == {"train_classes": 2, "val_images": len(VAL_LABELS)}
    assert _snapshot(out / "train" / wnids[0]) == first_class
    assert [f.name for f in sorted((out / "train" / wnids[1]).iterdir())] == [
        f"{wnids[1]}_{i}.JPEG" for i in range(TRAIN_PER_CLASS)]
    assert not (out / PARTIAL).exists()


def test_half_written_val_is_redone(archives, tmp_path):
    out = tmp_path / "imagenet"
    _prepare(archives, out)
    reference = _snapshot(out / "val")
    # An interrupted val pass leaves only the partial folder.
    (out / PARTIAL).mkdir()
    (out / "val").rename(out / PARTIAL / "val")
    next(p for p in (out / PARTIAL / "val").rglob("*.JPEG")).unlink()
    _prepare(archives, out)
    assert {k: v[0] for k, v in _snapshot(out / "val").items()} == {k: v[0] for k, v in reference.items()}


@pytest.mark.parametrize("archive", ["train_tar", "val_tar", "devkit"])
def test_missing_archive_is_named(archives, tmp_path, archive):
    archives[archive].unlink()
    with pytest.raises(UserInputError, match=archives[archive].name):
        _prepare(archives, tmp_path / "imagenet")


@pytest.mark.parametrize("archive", ["train_tar", "val_tar", "devkit"])
def test_corrupt_archive_is_named(archives, tmp_path, archive):
    data = archives[archive].read_bytes()
    archives[archive].write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=archives[archive].name):
        _prepare(archives, tmp_path / "imagenet")


def test_cli(archives, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    args = ["--train-tar", str(archives["train_tar"]), "--val-tar", str(archives["val_tar"]),
            "--devkit", str(archives["devkit"]), "--out", str(tmp_path / "imagenet")]
    assert main(args) == 0
    archives["val_tar"].unlink()
    assert main(args) == 0, "everything is there already: the archives are not needed"
    assert main(args[:-1] + [str(tmp_path / "other")]) == 2
    assert "ILSVRC2012_img_val.tar: archive not found" in capsys.readouterr().err


def test_devkit_without_meta_is_named(archives, tmp_path):
    archives["devkit"].write_bytes(_tar({"ILSVRC2012_devkit_t12/COPYING": b"..."}, mode="w:gz"))
    with pytest.raises(DataError, match="ILSVRC2012_devkit_t12.tar.gz: has no data/meta.mat"):
        _prepare(archives, tmp_path / "imagenet")


def test_val_tar_and_ground_truth_must_agree(archives, tmp_path):
    archives["val_tar"].write_bytes(_tar({"ILSVRC2012_val_00000001.JPEG": _jpeg(0)}))
    with pytest.raises(DataError, match=f"holds 1 images, the devkit's ground truth labels {len(VAL_LABELS)}"):
        _prepare(archives, tmp_path / "imagenet")
    assert not (tmp_path / "imagenet" / "val").exists()
