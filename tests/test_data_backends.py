"""Every backend behind build_loader: the same shapes, lengths, exact evaluation and exact resume."""
import pytest
import torch

from data.config import DataConfig
from data.errors import DataError
from data.loader import build_loader, merge_states
from tests.helpers import make_coded

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_world_size_change_is_refused(root, backend):
    first = loader(root, backend, world_size=2)
    take(first, 1)
    with pytest.raises(DataError, match="world size 2 but this run has 4"):
        loader(root, backend, world_size=4, batch_size=2).load_state_dict(first.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_images_for_one_batch_per_rank(root, backend):
    with pytest.raises(DataError, match="fewer than one batch per rank"):
        loader(root, backend, batch_size=8, world_size=4)
