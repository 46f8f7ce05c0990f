"""`python -m trainer.export`: torchvision's own model and transforms on the exported weights predict what the
trainer's evaluation predicted; safetensors holds the same tensors; ONNX agrees with torch under onnxruntime; the
JSON beside each export says what it is; folding the input normalisation is exact away from the border."""
import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from data.build import build_loader
from data.config import DataConfig
from data.folder import list_split
from tests.helpers import TINY, metrics, run_trainer
from trainer.config import load_config, to_dict
from trainer.export import IMAGENET_MEAN, IMAGENET_STD, fold_input, main, to_torchvision_input
from trainer.models import build_model, model_options

pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

STEPS = 24  # 2 epochs of 96 train images at batch 8 on one process


@pytest.fixture(scope="module")
def resnet18_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = run_trainer(1, *TINY, "model.name=resnet18", "train.batch_size=8", f"data.root={tiny_data}",
                         f"run.dir={run_dir}", "train.channels_last=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def exported(resnet18_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    for fmt, name in (("torchvision", "r18.pth"), ("safetensors", "r18.safetensors"), ("onnx", "r18.onnx")):
        assert main([str(resnet18_run), "--format", fmt, "--out", str(out / name)]) == 0
    return out


def torchvision_model(path: Path) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def standard_transforms(record: dict) -> v2.Compose:
    pre = record["preprocessing"]
    return v2.Compose([v2.Resize(pre["val_resize"]), v2.CenterCrop(pre["image_size"]), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre["mean"], pre["std"])])


@pytest.mark.slow
def test_torchvision_transforms_and_model_reproduce_the_trainers_top1(resnet18_run, exported, tiny_data):
    record = json.loads((exported / "r18.pth.json").read_text())
    model, transform = torchvision_model(exported / "r18.pth"), standard_transforms(record)
    images = list_split(str(tiny_data), "val")
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images.paths()])
        predicted = model(batch).argmax(1)
    top1 = 100 * (predicted == torch.tensor(images.labels)).float().mean().item()
    logged = [r for r in metrics(resnet18_run, "val") if r["step"] == STEPS][0]
    assert record["val"]["top1"] == logged["top1"]
    # 16 val images: one prediction is 6.25 points. The resize differs (PIL's antialiased bilinear, DALI's
    # linear), so an image on a decision boundary may flip; the test below shows the weights themselves agree.
    assert abs(top1 - logged["top1"]) <= 100 / 16 + 1e-6, (top1, logged["top1"])


@pytest.mark.slow
def test_on_the_trainers_own_pixels_the_export_predicts_exactly_the_same(resnet18_run, exported, tiny_data):
    """The trainer's val batches (0-255 minus the seed's means), turned into torchvision's normalisation: the
    torchvision model predicts what the checkpoint predicted, image for image."""
    record = json.loads((exported / "r18.pth.json").read_text())
    trained = build_model("resnet18", 4)
    trained.load_state_dict(torch.load(sorted((resnet18_run / "checkpoints").glob("ckpt-*.pt"))[-1],
                                       weights_only=True)["model"])
    trained.eval()
    model = torchvision_model(exported / "r18.pth")
    cfg = DataConfig(root=str(tiny_data), image_size=32, val_resize=36, num_threads=1)
    mean = torch.tensor(record["trained_preprocessing"]["mean"]).view(1, 3, 1, 1)
    correct, samples = 0, 0
    with torch.no_grad():
        for images, labels in build_loader(cfg, "val", batch_size=8, rank=0, world_size=1,
                                           device=torch.device("cpu"), seed=0):
            ours, theirs = trained(images), model(to_torchvision_input(images + mean))
            assert torch.equal(ours.argmax(1), theirs.argmax(1))
            # At 32 px a third of conv1's outputs touch the padding (see the fold test): 0.1% here, not 1e-6.
            assert (ours - theirs).abs().max() < 1e-2 * ours.abs().max()
            correct += (theirs.argmax(1) == labels).sum().item()
            samples += len(labels)
    assert 100 * correct / samples == record["val"]["top1"]


@pytest.mark.slow
def test_safetensors_holds_the_same_tensors_and_loads_into_torchvision(exported):
    from safetensors.torch import load_file
    tensors = load_file(exported / "r18.safetensors")
    reference = torch.load(exported / "r18.pth", weights_only=True)
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    torchvision.models.resnet18(num_classes=4).load_state_dict(tensors)


@pytest.mark.slow
def test_onnx_agrees_with_torch_under_onnxruntime(exported):
    import onnxruntime
    record = json.loads((exported / "r18.onnx.json").read_text())
    assert record["onnx"]["max_abs_diff_onnxruntime"] < 1e-4
    assert sorted(p.name for p in exported.glob("r18.onnx*")) == ["r18.onnx", "r18.onnx.json"]  # no external data
    session = onnxruntime.InferenceSession(str(exported / "r18.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 3, 32, 32)
    logits = torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])
    with torch.no_grad():
        assert (logits - torchvision_model(exported / "r18.pth")(batch)).abs().max() < 1e-4


@pytest.mark.slow
def test_json_says_what_the_export_is(resnet18_run, exported):
    record = json.loads((exported / "r18.safetensors.json").read_text())
    assert record["model"] == "resnet18" and record["num_classes"] == 4
    assert record["builder"] == "torchvision.models.resnet18(num_classes=4)"
    assert record["classes"] == json.loads((resnet18_run / "classes.json").read_text())
    pre = record["preprocessing"]
    assert (pre["mean"], pre["std"], pre["image_size"], pre["val_resize"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD),
                                                                               32, 36)
    assert record["trained_preprocessing"]["std"] is None and record["fold"]["applied"]
    assert record["source"]["step"] == STEPS and record["source"]["weights"] == "model"
    assert record["val"]["top1"] == [r for r in metrics(resnet18_run, "val") if r["step"] == STEPS][0]["top1"]


def write_checkpoint(run_dir: Path, *overrides: str) -> Path:
    """A checkpoint of the shape the trainer writes, with untrained weights: export needs no training."""
    cfg = load_config(None, [*TINY, *overrides])
    path = run_dir / "checkpoints" / "ckpt-000000007.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 3, **model_options(cfg.model))
    with torch.no_grad():
        for m in model.modules():  # BN statistics other than the identity, so a wrong fold would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "classes": ["n01", "n02", "n03"], "step": 7,
                "epoch": 0, "last_val": {}, "ema": None, "preprocessing": None}, path)
    (path.parent / "latest").write_text(path.name + "\n")
    return path


@pytest.fixture
def cifar_checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "run")


@pytest.fixture
def blurpool_checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "blurpool", "model.blurpool=true")


def test_cifar_net_exports_to_safetensors_with_its_builder_named(cifar_checkpoint, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "r20.safetensors"
    assert main([str(cifar_checkpoint.parents[1]), "--format", "safetensors", "--out", str(out)]) == 0
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["builder"].startswith("trainer.models.build_model('resnet20', num_classes=3")
    assert record["val"] is None
    assert record["fold"]["max_abs_logit_diff"] < 0.01 * record["fold"]["max_abs_logit"]
    build_model("resnet20", 3).load_state_dict(load_file(out))


def test_ema_of_a_run_without_one_is_refused(cifar_checkpoint, tmp_path, capsys):
    assert main([str(cifar_checkpoint), "--format", "safetensors", "--out", str(tmp_path / "x"), "--ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err


def test_cifar_net_to_torchvision_is_refused(cifar_checkpoint, tmp_path, capsys):
    assert main([str(cifar_checkpoint), "--format", "torchvision", "--out", str(tmp_path / "x.pth")]) == 2
    assert "torchvision has no resnet20" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_cifar_net_exports_to_onnx(cifar_checkpoint, tmp_path):
    out = tmp_path / "r20.onnx"
    assert main([str(cifar_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    onnx = json.loads(Path(f"{out}.json").read_text())["onnx"]
    # Random BN statistics make large logits; float32 kernels that sum in another order differ relative to them.
    assert onnx["max_abs_diff_onnxruntime"] < 1e-5 * onnx["max_abs_logit"]


def test_blurpool_net_exports_to_safetensors_under_its_own_keys_with_its_builder(blurpool_checkpoint, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "blur.safetensors"
    assert main([str(blurpool_checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    record = json.loads(Path(f"{out}.json").read_text())
    assert "blurpool=True" in record["builder"]
    tensors = load_file(out)
    assert "layer2.0.conv1.conv.weight" in tensors and not any("blur" in k for k in tensors)
    model = build_model("resnet20", 3, blurpool=True)
    model.load_state_dict(tensors)  # strict: the builder the JSON names takes exactly these tensors
    assert record["fold"]["max_abs_logit_diff"] < 0.01 * record["fold"]["max_abs_logit"]


def test_bag_of_tricks_net_exports_with_its_builder_and_is_refused_as_torchvision(tmp_path, capsys):
    from safetensors.torch import load_file
    checkpoint = write_checkpoint(tmp_path / "resnet18d", "model.name=resnet18", "model.deep_stem=true",
                                  "model.shortcut=D", "data.image_size=64", "data.val_resize=72")
    out = tmp_path / "r18d.safetensors"
    assert main([str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    record = json.loads(Path(f"{out}.json").read_text())
    assert "shortcut='D'" in record["builder"] and "deep_stem=True" in record["builder"]
    model = build_model("resnet18", 3, shortcut="D", deep_stem=True)
    model.load_state_dict(load_file(out))  # strict: the builder the JSON names takes exactly these tensors
    assert "conv1.6.weight" in load_file(out) and "layer2.0.downsample.1.weight" in load_file(out)
    assert record["fold"]["max_abs_logit_diff"] < 0.01 * record["fold"]["max_abs_logit"]
    assert main([str(checkpoint), "--format", "torchvision", "--out", str(tmp_path / "x.pth")]) == 2
    assert "torchvision's resnet18 has shortcut B, this one D" in capsys.readouterr().err


def test_blurpool_net_to_torchvision_is_refused(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "r18", "model.name=resnet18", "model.blurpool=true")
    assert main([str(checkpoint), "--format", "torchvision", "--out", str(tmp_path / "x.pth")]) == 2
    assert "this one has model.blurpool=true" in capsys.readouterr().err


@pytest.mark.slow
def test_blurpool_net_exports_to_onnx_and_onnxruntime_agrees(blurpool_checkpoint, tmp_path):
    import onnxruntime
    out = tmp_path / "blur.onnx"
    assert main([str(blurpool_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    onnx = json.loads(Path(f"{out}.json").read_text())["onnx"]
    assert onnx["max_abs_diff_onnxruntime"] < 1e-5 * onnx["max_abs_logit"]
    # The graph really blurs: the same weights without the blur give other logits than onnxruntime's.
    from safetensors.torch import load_file
    weights = tmp_path / "blur.safetensors"
    assert main([str(blurpool_checkpoint), "--format", "safetensors", "--out", str(weights)]) == 0
    blurred, unblurred = build_model("resnet20", 3, blurpool=True).eval(), build_model("resnet20", 3).eval()
    blurred.load_state_dict(load_file(weights))
    unblurred.load_state_dict({k.replace(".conv.weight", ".weight"): v for k, v in load_file(weights).items()})
    batch = torch.randn(3, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])
    with torch.no_grad():
        reference, other = blurred(batch), unblurred(batch)
    assert (logits - reference).abs().max() < 1e-5 * reference.abs().max()
    assert (logits - other).abs().max() > 1e-2 * reference.abs().max()


def test_keeping_the_trained_input_changes_nothing(cifar_checkpoint, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "same.safetensors"
    assert main([str(cifar_checkpoint), "--format", "safetensors", "--out", str(out), "--input", "trained"]) == 0
    saved = torch.load(cifar_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(t, saved[k]) for k, t in load_file(out).items())
    assert json.loads(Path(f"{out}.json").read_text())["preprocessing"]["std"] is None


def test_fold_is_exact_inside_the_image_and_off_only_at_the_border():
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-50, 50)
        model.bn1.running_var.uniform_(100, 1000)
    pre = {"mean": [123.68, 116.78, 103.94], "std": None}
    folded = build_model("resnet18", 5).eval()
    weights, record = fold_input(model.state_dict(), pre)
    folded.load_state_dict(weights)
    pixels = torch.rand(2, 3, 40, 40) * 255
    with torch.no_grad():
        ours = model.bn1(model.conv1(pixels - torch.tensor(pre["mean"]).view(1, 3, 1, 1)))
        theirs = folded.bn1(folded.conv1(to_torchvision_input(pixels)))
    inside = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # 7x7 kernel, padding 3, stride 2
    assert (ours[inside] - theirs[inside]).abs().max() < 1e-3
    border_error = (ours - theirs).abs().max()
    assert 1e-3 < border_error < 0.05 * ours.abs().max()
    assert record["border_padding_error_gray_levels"] == pytest.approx([-0.005, -0.5, -0.41], abs=1e-9)


def test_torchvision_normalised_runs_need_no_fold():
    model = build_model("resnet18", 5)
    weights, record = fold_input(model.state_dict(), {"mean": [0.485 * 255, 0.456 * 255, 0.406 * 255],
                                                      "std": [0.229 * 255, 0.224 * 255, 0.225 * 255]})
    assert not record["applied"] and weights is not None
