"""Config errors name the key and exit 2 before any work; the presets resolve; the resolved config round-trips."""
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from tests.helpers import ROOT
from trainer.config import load_config, to_yaml
from trainer.main import main

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_resolve(preset):
    cfg = load_config(preset, [])
    assert cfg.run.dir == str(Path("runs") / preset.stem)


def test_recipe_preset_is_the_papers():
    cfg = load_config(ROOT / "configs/resnet50_imagenet.yaml", [])
    assert (cfg.model.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("resnet50", 0.1, 0.9, 1e-4)
    assert (cfg.schedule.warmup_epochs, cfg.train.label_smoothing, cfg.data.image_size) == (5, 0.1, 224)
    assert cfg.data.mean == [123.68, 116.78, 103.94] and cfg.data.std is None
    assert not cfg.optim.decay_bn_and_bias


def test_command_line_overrides_yaml():
    cfg = load_config(ROOT / "configs/resnet50_imagenet.yaml", ["data.root=/x", "optim.lr=0.2", "train.epochs=3"])
    assert (cfg.data.root, cfg.optim.lr, cfg.train.epochs) == ("/x", 0.2, 3)


@pytest.mark.parametrize("override, key", [
    ("train.bogus=1", "train.bogus"),
    ("nothing=1", "nothing"),
    ("optim.lr=-0.1", "optim.lr"),
    ("model.name=resnet51", "model.name"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=many", "train.batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("data.backend=pil", "data.backend"),
    ("data.layout=CHW", "data.layout"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("schedule.name=linear", "schedule.name"),
    ("optim.nesterov=true optim.momentum=0", "optim.nesterov"),
    ("data.crop_area=[0.5,0.1]", "data.crop_area"),
    ("distributed.timeout_s=0", "distributed.timeout_s"),
    ("train.compile=true train.sync_bn=true", "train.compile"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert e.value.key == key
    assert str(e.value).startswith(key)


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, [])
    assert e.value.key == "train.batch_sise" and str(bad) in str(e.value)


def test_yaml_is_data_not_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    # Which error is the config loader's business; what matters here is that nothing ran.
    with pytest.raises(Exception):  # noqa: B017
        load_config(evil, [])
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", ["optim.lr=0.3"])
    dumped = tmp_path / "config.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped, []) == cfg


@pytest.mark.parametrize("argv", [
    ["train.batch_size=0"], ["model.name=resnet51"], ["optim.lr=-1"], ["no.such.key=1"],
    ["--config", "no/such/file.yaml"], ["train.precision"]])
def test_main_exits_2_before_any_work(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + [f"run.dir={tmp_path}/run"] if "=" in argv[0] else argv) == 2
    assert "config error" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_exit_code_and_message():
    result = subprocess.run([sys.executable, "-m", "trainer.main", "optim.lr=-1"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "optim.lr: must be positive" in result.stderr


def test_print_config_prints_and_exits():
    result = subprocess.run([sys.executable, "-m", "trainer.main", "--config", "configs/demo.yaml",
                             "--print-config", "optim.lr=0.25"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    assert "lr: 0.25" in result.stdout and "name: resnet20" in result.stdout
