"""Hostile config input exits 2 before any work: the message names the key (or the file and line), no traceback
is printed and nothing is created. Most cases run main() in this process; a few run the real command line."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.errors import ConfigError
from tests.helpers import ROOT, main_in_process, trainer_env
from trainer.config import Config, check_paths, load_config
from trainer.main import main

# Small enough that an input wrongly accepted trains one step in seconds instead of hanging the suite.
BASE = ["model.name=resnet20", "data.backend=synthetic", "data.num_classes=2", "data.synthetic_samples=8",
        "data.image_size=32", "data.val_resize=32", "train.batch_size=2", "train.precision=fp32", "train.epochs=1",
        "train.max_steps=1", "monitor.wandb=false", "monitor.progress=false"]
# Paths in overrides are relative to the test's tmp_path: {tmp} is replaced.
# Each row: the overrides (space-separated) and the key the message must name.
BAD_OVERRIDES = [row.rsplit(maxsplit=1) for row in """
seed=-1                                            seed
seed=100000000000000000000000                      seed
seed=4294967296                                    seed
schedule.warmup_epochs=inf                         schedule.warmup_epochs
schedule.warmup_epochs=nan                         schedule.warmup_epochs
schedule.warmup_epochs=-inf                        schedule.warmup_epochs
schedule.milestones=[30,100000000000000000000]     schedule.milestones[1]
train.threads=100000000000                         train.threads
train.threads=1025                                 train.threads
data.num_threads=100000000000                      data.num_threads
data.prefetch=1000000000                           data.prefetch
data.image_size=100000 data.val_resize=100000      data.image_size
data.val_resize=100000                             data.val_resize
data.mean=[nan,116.78,103.94]                      data.mean[0]
data.std=[58.4,57.1,inf]                           data.std[2]
data.crop_aspect=[0.75,inf]                        data.crop_aspect[1]
data.hw_decoder_load=nan                           data.hw_decoder_load
data.num_classes=1000000000000                     data.num_classes
model.num_classes=1000000000000                    model.num_classes
distributed.timeout_s=inf                          distributed.timeout_s
distributed.timeout_s=nan                          distributed.timeout_s
distributed.timeout_s=86401                        distributed.timeout_s
distributed.init_timeout_s=inf                     distributed.init_timeout_s
optim.lr=inf                                       optim.lr
optim.lr=nan                                       optim.lr
optim.weight_decay=nan                             optim.weight_decay
optim.weight_decay=inf                             optim.weight_decay
optim.momentum=nan                                 optim.momentum
train.label_smoothing=nan                          train.label_smoothing
train.batch_size=65537                             train.batch_size
train.batch_size=1000000000                        train.batch_size
train.epochs=100000000000000000000                 train.epochs
checkpoint.every_steps=100000000000000000000       checkpoint.every_steps
data.backend=dali data.root={tmp}/no/such/dataset  data.root
data.backend=dali data.root={tmp}/a_file           data.root
data.backend=torchvision data.root={tmp}/a_file    data.root
run.dir={tmp}/a_file                               run.dir
run.dir={tmp}/a_file/run                           run.dir
run.dir=${oc.env:CONFIG_FUZZ_NOT_SET}              run.dir
monitor.tags=[a,[b]]                               monitor.tags[1]
train=5                                            train
""".strip().splitlines()]
# (file name, content, the line the message must name, more text it must contain)
BAD_YAML = [
    ("syntax.yaml", "seed: 1\ntrain:\n  epochs: 2\n  batch_size: 4: 5\n", 4, "mapping values are not allowed"),
    ("unclosed.yaml", "seed: 1\ntrain: {epochs: 2\n", 3, "flow mapping"),
    ("tab.yaml", "train:\n\tepochs: 2\n", 2, "cannot start any token"),
    ("binary.yaml", b"seed: 1\n\x80\x81\xfe\xff\n", 2, "UTF-8"),
    ("nul.yaml", "seed: 1\nrun: \x00\n", 2, "unacceptable character"),
    ("duplicate.yaml", "train:\n  epochs: 1\n  epochs: 2\n", 3, "duplicate key epochs"),
    ("list.yaml", "- seed: 1\n- seed: 2\n", 1, "mapping"),
    ("scalar.yaml", "42\n", 1, "mapping"),
    ("two_documents.yaml", "seed: 1\n---\nseed: 2\n", 2, "another document"),
    ("python_tag.yaml", 'seed: 0\nrun:\n  dir: !!python/object/apply:os.system ["touch {tmp}/pwned"]\n', 3,
     "python/object/apply"),
    ("python_name.yaml", "seed: !!python/name:os.system\n", 1, "python/name"),
    ("unknown_key.yaml", "train:\n  epochs: 1\n  batch_sise: 32\n", 3, "train.batch_sise"),
    ("wrong_type.yaml", "seed: 1\ntrain:\n  batch_size: many\n", 3, "train.batch_size"),
    ("bad_list_item.yaml", "data:\n  crop_area:\n    - 0.1\n    - lots\n", 4, "data.crop_area[1]"),
    ("interpolation.yaml", "seed: 1\nrun:\n  dir: ${oops\n", 3, "run.dir"),
    ("recursive_alias.yaml", "seed: 1\nx: &a [*a]\n", 2, "recursive"),
    ("deep.yaml", "x: " + "[" * 2000 + "]" * 2000 + "\n", 1, "nesting depth"),
]


def tree(path: Path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding a plain file named a_file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory\n")
    return tmp_path


def assert_refused(code, err, *expected):
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("overrides, key", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_value_exits_2_naming_the_key(overrides, key, tmp, capsys):
    overrides = [o.replace("{tmp}", str(tmp)) for o in overrides.split()]
    before = tree(tmp)
    code, out, err = main_in_process([*BASE, f"run.dir={tmp}/run", *overrides], capsys)
    assert_refused(code, err, f"config error: {key}: ")
    assert tree(tmp) == before and out == ""


@pytest.mark.parametrize("name, content, line, problem", BAD_YAML, ids=[case[0] for case in BAD_YAML])
def test_bad_yaml_exits_2_naming_file_and_line(name, content, line, problem, tmp, capsys):
    config = tmp / name
    if isinstance(content, str):
        content = content.replace("{tmp}", str(tmp)).encode()
    config.write_bytes(content)
    before = tree(tmp)
    code, out, err = main_in_process(["--config", str(config), *BASE, f"run.dir={tmp}/run"], capsys)
    assert_refused(code, err, f"{config}:{line}:", problem)
    assert tree(tmp) == before and out == ""


def numeric_leaves(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numeric_leaves(v, f"{key}.{k}" if key else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numeric_leaves(v, f"{key}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


NUMBERS = list(numeric_leaves(OmegaConf.to_container(OmegaConf.structured(Config))))


def dotlist(key: str, value) -> str:
    """An override setting one number, lists included (data.mean[1] is set by giving the whole list)."""
    if "[" not in key:
        return f"{key}={value}"
    name, index = key[:-1].split("[")
    items = list(OmegaConf.select(OmegaConf.structured(Config), name))
    items[int(index)] = value
    return f"{name}=[{','.join(str(v) for v in items)}]"


@pytest.mark.parametrize("key, default", NUMBERS, ids=[key for key, _ in NUMBERS])
def test_every_number_must_be_finite_and_bounded(key, default):
    values = ["inf", "-inf", "nan"] if isinstance(default, float) else [10**16, -(10**16)]
    for value in values:
        with pytest.raises(ConfigError) as e:
            load_config(None, [dotlist(key, value)])
        assert e.value.key == key, (value, str(e.value))


def test_yaml_tags_run_no_code(tmp, capsys):
    config = tmp / "evil.yaml"
    for tag in ['!!python/object/apply:os.system ["touch {tmp}/pwned"]',
                '!!python/object/new:os.system ["touch {tmp}/pwned"]',
                '!!python/object/apply:subprocess.call [["touch", "{tmp}/pwned"]]']:
        config.write_text(f"seed: {tag}\n".replace("{tmp}", str(tmp)))
        assert main(["--config", str(config)]) == 2
    assert not (tmp / "pwned").exists() and "Traceback" not in capsys.readouterr().err


def test_numbers_from_yaml_are_checked_too(tmp, capsys):
    config = tmp / "inf.yaml"
    config.write_text("optim:\n  lr: .inf\n")
    code, _, err = main_in_process(["--config", str(config), f"run.dir={tmp}/run"], capsys)
    assert_refused(code, err, "config error: optim.lr: ")


def test_paths_need_no_dataset_for_the_demo_or_synthetic_backend(tmp):
    for overrides in (["data.demo=true"], ["data.backend=synthetic"]):
        check_paths(load_config(None, [f"data.root={tmp}/not/yet", f"run.dir={tmp}/new/run", *overrides]))
    check_paths(load_config(None, [f"data.root={tmp}", f"run.dir={tmp}"]))


def test_a_demo_root_that_is_a_file_is_refused(tmp):
    with pytest.raises(ConfigError) as e:
        check_paths(load_config(None, [f"data.root={tmp}/a_file", "data.demo=true", f"run.dir={tmp}/run"]))
    assert e.value.key == "data.root"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; see the read-only mount test")
@pytest.mark.parametrize("run_dir", ["locked", "locked/new/run"])
def test_run_dir_without_write_permission(run_dir, tmp, capsys):
    locked = tmp / "locked"
    locked.mkdir(mode=0o555)
    before = tree(tmp)
    code, _, err = main_in_process([*BASE, f"run.dir={tmp / run_dir}"], capsys)
    assert_refused(code, err, "config error: run.dir: ", str(locked))
    assert tree(tmp) == before


def test_a_train_split_smaller_than_a_global_batch_exits_2(tmp, capsys):
    # Only the loader knows the split's size, so the run dir exists by then; no checkpoint may be written.
    code, _, err = main_in_process([*BASE, f"run.dir={tmp}/run", "train.grad_accum=8"], capsys)
    assert_refused(code, err, "config error: train.batch_size: ", "smaller than one global batch")
    assert not list((tmp / "run").rglob("ckpt-*"))


def run_cli(*args, cwd=ROOT, prefix=()) -> subprocess.CompletedProcess:
    command = [*prefix, sys.executable, "-m", "trainer.main", *args]
    return subprocess.run(command, cwd=cwd, env=trainer_env(), capture_output=True, text=True, timeout=120)


CLI_CASES = [  # (config file content or None, overrides, the start of the message)
    ("train: [\n", [], "config error: --config: {tmp}/config.yaml:2: "),
    (bytes(range(256)) * 4, [], "config error: --config: {tmp}/config.yaml:2: "),
    ('seed: !!python/object/apply:os.system ["touch {tmp}/pwned"]\n', [],
     "config error: --config: {tmp}/config.yaml:1: "),
    (None, ["seed=-1"], "config error: seed: "),
    (None, ["optim.lr=inf"], "config error: optim.lr: "),
    (None, ["data.image_size=100000", "data.val_resize=100000"], "config error: data.image_size: "),
    (None, ["data.backend=dali", "data.root={tmp}/missing"], "config error: data.root: "),
    (None, ["run.dir={tmp}/a_file"], "config error: run.dir: "),
]


CLI_IDS = ["syntax", "binary", "python-tag", "seed", "lr", "image-size", "root", "run-dir"]


def cli_case(content, overrides, tmp) -> list:
    """The case's config file written under tmp; its trainer.main arguments."""
    config = []
    if content is not None:
        content = content if isinstance(content, bytes) else content.replace("{tmp}", str(tmp)).encode()
        (tmp / "config.yaml").write_bytes(content)
        config = ["--config", str(tmp / "config.yaml")]
    return [*config, *BASE, f"run.dir={tmp}/run", *[o.replace("{tmp}", str(tmp)) for o in overrides]]


@pytest.mark.parametrize("content, overrides, expected", CLI_CASES, ids=CLI_IDS)
def test_command_line_exits_2_without_traceback(content, overrides, expected, tmp, capsys):
    argv = cli_case(content, overrides, tmp)
    before = tree(tmp)
    code, out, err = main_in_process(argv, capsys)
    assert_refused(code, err, expected.replace("{tmp}", str(tmp)))
    assert out == "" and tree(tmp) == before
    assert not (tmp / "pwned").exists()


def test_a_python_tag_in_a_config_is_refused_by_the_real_command(tmp):
    """The same through the interpreter, for the case where a mistake would run code: exit 2, one message on stderr,
    nothing written, nothing run."""
    content, overrides, expected = CLI_CASES[CLI_IDS.index("python-tag")]
    argv = cli_case(content, overrides, tmp)
    before = tree(tmp)
    result = run_cli(*argv)
    assert_refused(result.returncode, result.stderr, expected.replace("{tmp}", str(tmp)))
    assert result.stdout == "" and tree(tmp) == before
    assert not (tmp / "pwned").exists()


def read_only_mount_available(path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            'mount -t tmpfs -o ro tmpfs "$0" && ! touch "$0/x" 2>/dev/null', str(path)],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("run_dir", ["", "new/run"], ids=["existing", "parent"])
def test_run_dir_on_a_read_only_filesystem(run_dir, tmp):
    """A real read-only mount (a private tmpfs in a new mount namespace): it refuses root's writes too."""
    mount = tmp / "ro"
    mount.mkdir()
    if not read_only_mount_available(mount):
        pytest.skip("cannot mount a read-only tmpfs here (unshare --mount --map-root-user not permitted)")
    prefix = ["unshare", "--mount", "--map-root-user", "sh", "-c",
              'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(mount)]
    result = run_cli(*BASE, f"run.dir={mount / run_dir}", prefix=prefix)
    assert_refused(result.returncode, result.stderr, "config error: run.dir: ", str(mount))
    assert "read-only" in result.stderr or "not writable" in result.stderr


def test_bounds_leave_the_presets_and_the_paper_alone():
    cfg = load_config(ROOT / "configs/resnet50_imagenet.yaml", ["train.batch_size=65536", "seed=4294967295",
                                                               "distributed.timeout_s=86400"])
    assert math.isfinite(cfg.optim.lr) and cfg.train.batch_size == 65536 and cfg.seed == 2**32 - 1
