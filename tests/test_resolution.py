"""Progressive resizing (data.resolution) on every backend, for real: the sides per epoch, one pipeline, a bitwise
resume across a change; FFCV's rule; flip TTA (train.eval_flip); the resume rules of the new keys."""
import numpy as np
import pytest
import torch
from torch import nn

from common.errors import ConfigError
from data.build import build_loader, merge_states
from data.config import DataConfig
from data.resolution import ResolutionConfig, distinct_sides, train_side
from tests.helpers import ROOT, make_coded, roundtrip, run
from trainer.config import load_config, to_dict
from trainer.evaluate import evaluate
from trainer.resume import check, config_changes

CPU = torch.device("cpu")
EPOCHS = 4
# Over 4 epochs (0.25, 0.5, 0.75 and 1 of the run done at their ends): 16 px in epochs 0-1, 32 in 2, 48 in 3.
RAMP = ResolutionConfig(min_res=16, max_res=48, start_ramp=0.5, end_ramp=1.0, step=16)
# FFCV's rn50_configs/rn50_<epochs>_epochs.yaml: (start_ramp, end_ramp) in epochs.
FFCV_RN50_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
SIDES = [16, 16, 32, 48]


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    make_coded(str(root))  # 24 train images: 6 batches of 4 an epoch
    return str(root)


def loader(root, backend="dali", resolution=RAMP, split="train"):
    cfg = DataConfig(root=root, backend=backend, image_size=32, val_resize=36, resolution=resolution,
                     num_threads=1 if backend == "torchvision" else 2, synthetic_samples=24)  # as many as coded's
    return build_loader(cfg, split, batch_size=4, rank=0, world_size=1, device=CPU, seed=0, epochs=EPOCHS)


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's examples/imagenet-example train_imagenet.py, verbatim in substance."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def test_the_schedule_is_ffcvs_rule_at_every_length_of_its_rn50_configs():
    rn50 = ResolutionConfig()  # the defaults: 160 -> 192 px over 0.75 .. 0.875 of the run, steps of 32
    for epochs, (start, end) in FFCV_RN50_RAMPS.items():
        ours = [train_side(e, epochs=epochs, resolution=rn50, image_size=224) for e in range(epochs)]
        assert ours == [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)], epochs
    ours = [train_side(e, epochs=88, resolution=rn50, image_size=224) for e in range(88)]
    assert ours[65] == 160 and ours[76] == 192 and 176 not in ours
    assert train_side(3, epochs=88, resolution=None, image_size=224) == 224
    assert [train_side(e, epochs=EPOCHS, resolution=RAMP, image_size=32) for e in range(EPOCHS)] == SIDES
    assert distinct_sides(DataConfig(resolution=RAMP), EPOCHS) == [16, 32, 48]


@pytest.mark.parametrize("backend", ["dali", "torchvision", "synthetic"])
def test_batches_change_size_at_the_scheduled_epochs(coded, backend):
    train = loader(coded, backend)
    for side in SIDES:
        shapes = {tuple(images.shape) for images, _ in train}
        assert shapes == {(4, 3, side, side)}
    val = {tuple(images.shape[2:]) for images, _ in loader(coded, backend, split="val")}
    assert val == {(32, 32)}


def test_off_by_default_trains_at_image_size(coded):
    train = loader(coded, resolution=None)
    assert [{tuple(x.shape[2:]) for x, _ in train} for _ in range(2)] == [{(32, 32)}] * 2


def test_the_dali_pipeline_is_built_once_for_every_side(coded):
    train = loader(coded)
    list(train)
    pipeline = train._train  # the kept iterator over the one train pipeline
    for side in SIDES[1:]:
        assert {x.shape[2] for x, _ in train} == {side}
        assert train._train is pipeline


def test_webdataset_batches_change_size_with_one_pipeline(tiny_shards):
    cfg = DataConfig(root=str(tiny_shards), format="webdataset", image_size=32, val_resize=36, num_threads=2,
                     resolution=RAMP)
    train = build_loader(cfg, "train", batch_size=4, rank=0, world_size=1, device=CPU, seed=0, epochs=EPOCHS)
    pipeline = train._iterator
    for side in SIDES:
        assert {tuple(x.shape[2:]) for x, _ in train} == {(side, side)}
        assert train._iterator is pipeline


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for (images, labels), (ref_images, ref_labels) in zip(batches, expected):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_resume_across_a_change_is_bitwise(coded, backend):
    expected = run(loader(coded, backend), 24)  # 4 epochs of 6 batches
    first = loader(coded, backend)
    run(first, 10)  # 4 batches into epoch 1, 16 px; the pipeline has prefetched past nothing yet at 32
    resumed = loader(coded, backend)
    resumed.load_state_dict(roundtrip(merge_states([first.state_dict()])))
    got = run(resumed, 14)
    assert [x.shape[2] for x, _ in got] == [16] * 2 + [32] * 6 + [48] * 6
    assert_same(got, expected[10:])


def test_a_webdataset_resume_across_a_change_is_bitwise(tiny_shards):
    cfg = DataConfig(root=str(tiny_shards), format="webdataset", image_size=32, val_resize=36, num_threads=2,
                     resolution=RAMP)

    def make():
        return build_loader(cfg, "train", batch_size=8, rank=0, world_size=1, device=CPU, seed=0, epochs=EPOCHS)

    per_epoch = len(make())
    expected = run(make(), 3 * per_epoch)
    first = make()
    run(first, per_epoch + 1)
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    got = run(resumed, 2 * per_epoch - 1)
    assert {x.shape[2] for x, _ in got[-per_epoch:]} == {32}
    assert_same(got, expected[per_epoch + 1:])


@pytest.mark.parametrize("overrides,key", [
    (["data.resolution.max_res=8"], "data.resolution.max_res"),
    (["data.resolution.start_ramp=1.5"], "data.resolution.start_ramp"),
    (["data.resolution.start_ramp=0.5", "data.resolution.end_ramp=0.4"], "data.resolution.end_ramp"),
    (["data.resolution.step=500"], "data.resolution.step"),
    (["data.resolution.min_res=0"], "data.resolution.min_res"),
    (["data.resolution.min_res=64", "data.train_crop=pad_crop"], "data.resolution"),
    (["data.val_image_size=300"], "data.val_resize"),
    (["data.val_image_size=0"], "data.val_image_size"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.key == key


def test_val_image_size_is_the_val_crop_and_recorded(coded):
    cfg = load_config(None, ["data.val_image_size=288", "data.val_resize=320"])
    assert cfg.data.val_crop == 288
    from data.config import preprocessing
    assert preprocessing(cfg.data)["val_image_size"] == 288
    val = DataConfig(root=coded, image_size=32, val_image_size=24, val_resize=36, num_threads=2)
    batches = build_loader(val, "val", batch_size=4, rank=0, world_size=1, device=CPU, seed=0)
    assert {tuple(x.shape[2:]) for x, _ in batches} == {(24, 24)}


def test_resume_refuses_a_changed_or_added_schedule_and_accepts_val_keys(tmp_path):
    saved = to_dict(load_config(None, []))
    ramp = ["data.resolution={min_res: 160, max_res: 192}"]
    state = {"version": 2, "config": saved, "world_size": 1, "classes": ["a"]}
    for overrides in (ramp, ramp[:0] + ["data.resolution.min_res=128"]):
        now = to_dict(load_config(None, overrides))
        assert "data.resolution" in config_changes(saved, now)
        with pytest.raises(ConfigError, match="schedule over the whole run") as error:
            check(state, now, ["a"], 256, tmp_path / "ckpt.pt")
        assert error.value.key == "data.resolution"
    with_ramp = {**state, "config": to_dict(load_config(None, ramp))}
    with pytest.raises(ConfigError) as error:
        check(with_ramp, to_dict(load_config(None, ramp + ["data.resolution.max_res=224"])), ["a"], 256, tmp_path)
    assert error.value.key == "data.resolution.max_res"
    changes = check(state, to_dict(load_config(None, ["train.eval_flip=true", "data.val_image_size=192"])),
                    ["a"], 256, tmp_path)
    assert set(changes) == {"train.eval_flip", "data.val_image_size"}


class LeftHeavy(nn.Module):
    """Logits that change under a left-right flip: class 0 scores the left half's mean, class 1 the right's."""

    def forward(self, images):
        half = images.shape[3] // 2
        return torch.stack([images[..., :half].mean((1, 2, 3)), images[..., half:].mean((1, 2, 3))], 1)


def test_eval_flip_averages_the_logits_of_the_image_and_its_flip():
    images = torch.zeros(2, 3, 4, 4)
    images[0, :, :, :2] = 1.0  # left bright: class 0 without the flip, a tie with it
    images[1, :, :, 2:] = 1.0
    labels = torch.tensor([0, 0])
    batches = [(images, labels)]
    plain = evaluate(LeftHeavy(), batches, CPU, "fp32")
    flipped = evaluate(LeftHeavy(), batches, CPU, "fp32", flip=True)
    assert plain["top1"] == 50.0
    # Mean logits are (0.5, 0.5) for both: the loss is ln 2 exactly, which no unflipped logits give here.
    assert flipped["loss"] == pytest.approx(np.log(2))
    assert plain["loss"] != pytest.approx(np.log(2))


def test_compile_makes_one_static_graph_per_side_within_the_raised_limit(monkeypatch):
    import functools

    import torch._dynamo

    from trainer import run_model
    from trainer.distributed import Dist

    graphs = []

    def counting(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()
    # 11 epochs ramping 16 -> 64 by 8: 7 sides, past the limit of 2 set above.
    cfg = load_config(None, ["train.compile=true", "train.epochs=11", "data.resolution.min_res=16",
                             "data.resolution.max_res=64", "data.resolution.step=8",
                             "data.resolution.start_ramp=0.1", "data.resolution.end_ramp=0.8"])
    sides = distinct_sides(cfg.data, cfg.train.epochs)
    assert len(sides) == 7
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = run_model.wrap(net, cfg, Dist(rank=0, world_size=1, local_rank=0, device=CPU))
    assert torch._dynamo.config.recompile_limit == len(sides) + 2
    for side in sides + sides:
        model(torch.randn(2, 3, side, side))
    assert len(graphs) == len(sides)  # static: no dynamic-shape graph standing in for several
    assert sorted(next(s[-1] for s in g if len(s) == 4 and s[0] == 2) for g in graphs) == sides
    torch._dynamo.reset()


def test_the_fast_preset_is_ffcvs_rn50_recipe_at_each_of_its_lengths():
    for epochs, (start, end) in FFCV_RN50_RAMPS.items():
        cfg = load_config(ROOT / "configs/resnet50_imagenet_fast.yaml", [f"train.epochs={epochs}"])
        sides = [train_side(e, epochs=epochs, resolution=cfg.data.resolution, image_size=cfg.data.image_size)
                 for e in range(epochs)]
        assert sides == [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)], epochs
    # rn50_configs: lr 1.7 at 512 x 8 GPUs, cyclic with the peak at epoch 2, label smoothing 0.1, no BN decay,
    # blurpool, validation at 256 px with flip TTA.
    assert cfg.optim.lr * cfg.train.batch_size * 8 / 256 == pytest.approx(1.7)
    assert (cfg.schedule.name, cfg.schedule.peak_epoch, cfg.schedule.warmup_epochs) == ("triangular", 2, 0)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.decay_bn_and_bias) == (0.9, 1e-4, False)
    assert (cfg.train.label_smoothing, cfg.model.blurpool, cfg.train.eval_flip) == (0.1, True, True)
    assert (cfg.data.val_image_size, cfg.data.val_resize) == (256, 292)  # FFCV's centre 224/256 of the side


def test_the_trainer_logs_each_epochs_side_and_its_batches_have_it(tmp_path):
    from tests.helpers import metrics
    from tests.test_trainer_unit import ALONE, SMALL
    from trainer.trainer import Trainer
    ramp = ["data.resolution.min_res=16", "data.resolution.max_res=32", "data.resolution.start_ramp=0.5",
            "data.resolution.end_ramp=1.0", "data.resolution.step=16", "monitor.every_steps=4"]
    cfg = load_config(None, [*SMALL, *ramp, f"run.dir={tmp_path / 'run'}"])
    seen = []
    with Trainer(cfg, ALONE) as t:
        original = t.train_step
        t.train_step = lambda group: (seen.append(group[0][0].shape[-1]), original(group))[1]
        assert t.train() == 0
    assert seen == [16] * 8 + [32] * 8  # 8 steps an epoch: epoch 0 at 16 px, epoch 1 at 32
    assert [r["resolution"] for r in metrics(tmp_path / "run", "train")] == [16, 16, 32, 32]
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "epoch 0: the train crop is 16 px" in log and "epoch 1: the train crop is 32 px" in log
