"""Bad image files fed straight to training, without data.verify: each one trains (a decodable image) or stops the
run with a DataError that names the file and the problem, never a segfault or a bare decoder message."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data.build
from common.errors import DataError
from data.build import build_loader
from data.config import SEED_MEAN, DataConfig
from data.folder import list_split
from data.loader import Loader
from data.sharding import train_shard
from tests.helpers import encoded, make_coded, run_trainer
from trainer.main import main

CPU = torch.device("cpu")

ARGS = ["model.name=resnet20", "data.image_size=32", "data.val_resize=36", "data.num_threads=1", "train.batch_size=4",
        "train.precision=fp32", "train.epochs=1", "train.sync_bn=false", "monitor.wandb=false",
        "checkpoint.every_steps=0"]
JPEG = encoded()


def _write(data: bytes):
    def write(path):
        with open(path, "wb") as f:
            f.write(data)
    return write


def _unreadable(path):
    _write(JPEG)(path)
    os.chmod(path, 0)


def _symlink_loop(path):
    os.symlink(os.path.basename(path), path)


# kind: (writes the bad file, trains, words the error must hold)
BAD_FILES = {
    "zero_byte": (_write(b""), False, ["zero-byte"]),
    "truncated": (_write(JPEG[:len(JPEG) // 2]), False, ["truncated"]),
    "text": (_write(b"<html><body>404 Not Found</body></html>\n"), False, ["not-an-image", "404 Not Found"]),
    "png": (_write(encoded(image_format="PNG")), True, []),
    "cmyk": (_write(encoded("CMYK")), True, []),
    "grayscale": (_write(encoded("L")), True, []),
    "unreadable": (_unreadable, False, ["unreadable", "Permission denied"]),
    "symlink_loop": (_symlink_loop, False, ["unreadable", "Too many levels of symbolic links"]),
}


def dataset_with(root, kind) -> str:
    """15 good train images and the bad one: 16 in all, 4 whole batches of 4, so the bad file is read in epoch 1."""
    make_coded(str(root), train_per_class=5, val_per_class=2)
    path = os.path.join(root, "train", "n02", "bad.JPEG")
    BAD_FILES[kind][0](path)
    return path


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_training_on_a_bad_file_trains_or_names_it(kind, tmp_path, capsys):
    """trainer.main in this process, with the real DALI loader: a process around it would add only start-up (the
    subprocess run below shows the same refusal from real processes)."""
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode bits; the symlink loop covers a file that cannot be opened")
    root, run = tmp_path / "data", tmp_path / "run"
    bad = dataset_with(root, kind)
    _, trains, words = BAD_FILES[kind]
    code = main([*ARGS, "monitor.progress=false", f"data.root={root}", f"run.dir={run}"])
    stderr = capsys.readouterr().err
    assert "nvImageCodec" not in stderr
    checkpoints = list((run / "checkpoints").glob("ckpt-*"))
    if trains:
        assert code == 0, stderr[-3000:]
        assert checkpoints
        return
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"^error( \(on rank \d+\))?: ", stderr, re.M) and bad in stderr, stderr[-3000:]
    for word in words:
        assert word in stderr, stderr[-3000:]
    assert f"python -m data.verify {root} --fix --file-list" in stderr
    assert not checkpoints


@pytest.mark.slow
def test_a_truncated_file_ends_a_real_process_with_the_message_and_exit_1(tmp_path):
    """The kind that fails inside the decoder, in a process of its own: exit 1 and the message, not a crash."""
    root, run = tmp_path / "data", tmp_path / "run"
    bad = dataset_with(root, "truncated")
    result = run_trainer(1, *ARGS, f"data.root={root}", f"run.dir={run}")
    stderr = result.stderr
    assert result.returncode == 1, stderr[-3000:]
    assert "Segmentation fault" not in stderr and "nvImageCodec" not in stderr and "Traceback" not in stderr, \
        stderr[-3000:]
    assert re.search(r"^error( \(on rank \d+\))?: ", stderr, re.M) and f"{bad}: truncated" in stderr, stderr[-3000:]
    assert not list((run / "checkpoints").glob("ckpt-*"))


@pytest.mark.slow
def test_the_rank_that_screens_a_bad_file_stops_every_rank(tmp_path):
    """Each rank screens a share of the files; the trainer's agreement on build_loader's errors stops them all."""
    root, run = tmp_path / "data", tmp_path / "run"
    bad = dataset_with(root, "text")
    result = run_trainer(2, *ARGS, f"data.root={root}", f"run.dir={run}")
    assert result.returncode == 1
    assert result.stderr.count(f"{bad}: not-an-image") == 2, result.stderr[-3000:]  # printed by both ranks
    assert not list((run / "checkpoints").glob("ckpt-*"))


# In process: where each kind is caught, on both file backends.

def config(root, backend="dali", **overrides):
    return DataConfig(root=str(root), backend=backend, image_size=32, val_resize=36, num_threads=1, **overrides)


def loader(root, split="train", backend="dali", rank=0, world_size=1, **overrides):
    return build_loader(config(root, backend, **overrides), split, batch_size=4, rank=rank, world_size=world_size,
                        device=CPU, seed=0)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_file_that_is_not_a_jpeg_or_png_is_refused_before_any_decoding(backend, tmp_path):
    bad = dataset_with(tmp_path, "text")
    with pytest.raises(DataError, match=re.escape(f"{bad}: not-an-image")):
        loader(tmp_path, backend=backend)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_truncated_jpeg_is_named_when_its_batch_fails(backend, split, tmp_path):
    make_coded(str(tmp_path), train_per_class=4, val_per_class=4)
    bad = tmp_path / split / "n02" / "img01.jpg"
    bad.write_bytes(JPEG[:len(JPEG) // 2])
    with pytest.raises(DataError, match=re.escape(f"{bad}: truncated")) as error:
        list(loader(tmp_path, split, backend))
    assert "nvImageCodec" not in str(error.value)
    fix = f"--fix --file-list {tmp_path}/train_files.txt`" if split == "train" else "--fix`"
    assert f"python -m data.verify {tmp_path} {fix}" in str(error.value)


def test_a_resumed_loader_names_the_file_of_the_batch_it_stopped_at(tmp_path):
    make_coded(str(tmp_path), train_per_class=4, val_per_class=1)
    first = loader(tmp_path)
    bad = first._image_list.paths()[train_shard(12, 4, 0, 1, 0, 0)[2 * 4]]  # in batch 2 of epoch 0
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    resumed = loader(tmp_path)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match=re.escape(f"train batch 2 of epoch 0 failed on:\n  {bad}: truncated")):
        next(iter(resumed))


class _FailingLoader(Loader):
    """Fails when asked for batch `fail_at`, over real files in a fixed order."""

    def __init__(self, images, fail_at, decoded_ahead):
        super().__init__(images.classes, "train", len(images), batch_size=2, rank=0, world_size=1, seed=0)
        self._image_list, self._decoded_ahead, self.fail_at = images, decoded_ahead, fail_at

    def _order(self, epoch):
        return range(self.num_samples)

    def _train_epoch(self, epoch, start):
        for batch in range(start, len(self)):
            if batch == self.fail_at:
                raise RuntimeError("the decoder gave up")
            yield batch


def test_the_batches_decoded_ahead_are_checked_and_an_unexplained_failure_is_kept(tmp_path):
    make_coded(str(tmp_path), train_per_class=2, val_per_class=1)  # 6 files: 3 batches of 2
    images = list_split(str(tmp_path), "train")
    with open(images.paths()[3], "wb"):  # batch 1
        pass
    with pytest.raises(DataError, match=re.escape(f"batch 1 of epoch 0 failed on:\n  {images.paths()[3]}: zero-byte")):
        list(_FailingLoader(images, fail_at=0, decoded_ahead=1))
    with pytest.raises(RuntimeError, match="^the decoder gave up$"):  # batch 1 is not in flight
        list(_FailingLoader(images, fail_at=0, decoded_ahead=0))


@pytest.mark.parametrize("split", ["train", "val"])
def test_each_rank_screens_its_share_of_the_files(split, tmp_path):
    make_coded(str(tmp_path), train_per_class=4, val_per_class=4)
    bad = tmp_path / split / "n03" / "img03.JPEG"
    bad.write_bytes(b"")
    failed = []
    for rank in range(2):
        try:
            loader(tmp_path, split, rank=rank, world_size=2)
        except DataError as error:
            assert f"{bad}: zero-byte" in str(error)
            failed.append(rank)
    assert failed == [1]  # the last of 12 files: train files 1, 3, .. and the val slice 6..11 are rank 1's


def test_the_files_of_a_verified_list_are_not_screened_again(tmp_path, monkeypatch):
    make_coded(str(tmp_path), train_per_class=4, val_per_class=1)
    file_list = tmp_path / "train_files.txt"
    file_list.write_text("".join(f"{f}\n" for f in list_split(str(tmp_path), "train").files))
    screened = []
    monkeypatch.setattr(data.build, "screen", lambda paths: screened.extend(paths) or [])
    loader(tmp_path, "train", file_list=str(file_list))
    assert screened == []
    loader(tmp_path, "val", file_list=str(file_list))
    assert len(screened) == 3


@pytest.mark.parametrize("mode,image_format", [("RGB", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")])
def test_png_cmyk_and_grayscale_files_decode_to_their_rgb_pixels(mode, image_format, tmp_path):
    index = make_coded(str(tmp_path), train_per_class=4, val_per_class=1)
    for path in list_split(str(tmp_path), "train").paths():
        with Image.open(path) as image:
            image.convert(mode).save(path, image_format)
    expected = {}
    for path, (_, code) in zip(list_split(str(tmp_path), "train").paths(), index["train"]):
        with Image.open(path) as image:
            expected[code] = np.asarray(image.convert("RGB"))[0, 0] - np.array(SEED_MEAN)
    seen = []
    for images, _ in loader(tmp_path):
        for image in images:
            centre = image[:, 16, 16].numpy()
            code = min(expected, key=lambda c: np.abs(expected[c] - centre).sum())
            assert np.abs(expected[code] - centre).max() < 1.5, (code, expected[code], centre)
            seen.append(code)
    assert len(seen) == 12
    if mode != "L":  # grey levels of neighbouring codes are less than one apart
        assert len(set(seen)) == 12
