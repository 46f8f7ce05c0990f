"""model.init_from: weights only, from our checkpoints, plain state dicts and safetensors; every bad input a
clear error before training."""
import pytest
import torch

from common.errors import ConfigError
from tests.test_trainer_unit import ALONE, SMALL
from trainer.config import load_config
from trainer.main import main
from trainer.models import build_model
from trainer.models.blurpool import BlurPoolConv2d
from trainer.trainer import Trainer


def make(run_dir, *overrides) -> Trainer:
    return Trainer(load_config(None, [*SMALL, "optim.ema_decay=0.9", f"run.dir={run_dir}", *overrides]), ALONE)


def one_step_checkpoint(run_dir, *overrides):
    """The checkpoint of a tiny run after one step (weights moved away from any fresh init)."""
    with make(run_dir, *overrides) as t:
        t.train_step([next(iter(t.train_loader))])
        t.step = 1
        t.save(force=True)
        return {k: v.clone() for k, v in t.raw_model.state_dict().items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source") / "run"
    one_step_checkpoint(run_dir)
    return run_dir / "checkpoints" / "ckpt-000000001.pt"


def test_a_checkpoint_gives_bitwise_its_weights_and_nothing_else(source, tmp_path):
    saved = torch.load(source, weights_only=True)
    with make(tmp_path / "new", f"model.init_from={source}") as t:
        ours = t.raw_model.state_dict()
        assert ours.keys() == saved["model"].keys()
        assert all(torch.equal(ours[k], saved["model"][k]) for k in ours)
        ema = t.ema.module.state_dict()
        assert all(torch.equal(ema[k], saved["model"][k]) for k in ours)  # the EMA starts from them too
        assert t.step == 0 and t.train_loader.state_dict()["batches_done"] == 0
        assert all(not torch.any(s["momentum_buffer"]) for s in t.optimizer.state.values())


def test_a_plain_state_dict_and_safetensors_load_alike(source, tmp_path):
    weights = torch.load(source, weights_only=True)["model"]
    plain = tmp_path / "weights.pth"
    torch.save({f"module.{k}": v for k, v in weights.items()}, plain)  # as a DDP-wrapped model saves them
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    exported = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(exported))
    for path in (plain, exported):
        with make(tmp_path / path.suffix, f"model.init_from={path}") as t:
            assert all(torch.equal(v, weights[k]) for k, v in t.raw_model.state_dict().items()), path


def test_another_class_count_starts_only_the_classifier_afresh(source, tmp_path):
    saved = torch.load(source, weights_only=True)["model"]
    overrides = ["data.num_classes=6", f"model.init_from={source}"]
    with pytest.raises(ConfigError, match=r"model.init_from: .* fc.weight has shape \(4, 64\), the model's is "
                                          r"\(6, 64\) \(another class count: model.init_head=false"):
        make(tmp_path / "head", *overrides)
    with make(tmp_path / "fresh", *overrides, "model.init_head=false") as t:
        ours = t.raw_model.state_dict()
        assert [k for k in ours if not torch.equal(ours[k], saved[k]) if ours[k].shape == saved[k].shape] == []
        assert ours["fc.weight"].shape == (6, 64)
        torch.manual_seed(0)
        fresh = build_model("resnet20", num_classes=6).state_dict()
        assert torch.equal(ours["fc.weight"], fresh["fc.weight"]) and torch.equal(ours["fc.bias"], fresh["fc.bias"])


class NotWeights:
    pass


@pytest.mark.parametrize("case, message", [
    ("missing", "model.init_from: no such file: .*missing.pt"),
    ("other_architecture", "model.init_from: .* does not fit this model: it has no layer1.3.conv1.weight"),
    ("pickled_object", r"cannot be loaded with torch.load\(weights_only=True\) \(Weights only load failed"),
    ("no_tensors", "holds no state dict"),
])
def test_bad_input_is_a_config_error_before_training(source, tmp_path, case, message):
    path = tmp_path / f"{case}.pt"
    if case == "other_architecture":
        path = source  # a resnet20 checkpoint into a resnet32
    elif case == "pickled_object":
        torch.save({"model": NotWeights()}, path)
    elif case == "no_tensors":
        torch.save({"epoch": 3}, path)
    model = "resnet32" if case == "other_architecture" else "resnet20"
    with pytest.raises(ConfigError, match=message):
        make(tmp_path / "run", f"model.name={model}", f"model.init_from={path}")


def test_the_entry_point_exits_2_on_a_bad_file(tmp_path, capsys):
    code = main([*SMALL, f"run.dir={tmp_path / 'run'}", f"model.init_from={tmp_path / 'nothing.pt'}"])
    assert code == 2
    assert "model.init_from: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_with_checkpoints_resumes_and_ignores_init_from(source, tmp_path, capsys):
    run_dir = tmp_path / "run"
    own = one_step_checkpoint(run_dir)
    with make(run_dir, f"model.init_from={source}") as t:
        assert t.step == 1
        assert all(torch.equal(v, own[k]) for k, v in t.raw_model.state_dict().items())
    assert f"model.init_from={source} is ignored" in capsys.readouterr().out


def test_a_blurpool_checkpoint_starts_a_blurpool_run_and_not_one_without(tmp_path):
    source = tmp_path / "source" / "checkpoints" / "ckpt-000000001.pt"
    one_step_checkpoint(tmp_path / "source", "model.blurpool=true")
    saved = torch.load(source, weights_only=True)["model"]
    assert "layer2.0.conv1.conv.weight" in saved and not any("blur" in k for k in saved)
    with make(tmp_path / "blur", "model.blurpool=true", f"model.init_from={source}") as t:
        assert isinstance(t.raw_model.layer2[0].conv1, BlurPoolConv2d)
        ours = t.raw_model.state_dict()
        assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours)
    with pytest.raises(ConfigError, match=r"it has no layer2.0.conv1.weight \(the weights are of a net with "
                                          r"model.blurpool, this model has it off\)"):
        make(tmp_path / "plain", f"model.init_from={source}")
