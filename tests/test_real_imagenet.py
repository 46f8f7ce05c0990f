"""The 1000 real ImageNet samples (one val JPEG a class, 23 of them grayscale, 68 to 2400 px) through every data path:
data.verify, the loaders' start-up screen, DALI and torchvision decoding, data.make_shards and the webdataset loader,
and bench.loader's --make-imagenet. Skipped where ../shared/datasets/imagenet-samples.tar is absent."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import loader as bench_loader
from bench.images import link_train_to_val
from data.build import build_loader
from data.config import DataConfig
from data.folder import list_split
from data.image_files import GRAYSCALE, OK
from data.make_shards import make_shards
from data.verify import main as verify_main
from data.verify import scan
from tests.helpers import shared_dataset

CPU = torch.device("cpu")
GRAYSCALE_FILES = 23  # the archive's README
CLASSES = 1000


def _as_root(val_files, root: Path) -> Path:
    """A dataset root whose val/ hard-links `val_files` (of an extracted val/<wnid>/) and whose train/ is symlinked
    to it, as bench.loader --make-imagenet makes it; the session's extracted files stay untouched."""
    for path in val_files:
        (root / "val" / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(path, root / "val" / path.parent.name / path.name)
    link_train_to_val(root)
    return root


@pytest.fixture(scope="module")
def real(imagenet_samples, tmp_path_factory) -> Path:
    return _as_root(sorted((imagenet_samples / "val").glob("*/*")), tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def grayscale(imagenet_samples, tmp_path_factory) -> Path:
    """A root of the grayscale samples only, found by PIL's colour mode."""
    gray = []
    for path in sorted((imagenet_samples / "val").glob("*/*")):
        with Image.open(path) as image:
            if image.mode == "L":
                gray.append(path)
    return _as_root(gray, tmp_path_factory.mktemp("grayscale"))


def test_verify_finds_nothing_unusable_only_the_grayscale_files_to_re_encode(imagenet_samples, capsys):
    checks = scan(imagenet_samples, workers=2)
    assert len(checks) == CLASSES
    assert sorted({c.kind for c in checks}) == sorted({OK, GRAYSCALE})
    assert sum(c.kind == GRAYSCALE for c in checks) == GRAYSCALE_FILES
    # Grayscale is no error for the loaders (see below): data.verify asks for them to be re-encoded all the same.
    assert verify_main([str(imagenet_samples), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("grayscale\tval/") == GRAYSCALE_FILES
    assert f"checked 1000 files: {GRAYSCALE_FILES} problems, 0 fixed, {GRAYSCALE_FILES} left to act on" in out


def test_verify_fix_re_encodes_the_grayscale_files_as_rgb(grayscale):
    assert len(list_split(str(grayscale), "val")) == GRAYSCALE_FILES
    assert verify_main([str(grayscale), "--fix", "--workers", "1"]) == 0
    assert {c.kind for c in scan(grayscale, workers=1)} == {OK}
    for path in list_split(str(grayscale), "val").paths():
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")


def test_the_start_up_screen_passes_every_file(real):
    # What `python -m bench.loader --root DIR --screen` runs: the listing and the loaders' screen of train/.
    result = bench_loader.screen_rate(str(real), cold=False)
    assert (result["files"], result["bad"]) == (CLASSES, 0)


def _val_batches(root: Path, backend: str, **overrides) -> list:
    cfg = DataConfig(root=str(root), backend=backend, num_threads=2, mean=[0.0, 0.0, 0.0], **overrides)
    loader = build_loader(cfg, "val", batch_size=8, rank=0, world_size=1, device=CPU, seed=0)
    return list(loader)


@pytest.mark.slow  # the torchvision DataLoader's first workers start a forkserver: some 5 s here
def test_grayscale_files_decode_to_three_equal_channels_on_dali_and_torchvision(grayscale):
    expected_labels = list(range(GRAYSCALE_FILES))  # one file a class, in class order
    decoded = {}
    for name, backend, overrides in (("dali", "dali", {}), ("pil", "torchvision", {"torchvision_decoder": "pil"}),
                                     ("decode_jpeg", "torchvision", {"torchvision_decoder": "tensor"})):
        batches = _val_batches(grayscale, backend, **overrides)
        images = torch.cat([images for images, _ in batches])
        assert images.shape == (GRAYSCALE_FILES, 3, 224, 224), name
        assert torch.cat([labels for _, labels in batches]).tolist() == expected_labels, name
        # A grey pixel is the same in R, G and B (mean 0: no per-channel shift); garbage or one channel would not be.
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]), name
        assert images.std() > 10, name  # not a blank
        decoded[name] = images
    for name in ("pil", "decode_jpeg"):
        assert (decoded["dali"] - decoded[name]).abs().mean() < 1.0, name  # of 255


def test_one_dali_train_and_val_batch_of_real_images_has_the_contracts_shapes(real):
    cfg = DataConfig(root=str(real), num_threads=2)
    for split in ("train", "val"):
        loader = build_loader(cfg, split, batch_size=32, rank=0, world_size=1, device=CPU, seed=0)
        assert len(loader.classes) == CLASSES
        images, labels = next(iter(loader))
        assert images.shape == (32, 3, 224, 224) and images.dtype == torch.float32 and torch.isfinite(images).all()
        assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) < CLASSES
        if split == "val":
            assert labels.tolist() == list(range(32))
        else:
            assert len(set(labels.tolist())) == 32  # one file a class: a shuffled batch holds 32 classes


@pytest.mark.slow
def test_make_shards_writes_every_real_image_and_the_webdataset_loader_reads_each_back(real, tmp_path):
    manifest = make_shards(real, tmp_path, shard_size=20_000_000, workers=2)
    wnids = list_split(str(real), "val").classes
    assert manifest["complete"] and manifest["classes"] == wnids and len(wnids) == CLASSES
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert (entry["samples"], entry["skipped"]) == (CLASSES, []) and len(entry["shards"]) > 3
        cfg = DataConfig(root=str(tmp_path), format="webdataset", image_size=64, val_resize=73, num_threads=2)
        loader = build_loader(cfg, split, batch_size=50, rank=0, world_size=1, device=CPU, seed=0)
        assert loader.classes == wnids
        labels = [label for _, batch in loader for label in batch.tolist()]
        # Every image read back once with its own class: in folder order in val, shuffled in train.
        assert (labels if split == "val" else sorted(labels)) == list(range(CLASSES)), split


def test_make_imagenet_extracts_val_and_links_train_to_it(tmp_path, capsys):
    archive = shared_dataset("imagenet-samples.tar")
    bench_loader.main(["--make-imagenet", str(tmp_path), "--from", str(archive)])
    assert "wrote 1000 val JPEGs of 1000 classes (23 grayscale) and as many train symlinks" in capsys.readouterr().out
    train, val = list_split(str(tmp_path), "train"), list_split(str(tmp_path), "val")
    assert train.classes == val.classes and len(val.classes) == CLASSES
    assert train.files == val.files
    for link, target in zip(train.paths(), val.paths()):
        # Relative: the folder can be moved as a whole.
        assert os.readlink(link) == os.path.join("..", "..", "val", *Path(target).parts[-2:])
        assert os.path.samefile(link, target) and not os.path.islink(target)


def test_make_imagenet_names_an_archive_that_is_not_the_samples(tmp_path, capsys):
    wrong = tmp_path / "other.tar"
    shutil.make_archive(str(wrong.with_suffix("")), "tar", root_dir=tmp_path, base_dir=".")
    assert bench_loader.main(["--make-imagenet", str(tmp_path / "out"), "--from", str(wrong)]) == 1
    assert f"error: --from {wrong}: {wrong} holds no imagenet-samples/val/<wnid>/ files" in capsys.readouterr().err
    absent = tmp_path / "absent.tar"
    assert bench_loader.main(["--make-imagenet", str(tmp_path / "out"), "--from", str(absent)]) == 1
    assert f"error: --from {absent}: {absent}: no such archive" in capsys.readouterr().err
