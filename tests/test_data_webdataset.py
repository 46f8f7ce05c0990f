"""The webdataset loader on the CPU, for real: what it reads, per-epoch order, exact val, bitwise resume, bad shards."""
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from common.errors import ConfigError, DataError
from data.build import build_loader, merge_states
from data.config import DataConfig
from data.make_shards import make_shards, write_shard
from data.webdataset import parse_label
from tests.helpers import codes, main_in_process, make_coded, roundtrip, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """24 train images of 3 classes and 11 val images (each a colour that names it), in shards of about 3 samples."""
    root = tmp_path_factory.mktemp("coded")
    index = make_coded(str(root / "images"), val_per_class=4)
    (root / "images/val/n03/img03.jpeg").unlink()
    index["val"] = index["val"][:-1]
    make_shards(root / "images", root / "shards", shard_size=3 * 2560, workers=1)
    return root, index


def loader(root, split="train", batch_size=4, rank=0, world_size=1, seed=0, channels_last=False, **overrides):
    cfg = DataConfig(root=str(root), format="webdataset", image_size=32, val_resize=36, num_threads=2, **overrides)
    return build_loader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, device=CPU, seed=seed,
                        channels_last=channels_last)


def samples(batches) -> list:
    return [(int(label), code) for images, labels in batches for label, code in zip(labels, codes(images))]


def test_there_are_several_shards(coded):
    root, _ = coded
    assert len(list((root / "shards").glob("train-*.tar"))) >= 6


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_epoch_reads_what_the_folder_loader_reads(coded, world_size):
    root, index = coded
    ours, folder = [], []
    for rank in range(world_size):
        ours += samples(loader(root / "shards", rank=rank, world_size=world_size))
        folder += samples(build_loader(DataConfig(root=str(root / "images"), image_size=32, val_resize=36), "train",
                                       batch_size=4, rank=rank, world_size=world_size, device=CPU, seed=0))
    assert Counter(ours) == Counter(folder) == Counter(index["train"])


def test_plain_file_reads_give_the_same_batches(coded):
    root, _ = coded
    for split in ("train", "val"):
        mapped, plain = run(loader(root / "shards", split), 3), run(loader(root / "shards", split, mmap=False), 3)
        assert all(torch.equal(a, b) for batch, other in zip(mapped, plain) for a, b in zip(batch, other))


def test_each_epoch_reads_in_another_order_and_each_rank_other_images(coded):
    root, _ = coded
    alone = loader(root / "shards")
    first, second = samples(alone), samples(alone)
    assert sorted(first) == sorted(second) and first != second
    rank0 = loader(root / "shards", rank=0, world_size=2)
    epochs = [samples(rank0) for _ in range(2)]
    assert set(epochs[0]).isdisjoint(epochs[1])  # the reader moved on to the other rank's slice


def test_batches_that_do_not_divide_the_shards_are_equal_and_full_on_every_rank(coded):
    root, _ = coded
    ranks = [loader(root / "shards", rank=r, world_size=2, batch_size=5) for r in range(2)]  # 24 = 2 x 2 x 5 + 4
    for _ in range(3):  # the rest of each reader epoch is dropped, so every epoch starts at the reader's next
        seen = []
        for shard in ranks:
            batches = list(shard)
            assert len(shard) == len(batches) == 2 and all(images.shape[0] == 5 for images, _ in batches)
            seen += samples(batches)
        assert len(seen) == len(set(seen)) == 20


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_counts_every_image_once_across_ranks(coded, world_size):
    root, index = coded
    seen = []
    for rank in range(world_size):
        val = loader(root / "shards", "val", batch_size=2, rank=rank, world_size=world_size)
        for _ in range(2):  # the same again in the next pass
            batches = list(val)
            assert len(batches) == len(val)
            got = samples(batches)
        seen += got
    assert len(index["val"]) == 11 and sorted(seen) == sorted(index["val"])


OPTIONS = {"batch_size": 5, "rank": 1, "world_size": 2, "prefetch": 3}  # 2 batches an epoch, 1 of the reader's dropped


@pytest.mark.parametrize("stop", [1, 2, 3, 5])  # mid-epoch 0, at its end, mid-epoch 1, mid-epoch 2
def test_resume_is_bitwise_identical(coded, stop):
    root, _ = coded
    expected = run(loader(root / "shards", **OPTIONS), 8)
    first = loader(root / "shards", **OPTIONS)
    for (x, y), (ex, ey) in zip(run(first, stop), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    resumed = loader(root / "shards", **OPTIONS)
    resumed.load_state_dict(roundtrip(merge_states([first.state_dict()])))
    for (x, y), (ex, ey) in zip(run(resumed, 8 - stop), expected[stop:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_restored_loader_saves_the_same_state_before_it_is_iterated(coded):
    root, _ = coded
    first = loader(root / "shards", **OPTIONS)
    run(first, 3)
    state = roundtrip(first.state_dict())
    restored = loader(root / "shards", **OPTIONS)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_resume_on_another_world_size_is_refused_mid_epoch_and_covers_the_epoch_at_its_start(coded):
    root, _ = coded
    ranks = [loader(root / "shards", rank=r, world_size=2) for r in range(2)]
    for shard in ranks:
        run(shard, 1)
    with pytest.raises(DataError, match="cannot be re-split over world size 1 x batch size 8.*Resume with 2 processes"):
        loader(root / "shards", batch_size=8).load_state_dict(merge_states([s.state_dict() for s in ranks]))
    for shard in ranks:
        run(shard, 2)  # to the end of epoch 0
    alone = loader(root / "shards", batch_size=8)
    alone.load_state_dict(roundtrip(merge_states([s.state_dict() for s in ranks])))
    assert alone.state_dict()["epoch"] == 1
    assert len(set(samples(alone))) == 24


def test_a_state_of_another_pipeline_starts_a_new_reader_at_an_epoch_start_and_is_refused_mid_epoch(coded):
    # DALI's checkpointing documentation: restoring a checkpoint into a pipeline of another definition is undefined
    # behaviour. train.channels_last (the output layout) may change on resume.
    root, _ = coded
    first = loader(root / "shards", **OPTIONS)
    run(first, 1)
    with pytest.raises(DataError, match=r"output_layout 'CHW' \(now 'HWC'\).*from a checkpoint at an epoch's end"):
        loader(root / "shards", channels_last=True, **OPTIONS).load_state_dict(roundtrip(first.state_dict()))
    # A state saved before states recorded their pipeline: a new reader would lose the rest of the epoch, so it is
    # restored, as it was then.
    unrecorded = roundtrip(first.state_dict())
    del unrecorded["dali_pipeline"]
    trusted = loader(root / "shards", **OPTIONS)
    trusted.load_state_dict(unrecorded)
    for (x, y), (ex, ey) in zip(run(trusted, 1), run(first, 1)):  # to the end of epoch 0
        assert torch.equal(x, ex) and torch.equal(y, ey)
    state = roundtrip(first.state_dict())
    resumed = loader(root / "shards", channels_last=True, **OPTIONS)
    resumed.load_state_dict(state)
    fresh = loader(root / "shards", channels_last=True, **OPTIONS)  # a new reader at epoch 1
    fresh.load_state_dict({k: v for k, v in state.items() if k not in ("dali_checkpoints", "dali_pipeline")})
    for (x, y), (ex, ey) in zip(run(resumed, 4), run(fresh, 4)):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_resume_needs_this_ranks_checkpoint(coded):
    root, _ = coded
    rank0 = loader(root / "shards", rank=0, world_size=2)
    run(rank0, 1)
    with pytest.raises(DataError, match="not for rank 1"):
        loader(root / "shards", rank=1, world_size=2).load_state_dict(rank0.state_dict())


@pipeline_def(batch_size=8, num_threads=1, device_id=None)
def labels_of(texts):
    return parse_label(fn.external_source(lambda: [np.frombuffer(t, np.uint8) for t in texts], dtype=types.UINT8,
                                          batch=True))


def test_cls_text_is_parsed_and_anything_but_a_decimal_label_is_minus_one():
    texts = [b"0", b"7", b"12345", b"999999999", b"", b"12a", b"1234567890", b"-3"]
    pipe = labels_of(texts)
    pipe.build()
    assert [int(np.asarray(x)) for x in pipe.run()[0]] == [0, 7, 12345, 999999999, -1, -1, -1, -1]


@pytest.fixture
def shards(coded, tmp_path) -> Path:
    """A copy of the coded shards to damage."""
    return Path(shutil.copytree(coded[0] / "shards", tmp_path / "shards"))


def rewrite(shards: Path, name: str, edit):
    """Rewrites shard `name` with edit(number, members) of each sample (members: [(ext, bytes)]) and records it in the
    manifest as make_shards would: a consistent shard directory with a bad sample in it."""
    with tarfile.open(shards / f"{name}.tar") as tar:
        grouped = {}
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            grouped.setdefault(key, []).append((ext, tar.extractfile(member).read()))
    entry = write_shard(shards, name, [(key, edit(number, members))
                                       for number, (key, members) in enumerate(grouped.items())])
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        split["shards"] = [entry if s["name"] == name else s for s in split["shards"]]
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_a_missing_manifest_is_named_with_the_folder_format_hint(coded):
    root, _ = coded
    with pytest.raises(DataError, match="manifest.json does not exist.*data.format=folder"):
        loader(root / "images")


def test_an_unfinished_directory_is_refused(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["complete"] = False
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="make_shards has not finished writing"):
        loader(shards)


def test_a_missing_index_is_named(shards):
    (shards / "train-000002.idx").unlink()
    with pytest.raises(DataError, match="train-000002.idx is missing: the index of shard .*train-000002.tar"):
        loader(shards)


def test_a_truncated_tar_is_named_with_the_first_sample_cut(shards):
    data = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(data[:3000])
    with pytest.raises(DataError, match=r"train-000001.tar is truncated: 3000 bytes.*first sample cut is n0\d/"):
        loader(shards)


def test_a_sample_without_its_label_is_named(shards):
    rewrite(shards, "train-000003", lambda number, members: members[:1] if number == 1 else members)
    with pytest.raises(DataError, match=r"shard .*train-000003.tar: sample 'n0\d/img\d\d' \(line 2 of .*\) has "
                                        r"members \['jpg'\]: a sample needs an image"):
        loader(shards)


def test_a_label_that_is_not_a_class_fails_the_batch(shards):
    for number in range(len(list(shards.glob("train-*.tar")))):
        rewrite(shards, f"train-{number:06d}", lambda _, members: [(e, b"17" if e == "cls" else d)
                                                                    for e, d in members])
    with pytest.raises(DataError, match=r"has a .cls that is not a label in \[0, 3\)"):
        run(loader(shards), 1)


def test_an_image_damaged_inside_a_shard_fails_its_batch_and_verify_names_the_shard(shards, capsys):
    from data.make_shards import main
    fields = (shards / "train-000002.idx").read_text().splitlines()[2].split()
    offset, size = int(fields[1]), int(fields[2])
    with open(shards / "train-000002.tar", "r+b") as f:  # same size, same index: only the sha256 tells
        f.seek(offset + size // 2)
        f.write(bytes(size // 2 - 2))
    with pytest.raises(DataError, match=rf"decoding a train batch from the shards in {shards} failed \(.+\): "
                                        rf"make_shards decoded every image.*--verify {shards}` names it"):
        run(loader(shards), 6)
    assert main(["--verify", str(shards)]) == 1
    assert f"{shards / 'train-000002.tar'}: sha256 differs" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["size", "content", "index"])
def test_a_shard_that_differs_from_the_manifest_is_named(shards, damage):
    tar, index = shards / "train-000004.tar", shards / "train-000004.idx"
    if damage == "size":
        tar.write_bytes(tar.read_bytes() + bytes(10240))
        match = rf"shard {tar} is \d+ bytes, the manifest says \d+: a shard of another dataset"
    elif damage == "content":  # another shard's tar: the same size, other samples
        shutil.copy(shards / "train-000000.tar", tar)
        assert tar.stat().st_size == (shards / "train-000000.tar").stat().st_size
        match = rf"shard {tar} does not hold n0\d/img\d\d.jpg at byte 512 as its index says"
    else:
        index.write_text(index.read_text().replace("v1.2 3", "v1.2 4"))
        match = rf"index {index} differs from the manifest's sha256 \(it declares 'v1.2 4', the manifest v1.2 3\)"
    with pytest.raises(DataError, match=match):
        loader(shards)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.format: got 'tar'"):
        DataConfig(format="tar")
    with pytest.raises(ConfigError, match="data.format: webdataset shards are read by data.backend=dali"):
        DataConfig(format="webdataset", backend="torchvision")
    with pytest.raises(ConfigError, match="data.file_list:.*make_shards --file-list"):
        DataConfig(format="webdataset", file_list="x.txt")


def test_the_trainer_exits_1_on_a_bad_shard_directory_and_2_on_a_bad_format(coded, tmp_path, capsys):
    root, _ = coded
    code, _, err = main_in_process(["data.format=webdataset", f"data.root={root / 'images'}",
                                    f"run.dir={tmp_path / 'r'}", "monitor.wandb=false"], capsys)
    assert code == 1 and "manifest.json does not exist" in err, err[-2000:]
    code, _, err = main_in_process(["data.format=tar", f"data.root={root / 'shards'}", f"run.dir={tmp_path / 'r'}"],
                                   capsys)
    assert code == 2 and "data.format: got 'tar'" in err
