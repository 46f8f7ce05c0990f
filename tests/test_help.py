"""`python -m trainer.main --help` lists every config key with its default and docstring, grouped by component."""
import dataclasses
import subprocess

import pytest
from omegaconf import OmegaConf

from data.resolution import ResolutionConfig
from tests.helpers import ROOT, module_command, trainer_env
from trainer.config import Config
from trainer.config_docs import field_docs, optional_group, show
from trainer.main import main
from trainer.models import ModelConfig
from trainer.resume import flatten


@pytest.fixture(scope="module")
def help_text():
    result = subprocess.run(module_command(1, "trainer.main", "--help"), cwd=ROOT, env=trainer_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_key_is_listed_with_its_default(help_text):
    keys = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    lines = [line.strip() for line in help_text.splitlines()]
    missing = [f"{key}={show(value)}" for key, value in keys.items() if f"{key}={show(value)}" not in lines]
    assert not missing, f"not in --help: {missing}"


def test_docstrings_are_listed_under_their_group(help_text):
    flat = " ".join(help_text.split())
    assert "model: ModelConfig in trainer/models/__init__.py" in help_text
    doc = field_docs(ModelConfig)["stride_in_1x1"]
    assert doc.startswith("Bottleneck nets: put the stride") and f"model.stride_in_1x1=false {doc}" in flat
    assert f"seed=0 {field_docs(Config)['seed']}" in flat


def test_a_component_off_by_default_is_listed_with_the_keys_it_takes_when_set(help_text):
    lines = [line.strip() for line in help_text.splitlines()]
    assert "data.resolution=null" in lines
    assert "data.resolution, when set: ResolutionConfig in data/resolution.py" in lines
    for key, value in vars(ResolutionConfig()).items():
        assert f"data.resolution.{key}={show(value)}" in lines, key


def test_every_field_has_a_docstring():
    undocumented = []

    def walk(cls, prefix):
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
                continue
            if f.name not in field_docs(cls):
                undocumented.append(prefix + f.name)
            if value is None and (group := optional_group(cls, f)) is not None:
                walk(group, f"{prefix}{f.name}.")
    walk(Config, "")
    assert not undocumented


def test_help_exits_zero_in_process(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "train.precision=bf16" in capsys.readouterr().out
