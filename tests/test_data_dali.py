"""The DALI loader on the CPU, for real: preprocessing, sharding, exact evaluation and bitwise resume."""

import numpy as np
import pytest
import torch
from nvidia.dali import Pipeline
from PIL import Image
from torchvision.transforms import v2

from common.errors import DataError
from data.build import build_loader, merge_states
from data.config import SEED_MEAN, TORCHVISION_MEAN, TORCHVISION_STD, DataConfig
from data.dali import image_pipeline
from tests.helpers import code_colour, codes, make_coded, make_smooth, roundtrip, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    return str(root), make_coded(str(root))


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth")
    make_smooth(str(root), per_class=8)  # 24 images a split
    return str(root)


def config(root, **overrides):
    return DataConfig(root=root, image_size=32, val_resize=36, num_threads=2, **overrides)


def loader(root, split="train", batch_size=4, rank=0, world_size=1, seed=0, channels_last=False,
           dtype=torch.float32, **overrides):
    return build_loader(config(root, **overrides), split, batch_size=batch_size, rank=rank,
                        world_size=world_size, device=CPU, seed=seed, channels_last=channels_last, dtype=dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shapes_dtypes_layouts(coded, layout, dtype):
    root, _ = coded
    reference = [x for x, _ in loader(root)]
    batches = list(loader(root, channels_last=layout == "NHWC", dtype=getattr(torch, dtype)))
    assert len(batches) == 6
    for (images, labels), ref in zip(batches, reference):
        assert images.shape == (4, 3, 32, 32) and images.dtype == getattr(torch, dtype)
        assert labels.shape == (4,) and labels.dtype == torch.int64
        if layout == "NHWC":
            assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        else:
            assert images.is_contiguous()
        # Same seed, same draws: only the memory layout and the precision differ.
        if dtype == "float32":
            assert torch.equal(images, ref)
        else:
            assert torch.allclose(images.float(), ref, atol=1.0)


@pytest.mark.parametrize("mean,std", [(SEED_MEAN, None), (TORCHVISION_MEAN, TORCHVISION_STD)])
@pytest.mark.parametrize("split", ["train", "val"])
def test_normalization_of_solid_colours(coded, mean, std, split):
    root, index = coded
    expected = {code: (np.array(code_colour(code)) - mean) / (std or 1.0) for _, code in index[split]}
    tolerance = 2.5 / (std[0] if std else 1.0)  # JPEG rounding of a solid colour
    for images, labels in loader(root, split, mean=mean, std=std):
        for image, label, code in zip(images, labels, codes(images, mean, std)):
            per_channel = torch.tensor(expected[code], dtype=torch.float32).view(3, 1, 1)
            assert (image - per_channel).abs().max() < tolerance
            assert label == {c: lab for lab, c in index[split]}[code]


def test_val_matches_torchvision_resize_center_crop(tmp_path):
    make_smooth(str(tmp_path))
    cfg = config(str(tmp_path))
    batches = list(build_loader(cfg, "val", batch_size=4, rank=0, world_size=1, device=CPU, seed=0))
    ours = torch.cat([x for x, _ in batches])
    reference = v2.Compose([v2.Resize(cfg.val_resize), v2.CenterCrop(cfg.image_size)])
    paths = sorted((tmp_path / "val").glob("*/*.JPEG"))
    theirs = torch.stack([
        reference(v2.functional.pil_to_tensor(Image.open(p).convert("RGB"))).float()
        - torch.tensor(SEED_MEAN).view(3, 1, 1) for p in paths
    ])
    assert ours.shape == theirs.shape
    difference = (ours - theirs).abs()
    assert difference.mean() < 0.5 and difference.max() < 8, (difference.mean(), difference.max())


def test_train_shards_cover_each_file_once_and_reshuffle(coded):
    root, index = coded
    ranks = [loader(root, rank=r, world_size=2, batch_size=4) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    epochs = []
    for _ in range(2):
        per_rank = [[c for images, _ in shard for c in codes(images)] for shard in ranks]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(code for _, code in index["train"])
        epochs.append(per_rank)
    assert epochs[0][0] != epochs[1][0] and set(epochs[0][0]) != set(epochs[1][0])
    augment_draws = [next(iter(loader(root, rank=r, world_size=2)))[0] for r in range(2)]
    assert not torch.equal(augment_draws[0], augment_draws[1])


def test_uneven_split_gives_equal_full_batches_per_rank(coded):
    root, _ = coded
    ranks = [loader(root, rank=r, world_size=2, batch_size=5) for r in range(2)]  # 24 images, 2 x 5 per step
    seen = []
    for shard in ranks:
        batches = list(shard)
        assert len(shard) == len(batches) == 2
        assert all(images.shape[0] == 5 for images, _ in batches)
        seen += [c for images, _ in batches for c in codes(images)]
    assert len(seen) == len(set(seen)) == 20


def test_val_is_exact_across_two_ranks(coded):
    root, index = coded
    samples = []
    for rank in range(2):
        val = loader(root, "val", batch_size=2, rank=rank, world_size=2)
        batches = list(val)
        assert len(batches) == len(val)
        samples += [(label, code) for images, labels in batches for label, code in zip(labels.tolist(), codes(images))]
    assert sorted(samples) == sorted(index["val"])  # 9 images over 2 ranks: each once, no padding


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


# On the smooth images: a crop or a flip of a solid colour (the coded set) looks alike whatever the draw was.
RESUME = {"batch_size": 4, "rank": 1, "world_size": 2, "prefetch": 3}  # 24 images: 3 batches per epoch


@pytest.mark.parametrize("stop", [2, 3, 6, 8, 9])  # mid-epoch 0, at the end of epoch 0, of 1, mid-epoch 2, end of 2
def test_resume_is_bitwise_identical(smooth, stop):
    expected = run(loader(smooth, **RESUME), 12)
    first = loader(smooth, **RESUME)
    assert_same(run(first, stop), expected[:stop])
    resumed = loader(smooth, **RESUME)
    resumed.load_state_dict(roundtrip(merge_states([first.state_dict()])))
    assert_same(run(resumed, 12 - stop), expected[stop:])


def test_resume_after_epochs_read_past_their_end_is_bitwise_identical(smooth):
    # As the trainer reads: each epoch's iterator runs out, so the loader has moved on to the next epoch.
    expected = run(loader(smooth, **RESUME), 9)
    first = loader(smooth, **RESUME)
    assert_same(list(first) + list(first), expected[:6])
    resumed = loader(smooth, **RESUME)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert_same(list(resumed), expected[6:])


@pytest.mark.parametrize("prefetch,threads", [(1, 2), (5, 1)])
def test_resume_with_other_prefetch_and_threads_is_bitwise_identical(smooth, prefetch, threads):
    # Both may change on resume (trainer.resume.CHANGEABLE_ON_RESUME); the checkpoint is of what was consumed.
    expected = run(loader(smooth, **RESUME), 9)
    first = loader(smooth, **RESUME)
    run(first, 4)
    resumed = build_loader(DataConfig(root=smooth, image_size=32, val_resize=36, num_threads=threads,
                                      prefetch=prefetch), "train", batch_size=4, rank=1, world_size=2, device=CPU,
                           seed=0)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert_same(run(resumed, 5), expected[4:])


def test_a_resumed_loader_saved_again_resumes_bitwise(smooth):
    expected = run(loader(smooth, **RESUME), 12)
    first = loader(smooth, **RESUME)
    run(first, 2)
    second = loader(smooth, **RESUME)
    second.load_state_dict(roundtrip(first.state_dict()))
    assert_same(run(second, 5), expected[2:7])  # across two epoch ends
    third = loader(smooth, **RESUME)
    third.load_state_dict(roundtrip(second.state_dict()))
    assert_same(run(third, 5), expected[7:])


def test_a_restored_loader_saves_the_same_state_before_it_is_iterated(coded):
    # A run resumed at its last step saves again without reading a batch.
    root, _ = coded
    first = loader(root, batch_size=4)
    run(first, 2)
    state = roundtrip(first.state_dict())
    restored = loader(root, batch_size=4)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_yielded_batches_are_not_overwritten_later(coded):
    root, _ = coded
    batches = run(loader(root, batch_size=4), 8)
    kept = batches[0][0].clone()
    run(loader(root, batch_size=4), 8)
    assert torch.equal(batches[0][0], kept)


def test_batches_held_across_epochs_keep_their_pixels(smooth):
    # One pipeline serves every epoch: the buffers of later batches must not reuse those of batches still held.
    copying, holding = loader(smooth, batch_size=4), loader(smooth, batch_size=4)
    copied = [(x.clone(), y.clone()) for _ in range(3) for x, y in copying]  # each dropped once copied
    held = [batch for _ in range(3) for batch in holding]
    assert_same(held, copied)


def test_a_re_split_epoch_saved_again_mid_way_resumes_bitwise(coded):
    # 24 images: 2 ranks x batch 2 read 2 batches (8 samples); 1 rank x batch 4 goes on from batch 2 of 6.
    root, _ = coded
    first = [loader(root, rank=r, world_size=2, batch_size=2) for r in range(2)]
    for shard in first:
        run(shard, 2)
    state = roundtrip(merge_states([shard.state_dict() for shard in first]))
    expected = loader(root, batch_size=4)
    expected.load_state_dict(state)
    rest = run(expected, 4)  # to the epoch's end
    assert len({c for images, _ in rest for c in codes(images)}) == 16

    interrupted = loader(root, batch_size=4)
    interrupted.load_state_dict(state)
    head = run(interrupted, 1)
    resumed = loader(root, batch_size=4)
    resumed.load_state_dict(roundtrip(interrupted.state_dict()))
    for (x, y), (ex, ey) in zip(head + run(resumed, 3), rest):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_re_split_loader_saved_before_it_is_iterated_keeps_its_position(coded):
    # A run resumed on another world size at its last step saves again without reading a batch.
    root, _ = coded
    first = [loader(root, rank=r, world_size=2, batch_size=2) for r in range(2)]
    seen = [c for shard in first for images, _ in run(shard, 2) for c in codes(images)]
    restored = loader(root, batch_size=4)
    restored.load_state_dict(roundtrip(merge_states([shard.state_dict() for shard in first])))
    again = loader(root, batch_size=4)
    again.load_state_dict(roundtrip(restored.state_dict()))
    seen += [c for images, _ in run(again, 4) for c in codes(images)]
    assert len(seen) == len(set(seen)) == 24


def test_resume_needs_this_ranks_checkpoint(coded):
    root, _ = coded
    rank0 = loader(root, rank=0, world_size=2)
    run(rank0, 1)
    with pytest.raises(DataError, match="not for rank 1"):
        loader(root, rank=1, world_size=2).load_state_dict(rank0.state_dict())


def test_one_train_and_one_val_pipeline_serve_every_epoch_and_evaluation(coded, monkeypatch):
    # A new pipeline costs decoder set-up, allocations and an empty prefetch queue: paid once per loader, not per
    # epoch or evaluation.
    root, index = coded
    built = []
    build = Pipeline.build

    def counting_build(pipe):
        if all(pipe is not seen for seen in built):
            built.append(pipe)
        return build(pipe)

    monkeypatch.setattr(Pipeline, "build", counting_build)
    train = loader(root, batch_size=4)
    epochs = [[c for images, _ in train for c in codes(images)] for _ in range(3)]
    assert all(sorted(epoch) == sorted(code for _, code in index["train"]) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert len(built) == 1
    val = loader(root, "val", batch_size=2)
    passes = [list(val) for _ in range(2)]
    assert len(built) == 2
    assert [len(p) for p in passes] == [len(val)] * 2 == [5, 5]  # 9 images: the last batch holds one
    for (x, y), (ex, ey) in zip(*passes):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_state_of_the_per_epoch_pipelines_resumes_at_its_position(coded):
    # Saved before the loader kept one pipeline: its DALI checkpoint is another pipeline's, the samples go on.
    root, _ = coded
    expected = [codes(images) for images, _ in run(loader(root, batch_size=4), 6)]
    first = loader(root, batch_size=4)
    run(first, 2)
    state = first.state_dict()
    del state["dali_base"]
    state["dali_first_batch"] = 0
    resumed = loader(root, batch_size=4)
    resumed.load_state_dict(roundtrip(state))
    assert [codes(images) for images, _ in run(resumed, 4)] == expected[2:]


def another_pipelines_state(state, change):
    """`state` as a loader of another pipeline would have saved it; "unrecorded": saved before loader states
    recorded their pipeline."""
    if change == "unrecorded":
        del state["dali_pipeline"]
    elif change == "decoder":  # a run started on CPUs, resumed on a GPU: nvJPEG and the hardware decoder
        assert state["dali_pipeline"]["decoder.device"] == "cpu"
        state["dali_pipeline"] = {**state["dali_pipeline"], "decoder.device": "mixed", "decoder.hw_decoder_load": 0.65}
    return state


@pytest.mark.parametrize("change", ["channels_last", "decoder", "unrecorded"])
def test_a_state_of_another_pipeline_is_not_restored_into_this_one_but_read_on_from_its_position(smooth, change):
    # DALI's checkpointing documentation: restoring a checkpoint into a pipeline of another definition is undefined
    # behaviour. train.channels_last (the output layout) may change on resume, and a CPU run may resume on a GPU.
    expected = run(loader(smooth, **RESUME), 6)
    first = loader(smooth, **RESUME)
    run(first, 2)
    state = another_pipelines_state(roundtrip(first.state_dict()), change)
    channels_last = change == "channels_last"
    resumed = loader(smooth, channels_last=channels_last, **RESUME)
    resumed.load_state_dict(state)
    fresh = loader(smooth, channels_last=channels_last, **RESUME)  # a new pipeline at the saved position
    fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("dali_")})
    rest = run(resumed, 4)
    assert_same(rest, run(fresh, 4))
    assert [y.tolist() for _, y in rest] == [y.tolist() for _, y in expected[2:]]  # the same samples, in order
    assert not all(torch.equal(x, ex) for (x, _), (ex, _) in zip(rest, expected[2:]))  # other augmentation draws


def test_a_re_split_loader_saved_again_resumes_bitwise_across_the_epoch_end(smooth):
    # 24 images: 2 ranks x batch 2 read 1 batch; 1 rank x batch 4 goes on from global batch 1 of 6.
    first = [loader(smooth, rank=r, world_size=2, batch_size=2) for r in range(2)]
    for shard in first:
        run(shard, 1)
    state = roundtrip(merge_states([shard.state_dict() for shard in first]))
    expected = loader(smooth, batch_size=4)
    expected.load_state_dict(state)
    rest = run(expected, 8)
    interrupted = loader(smooth, batch_size=4)
    interrupted.load_state_dict(state)
    head = run(interrupted, 5)  # to the epoch's end
    resumed = loader(smooth, batch_size=4)
    resumed.load_state_dict(roundtrip(interrupted.state_dict()))
    assert_same(head + run(resumed, 3), rest)


def test_a_val_pass_left_after_one_batch_leaves_the_next_pass_whole(coded):
    # The trainer shows one val batch on W&B, then evaluates.
    root, index = coded
    val = loader(root, "val", batch_size=2)
    whole = list(val)
    assert sorted(c for images, _ in whole for c in codes(images)) == sorted(c for _, c in index["val"])
    next(iter(val))
    assert_same(list(val), whole)


def test_plain_file_reads_give_the_same_batches(smooth):
    assert_same(run(loader(smooth, mmap=False), 4), run(loader(smooth), 4))


@pytest.mark.parametrize("train,crop", [(True, "random_resized"), (True, "pad_crop"), (False, "random_resized")])
def test_the_gpu_pipeline_is_accepted_by_dali_without_a_gpu(train, crop):
    # DALI checks every operator argument (the mixed decoders' buffer sizes among them) when a pipeline is defined;
    # only building it needs the GPU.
    image_pipeline(source=lambda info: None, cfg=config("/nonexistent", train_crop=crop), train=train, gpu=True,
                   channels_last=True, dtype=torch.bfloat16, batch_size=2, num_threads=1, device_id=None)


def test_train_antialias_off_changes_only_the_training_crops(smooth):
    """data.train_antialias=false resizes training crops without the antialiasing filter: other pixels from the same
    draws; validation is not touched."""
    on, off = run(loader(smooth), 2), run(loader(smooth, train_antialias=False), 2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(on, off))  # the same samples
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(on, off))
    val_on, val_off = run(loader(smooth, "val"), 1), run(loader(smooth, "val", train_antialias=False), 1)
    assert torch.equal(val_on[0][0], val_off[0][0])
