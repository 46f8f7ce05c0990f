"""data.make_shards: deterministic, resumable after SIGKILL, what the manifest and index hold, bad images left out."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from common.errors import DataError
from data.folder import list_split
from data.make_demo_dataset import DemoParams
from data.make_shards import HANG_ENV, PLAN, ensure_demo_shards, main, make_shards, sample_key
from tests.helpers import ROOT, encoded, trainer_env, wait_for

SHARD = 200_000  # the tiny_shards fixture's


def files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def shards(tiny_shards) -> Path:
    return tiny_shards


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_two_runs_are_byte_identical_whatever_the_workers(tiny_data, shards, tmp_path):
    make_shards(tiny_data, tmp_path, shard_size=SHARD, workers=2)
    ours, theirs = files(tmp_path), files(shards)
    assert ours.keys() == theirs.keys() and sum(name.endswith(".tar") for name in ours) > 4
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_the_manifest_counts_and_hashes_every_shard(tiny_data, shards):
    manifest = manifest_of(shards)
    assert manifest["format_version"] == 1 and manifest["tool_version"] == 1 and manifest["complete"]
    assert manifest["source"] == str(Path(tiny_data).resolve())
    for split in ("train", "val"):
        listing = list_split(str(tiny_data), split)
        assert manifest["classes"] == listing.classes
        entry = manifest["splits"][split]
        assert entry["samples"] == len(listing) == sum(s["samples"] for s in entry["shards"])
        assert entry["skipped"] == []
        assert [s["name"] for s in entry["shards"]] == [f"{split}-{n:06d}" for n in range(len(entry["shards"]))]
        for shard in entry["shards"]:
            for ext, what in ((".tar", "tar"), (".idx", "index")):
                data = (shards / (shard["name"] + ext)).read_bytes()
                assert len(data) == shard[f"{what}_bytes"] <= SHARD + 10240
                assert hashlib.sha256(data).hexdigest() == shard[f"{what}_sha256"]


def members(tar_path: Path) -> list:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


def test_samples_hold_an_image_and_the_folder_label_and_train_is_shuffled_across_shards(tiny_data, shards):
    listing = list_split(str(tiny_data), "train")
    label_of = {sample_key(f): label for f, label in zip(listing.files, listing.labels)}
    seen = []
    for tar_path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            entries = tar.getmembers()
            assert [m.name.rsplit(".", 1)[1] for m in entries] == ["jpg", "cls"] * (len(entries) // 2)
            assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == "" and m.mode == 0o644
                       for m in entries)
            for image, label in zip(entries[::2], entries[1::2]):
                key = image.name[:-len(".jpg")]
                assert label.name == f"{key}.cls" and int(tar.extractfile(label).read()) == label_of[key]
                seen.append(key)
    assert sorted(seen) == sorted(label_of)
    first = [label_of[k] for k in seen[:10]]
    assert len(set(first)) > 1, "the first shard holds one class: not shuffled"
    val_keys = [m.name[:-len(".jpg")] for p in sorted(shards.glob("val-*.tar")) for m in members(p)[::2]]
    assert val_keys == [sample_key(f) for f in list_split(str(tiny_data), "val").files]


def test_the_index_is_what_dalis_wds2idx_writes(shards, tmp_path):
    from wds2idx import IndexCreator
    for tar_path in sorted(shards.glob("*.tar"))[:3]:
        with IndexCreator(str(tar_path), str(tmp_path / "wds2idx.idx"), verbose=False) as creator:
            creator.create_index()
        assert (tmp_path / "wds2idx.idx").read_bytes() == tar_path.with_suffix(".idx").read_bytes()


def test_undecodable_files_are_skipped_named_and_recorded_png_and_cmyk_go_in(tmp_path, capsys):
    root = tmp_path / "root"
    good = encoded(seed=1)
    files_ = {"train/a/ok.JPEG": good, "train/a/cut.JPEG": good[:len(good) // 2], "train/b/empty.JPEG": b"",
              "train/b/png.JPEG": encoded("RGB", "PNG", seed=2), "train/b/cmyk.JPEG": encoded("CMYK", seed=3),
              "val/a/v.JPEG": good, "val/b/v.jpg": encoded(seed=4)}
    for path, data in files_.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    assert main([str(root), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped truncated: train/a/cut.JPEG" in err and "skipped zero-byte: train/b/empty.JPEG" in err
    train = manifest_of(tmp_path / "out")["splits"]["train"]
    assert train["samples"] == 3 and sorted(s["path"] for s in train["skipped"]) == ["train/a/cut.JPEG",
                                                                                      "train/b/empty.JPEG"]
    names = sorted(m.name for m in members(tmp_path / "out" / "train-000000.tar"))
    assert names == ["a/ok.cls", "a/ok.jpg", "b/cmyk.cls", "b/cmyk.jpg", "b/png.cls", "b/png.png"]


def test_keys_are_the_paths_with_the_dots_and_blanks_dalis_index_cannot_take_replaced():
    assert sample_key("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert sample_key("my class/a b.c.jpg") == "my_class/a_b_c"
    assert sample_key("c/.hidden.jpeg") == "c/_hidden"


def test_two_files_with_the_same_key_are_refused(tmp_path):
    for path in ("train/a/x.y.JPEG", "train/a/x_y.JPEG", "val/a/v.JPEG"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(encoded())
    with pytest.raises(DataError, match="both become the key 'a/x_y'"):
        make_shards(tmp_path, tmp_path / "out", workers=1)


def command(source, out, *extra) -> list:
    return [sys.executable, "-m", "data.make_shards", str(source), "--out", str(out), "--shard-size", str(SHARD) + "B",
            "--workers", "2", *extra]


@pytest.mark.slow
def test_sigkill_mid_shard_then_the_same_command_finishes_byte_identically(tiny_data, shards, tmp_path):
    out = tmp_path / "out"
    # The worker writing shard 5 stops after its first sample: killed then, the run has finished shards, a partial
    # temporary file and shards not begun.
    proc = subprocess.Popen(command(tiny_data, out), cwd=ROOT, env=trainer_env(**{HANG_ENV: "train-000005"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def stopped_mid_shard():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            return (out / ".train-000005.tar.tmp").is_file() and (out / "train-000000.tar").is_file()
        wait_for(stopped_mid_shard, 120, "shard 5 to be begun")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    recorded = manifest_of(out)
    assert not recorded["complete"]
    finished = {s["name"] for s in recorded["splits"]["train"]["shards"]}
    assert finished and "train-000005" not in finished
    before = {name: (out / f"{name}.tar").stat().st_mtime_ns for name in finished}

    result = subprocess.run(command(tiny_data, out), cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {name: (out / f"{name}.tar").stat().st_mtime_ns for name in finished} == before, "rewrote finished shards"
    ours, theirs = files(out), files(shards)
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_a_rerun_rewrites_a_missing_shard_and_verify_finds_a_changed_one(tiny_data, shards, tmp_path, capsys):
    out = tmp_path / "out"
    for name, data in files(shards).items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    (out / "val-000001.tar").unlink()
    make_shards(tiny_data, out, shard_size=SHARD, workers=1)
    assert files(out) == files(shards)
    assert main(["--verify", str(out)]) == 0

    data = bytearray((out / "train-000003.tar").read_bytes())
    data[2000] ^= 0xFF
    (out / "train-000003.tar").write_bytes(bytes(data))
    assert main(["--verify", str(out)]) == 1
    assert f"{out / 'train-000003.tar'}: sha256 differs" in capsys.readouterr().out


def test_other_arguments_on_an_existing_directory_are_refused(tiny_data, shards, tmp_path):
    for name, data in files(shards).items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match="made with seed=0 \\(now 1\\)"):
        make_shards(tiny_data, tmp_path, shard_size=SHARD, seed=1, workers=1)
    assert (tmp_path / PLAN).is_file()


def test_help_documents_the_format_and_resuming(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("<key>.cls (the label as an ASCII integer)", "byte-identical to an uninterrupted run",
                  "manifest.json records the format version", "--verify DIR"):
        assert words in text


def test_the_demo_shards_are_written_once(tmp_path):
    params = DemoParams(seed=2, classes=2, train_per_class=6, val_per_class=2)
    ensure_demo_shards(tmp_path / "shards", params)
    manifest = manifest_of(tmp_path / "shards")
    assert manifest["complete"] and manifest["source"] == str((tmp_path / "shards" / "source").resolve())
    assert manifest["splits"]["train"]["samples"] == 12 and manifest["splits"]["val"]["samples"] == 4
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir() if p.is_file()}
    ensure_demo_shards(tmp_path / "shards", params)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir() if p.is_file()} == written
