"""data.prepare_cifar on small archives in the official format: pixels and labels exact, deterministic, resumable
after SIGKILL, pickled code refused, damaged archives named."""
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError
from data.folder import list_split
from data.prepare_cifar import CIFAR10, CIFAR100, HANG_ENV, PARTIAL, main, prepare_cifar
from tests.helpers import ROOT, trainer_env, wait_for

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes and str as Python 2 str (BINSTRING), as the official files were written: Python 3 pickles
    bytes under protocol 2 as calls to _codecs.encode, a global the official files never name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        prefix = pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(data))
        self.write(prefix + data)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_python2_str


def _pickle(obj, numpy1: bool = True) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    # The official files name numpy 1's module; numpy 2 writes numpy._core.
    return out.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if numpy1 else out.getvalue()


def _batch(rng, labels, labels_key: bytes) -> dict:
    return {b"batch_label": b"a batch", labels_key: [int(label) for label in labels],
            b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % k for k in range(len(labels))]}


def _cifar10_members(seed: int = 0) -> dict:
    """Member name -> object: the 10 official classes, 2 train images a class (5 batches of 4), 1 test image."""
    rng = np.random.default_rng(seed)
    train = rng.permutation(20) % 10
    members = {f"cifar-10-batches-py/data_batch_{i + 1}": _batch(rng, train[4 * i:4 * i + 4], b"labels")
               for i in range(5)}
    members["cifar-10-batches-py/test_batch"] = _batch(rng, rng.permutation(10), b"labels")
    members["cifar-10-batches-py/batches.meta"] = {b"num_cases_per_batch": 4, b"label_names": CIFAR10_NAMES,
                                                   b"num_vis": 3072}
    return members


def _cifar100_members() -> dict:
    """100 fine classes in 2 coarse ones, 2 train and 1 test image a fine class; the coarse labels differ."""
    rng = np.random.default_rng(1)
    members = {}
    for split, n in (("train", 200), ("test", 100)):
        fine = rng.permutation(n) % 100
        members[f"cifar-100-python/{split}"] = _batch(rng, fine, b"fine_labels")
        members[f"cifar-100-python/{split}"][b"coarse_labels"] = [int(f < 50) for f in fine]
    members["cifar-100-python/meta"] = {b"fine_label_names": [b"fine_%d" % k for k in range(100)],
                                        b"coarse_label_names": [b"coarse_0", b"coarse_1"]}
    return members


def _write_archive(path: Path, members: dict, numpy1: bool = True) -> Path:
    # Directory and readme first, meta last: the official archives keep no useful order either.
    folder = next(iter(members)).split("/")[0]
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(_dir_info(folder))
        for name, obj in {f"{folder}/readme.html": b"<html></html>", **members}.items():
            data = obj if isinstance(obj, bytes) else _pickle(obj, numpy1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _official(members: dict, batches, labels_key: bytes):
    """The split's images (N x 32 x 32 x 3) and labels, in the official order."""
    data = np.concatenate([members[b][b"data"] for b in batches])
    labels = [label for b in batches for label in members[b][labels_key]]
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def cifar10_tar(tmp_path) -> Path:
    return _write_archive(tmp_path / "cifar-10-python.tar.gz", _cifar10_members())


def test_cifar10_pixels_and_labels_round_trip(cifar10_tar, tmp_path):
    out = tmp_path / "cifar10"
    assert prepare_cifar(cifar10_tar, out) == {"dataset": "CIFAR-10", "train": 20, "val": 10}
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    folders = [f"{k:02d}_{name.decode()}" for k, name in enumerate(CIFAR10_NAMES)]
    members = _cifar10_members()
    for split in ("train", "val"):
        images, labels = _official(members, CIFAR10.batches[split], b"labels")
        listed = list_split(str(out), split)
        assert listed.classes == folders
        indices = [int(Path(f).stem) for f in listed.files]
        assert sorted(indices) == list(range(len(labels)))
        assert listed.labels == [labels[i] for i in indices]
        for path, i in zip(listed.paths(), indices):
            with Image.open(path) as png:
                assert png.format == "PNG" and png.mode == "RGB"
                assert np.array_equal(np.asarray(png), images[i]), path


def test_cifar100_gets_the_fine_labels(tmp_path):
    members = _cifar100_members()
    archive = _write_archive(tmp_path / "cifar-100-python.tar.gz", members, numpy1=False)
    out = tmp_path / "cifar100"
    assert prepare_cifar(archive, out) == {"dataset": "CIFAR-100", "train": 200, "val": 100}
    for split in ("train", "val"):
        images, fine = _official(members, CIFAR100.batches[split], b"fine_labels")
        listed = list_split(str(out), split)
        assert listed.classes[0] == "000_fine_0" and listed.classes[-1] == "099_fine_99"
        assert listed.labels == [fine[int(Path(f).stem)] for f in listed.files]
        first = next(i for i, f in enumerate(listed.files) if Path(f).stem == "00000")
        assert np.array_equal(np.asarray(Image.open(listed.paths()[first])), images[0])


def test_two_runs_give_the_same_bytes_and_a_rerun_changes_nothing(cifar10_tar, tmp_path):
    prepare_cifar(cifar10_tar, tmp_path / "a")
    prepare_cifar(_write_archive(tmp_path / "again.tar.gz", _cifar10_members()), tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    assert prepare_cifar(cifar10_tar, tmp_path / "a") == {"dataset": "CIFAR-10", "train": 0, "val": 0}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == stamps


def test_a_half_written_split_is_redone(cifar10_tar, tmp_path):
    reference = tmp_path / "reference"
    prepare_cifar(cifar10_tar, reference)
    out = tmp_path / "out"
    prepare_cifar(cifar10_tar, out)
    # What an interrupted val pass leaves: the partial folder, short of images, with a cut file.
    (out / PARTIAL).mkdir()
    (out / "val").rename(out / PARTIAL / "val")
    pngs = sorted((out / PARTIAL / "val").rglob("*.png"))
    pngs[0].unlink()
    pngs[1].write_bytes(pngs[1].read_bytes()[:20])
    train = _tree(out / "train")
    assert prepare_cifar(cifar10_tar, out) == {"dataset": "CIFAR-10", "train": 0, "val": 10}
    assert _tree(out) == _tree(reference)
    assert _tree(out / "train") == train


def _command(archive: Path, out: Path) -> list:
    return [sys.executable, "-m", "data.prepare_cifar", str(archive), "--out", str(out)]


@pytest.mark.slow
def test_sigkill_mid_split_then_the_same_command_gives_the_same_bytes(cifar10_tar, tmp_path):
    reference = tmp_path / "reference"
    prepare_cifar(cifar10_tar, reference)
    out = tmp_path / "out"
    # The run stops after the first val image: killed then, train is in place and val half-written.
    proc = subprocess.Popen(_command(cifar10_tar, out), cwd=ROOT, env=trainer_env(**{HANG_ENV: "val"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def stopped_mid_val():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            return (out / "train").is_dir() and any((out / PARTIAL / "val").rglob("*.png"))
        wait_for(stopped_mid_val, 60, "the first val image")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "val").exists()
    train = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "train").rglob("*")}

    result = subprocess.run(_command(cifar10_tar, out), cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 0 train and 10 val images" in result.stdout
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "train").rglob("*")} == train
    assert _tree(out) == _tree(reference)


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("member", ["cifar-10-batches-py/batches.meta", "cifar-10-batches-py/data_batch_2"])
def test_a_pickle_that_calls_a_function_is_refused_and_runs_nothing(tmp_path, member):
    def payload(marker: Path) -> bytes:
        return _pickle({b"data": _RunsShell(f"touch {marker}"), b"label_names": CIFAR10_NAMES})
    # The payload is live: a plain unpickler runs it.
    pickle.loads(payload(tmp_path / "plain_pickle_ran"), encoding="bytes")
    assert (tmp_path / "plain_pickle_ran").exists()

    members = _cifar10_members()
    members[member] = payload(tmp_path / "prepare_cifar_ran")
    archive = _write_archive(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match=f"cifar-10-python.tar.gz: {member}: refused to load the global posix.system"):
        prepare_cifar(archive, tmp_path / "out")
    assert not (tmp_path / "prepare_cifar_ran").exists()
    assert not (tmp_path / "out" / "train").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:len(data) // 2], "corrupt or truncated in or after cifar-10-batches-py/"),
    # Random pixels do not compress: the flipped bytes land in stored blocks, which only the gzip CRC checks.
    (lambda data: data[:5000] + bytes(b ^ 0x55 for b in data[5000:5100]) + data[5100:],
     r"corrupt or truncated \(CRC check failed"),
    (lambda data: b"not a gzip file at all", "corrupt or truncated"),
])
def test_a_damaged_archive_is_named(cifar10_tar, tmp_path, damage, message):
    cifar10_tar.write_bytes(damage(cifar10_tar.read_bytes()))
    with pytest.raises(DataError, match=f"{cifar10_tar}: {message}"):
        prepare_cifar(cifar10_tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({b"data": np.zeros((4, 3071), np.uint8)}, r"b'data' is \(4, 3071\) uint8, expected N x 3072 uint8"),
    ({b"data": np.zeros((4, 3072), np.float32)}, r"b'data' is \(4, 3072\) float32"),
    ({b"labels": [0, 1, 2]}, r"3 labels under b'labels' for 4 images"),
    ({b"labels": [0, 1, 2, 10]}, "label 10 is not one of the 10 classes"),
])
def test_a_malformed_batch_is_named(tmp_path, change, message):
    members = _cifar10_members()
    members["cifar-10-batches-py/data_batch_3"].update(change)
    archive = _write_archive(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match=f"cifar-10-python.tar.gz: cifar-10-batches-py/data_batch_3: {message}"):
        prepare_cifar(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists()


def test_an_archive_that_is_neither_or_lacks_a_batch_is_named(tmp_path):
    other = _write_archive(tmp_path / "other.tar.gz", {"photos/cat.jpg": b"..."})
    with pytest.raises(DataError, match="other.tar.gz: is neither cifar-10-python.tar.gz nor cifar-100-python"):
        prepare_cifar(other, tmp_path / "out")
    members = _cifar10_members()
    del members["cifar-10-batches-py/data_batch_5"]
    short = _write_archive(tmp_path / "short.tar.gz", members)
    with pytest.raises(DataError, match="short.tar.gz: CIFAR-10 archive without cifar-10-batches-py/data_batch_5"):
        prepare_cifar(short, tmp_path / "out")


def test_an_out_that_is_not_ours_is_refused(cifar10_tar, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(DataError, match="notes: is not empty and not data.prepare_cifar's output"):
        prepare_cifar(cifar10_tar, notes)
    imagenet = tmp_path / "imagenet"
    (imagenet / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(DataError, match="does not hold the 10 CIFAR-10 class folders"):
        prepare_cifar(cifar10_tar, imagenet)
    cifar100 = _write_archive(tmp_path / "cifar-100-python.tar.gz", _cifar100_members())
    prepare_cifar(cifar100, tmp_path / "out")
    with pytest.raises(DataError, match="does not hold the 10 CIFAR-10 class folders"):
        prepare_cifar(cifar10_tar, tmp_path / "out")
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert sorted(p.name for p in imagenet.rglob("*")) == ["n01440764", "train"]


def test_cli(cifar10_tar, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "python -m trainer.main --config configs/resnet_cifar10.yaml data.root=OUT" in help_text
    assert "python -m data.make_shards OUT --out DIR" in help_text
    with pytest.raises(SystemExit) as exit_info:
        main([str(cifar10_tar)])
    assert exit_info.value.code == 2
    assert main([str(cifar10_tar), "--out", str(tmp_path / "out")]) == 0
    assert "wrote 20 train and 10 val images of CIFAR-10" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "other")]) == 2
    assert "missing.tar.gz: archive not found" in capsys.readouterr().err
