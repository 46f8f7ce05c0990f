"""Every backend behind build_loader: the same shapes, lengths, exact evaluation and exact resume."""
import pytest
import torch

from common.errors import DataError
from data.build import build_loader, merge_states
from data.config import SEED_MEAN, DataConfig
from tests.helpers import decode_code, make_coded

CPU = torch.device("cpu")
BACKENDS = ["dali", "torchvision", "synthetic"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("coded")
    make_coded(str(path), train_per_class=7, val_per_class=3)  # 21 train images, 9 val
    return str(path)


def loader(root, backend, split="train", batch_size=4, rank=0, world_size=1, channels_last=False,
           dtype=torch.float32, **overrides):
    cfg = DataConfig(root=root, backend=backend, image_size=32, val_resize=36, num_threads=2,
                     num_classes=3, synthetic_samples=21 if split == "train" else 9, **overrides)
    return build_loader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, device=CPU, seed=5,
                        channels_last=channels_last, dtype=dtype)


def codes(images):
    """Which coded image each sample is (the red channel of its centre pixel, plus the mean taken off)."""
    red = images[:, 0, images.shape[2] // 2, images.shape[3] // 2].float() + SEED_MEAN[0]
    return [decode_code(r) for r in red.tolist()]


def take(loader_, count):
    out, it = [], iter(loader_)
    while len(out) < count:
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(loader_)
    return out


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_interface(root, backend, layout):
    train = loader(root, backend, channels_last=layout == "NHWC", dtype=torch.bfloat16)
    assert len(train) == 5 and len(train.classes) == 3
    batches = list(train)
    assert len(batches) == 5
    for images, labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last if layout == "NHWC" else torch.contiguous_format)
        assert labels.dtype == torch.int64 and labels.shape == (4,) and 0 <= labels.min() <= labels.max() < 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_is_exact_across_ranks(root, backend):
    sizes = []
    for rank in range(2):
        val = loader(root, backend, "val", batch_size=2, rank=rank, world_size=2)
        batches = [images.shape[0] for images, _ in val]
        assert len(batches) == len(val)
        sizes += batches
    assert sum(sizes) == 9 and sizes == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-epoch 0, at the epoch end, mid-epoch 1
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bitwise_identical(root, backend, stop):
    options = {"batch_size": 2, "rank": 1, "world_size": 2}  # 5 batches per epoch
    expected = take(loader(root, backend, **options), 10)
    first = loader(root, backend, **options)
    take(first, stop)
    resumed = loader(root, backend, **options)
    resumed.load_state_dict(merge_states([first.state_dict()]))
    for (x, y), (ex, ey) in zip(take(resumed, 10 - stop), expected[stop:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
@pytest.mark.parametrize("new_world_size, new_batch_size", [(1, 8), (4, 2), (2, 4)])
def test_another_split_continues_the_epoch_with_each_image_once(root, backend, new_world_size, new_batch_size):
    """2 ranks x batch 4 read one batch each, then the epoch goes on under another split of the 8 samples."""
    first = [loader(root, backend, rank=r, world_size=2) for r in range(2)]  # 21 images: 2 batches per rank
    seen = [code for shard in first for images, _ in take(shard, 1) for code in codes(images)]
    state = merge_states([shard.state_dict() for shard in first])
    resumed = [loader(root, backend, rank=r, world_size=new_world_size, batch_size=new_batch_size)
               for r in range(new_world_size)]
    for shard in resumed:
        shard.load_state_dict(state)
        seen += [code for images, _ in shard for code in codes(images)]
    assert len(seen) == len(set(seen)) == 16  # the epoch's two global batches of 8; the last 5 images are dropped
    assert all(shard.state_dict()["epoch"] == 1 for shard in resumed)


def test_torchvision_draws_each_images_augmentation_alike_on_any_split(root):
    def by_code(batches):
        return {code: image for images, _ in batches for code, image in zip(codes(images), images)}

    whole = by_code(take(loader(root, "torchvision", world_size=1, batch_size=8), 2))
    first = [loader(root, "torchvision", rank=r, world_size=2) for r in range(2)]
    resplit = by_code([batch for shard in first for batch in take(shard, 1)])
    resumed = loader(root, "torchvision", world_size=1, batch_size=8)
    resumed.load_state_dict(merge_states([shard.state_dict() for shard in first]))
    resplit.update(by_code(resumed))
    assert whole.keys() == resplit.keys() and len(whole) == 16
    assert all(torch.equal(whole[c], resplit[c]) for c in whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_position_that_is_not_a_whole_batch_of_the_new_split_is_refused(root, backend):
    first = loader(root, backend, world_size=2)
    take(first, 1)  # 8 samples into the epoch
    with pytest.raises(DataError, match="8 samples into epoch 0 .* not a whole number of this run's global batches "
                                        "of 1 x 3"):
        loader(root, backend, world_size=1, batch_size=3).load_state_dict(first.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_images_for_one_batch_per_rank(root, backend):
    with pytest.raises(DataError, match="fewer than one batch per rank"):
        loader(root, backend, batch_size=8, world_size=4)
