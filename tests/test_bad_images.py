"""Bad image files fed straight to training, without data.verify: each one trains (a decodable image) or stops the
run with a DataError that names the file and the problem, never a segfault or a bare decoder message."""
import os

import pytest

from tests.conftest import run_trainer
from tests.test_data_helpers import encoded, make_coded

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
def test_training_on_a_bad_file_trains_or_names_it(kind, tmp_path):
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode bits; the symlink loop covers a file that cannot be opened")
    root, run = tmp_path / "data", tmp_path / "run"
    bad = dataset_with(root, kind)
    _, trains, words = BAD_FILES[kind]
    result = run_trainer(1, *ARGS, f"data.root={root}", f"run.dir={run}")
    assert "Segmentation fault" not in result.stderr and "nvImageCodec" not in result.stderr
    checkpoints = list((run / "checkpoints").glob("ckpt-*"))
    if trains:
        assert result.returncode == 0, result.stderr[-3000:]
        assert checkpoints
        return
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: " in result.stderr and bad in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in result.stderr, result.stderr[-3000:]
    assert f"python -m data.verify {root} --fix --file-list" in result.stderr
    assert not checkpoints
