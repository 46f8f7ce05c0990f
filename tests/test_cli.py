"""Every `python -m` command maps the same mistake to the same exit code and message (common.cli): a config or
usage mistake exits 2, a dataset, checkpoint or run that cannot go on exits 1, in one line without a traceback.

Each command's `main(argv)` runs in process on a real mistake; two subprocesses prove the `python -m` wiring.
"""
import re
import subprocess
import sys

import pytest
import torch

from common import cli
from common.errors import DataError, UserInputError
from tests.helpers import ROOT, trainer_env

MESSAGE = re.compile(r"^(config error|error)( \(on rank \d+\))?: \S")
TINY = ["model.name=resnet20", "data.image_size=32", "data.val_resize=32", "train.batch_size=2",
        "train.precision=fp32", "data.backend=torchvision"]


def outcome(main, argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # The message's first line; a long one (a tar error) may run on.
    first = next((line for line in err.splitlines() if MESSAGE.match(line)), err)
    return code, first + err.split(first, 1)[-1]


def assert_usage(main, argv, capsys, needle):
    code, last = outcome(main, argv, capsys)
    assert code == 2 and MESSAGE.match(last) and needle in last, (code, last)


def assert_failure(main, argv, capsys, needle):
    code, last = outcome(main, argv, capsys)
    assert code == 1 and MESSAGE.match(last) and needle in last, (code, last)


@pytest.fixture
def checkpoint(tmp_path):
    from trainer.config import load_config, to_dict
    from trainer.models import build_model
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"model": build_model("resnet20", 3).state_dict(), "config": to_dict(load_config(None, TINY)),
                "classes": ["a", "b", "c"], "step": 1}, path)
    return path


@pytest.fixture
def no_splits(tmp_path):
    """A dataset root that exists and holds neither train/ nor val/."""
    root = tmp_path / "empty_dataset"
    root.mkdir()
    return root


def test_trainer_main(tmp_path, no_splits, capsys):
    from trainer.main import main
    run = f"run.dir={tmp_path / 'run'}"
    assert_usage(main, ["train.bogus=1", run], capsys, "config error: train.bogus: ")
    assert_failure(main, [*TINY, f"data.root={no_splits}", run], capsys, "train does not exist")


def test_trainer_evaluate(tmp_path, checkpoint, no_splits, capsys):
    from trainer.evaluate import main
    assert_usage(main, [tmp_path / "nowhere"], capsys, "no such file or directory")
    assert_usage(main, [checkpoint, "train.bogus=1"], capsys, "config error: train.bogus: ")
    assert_failure(main, [checkpoint, f"data.root={no_splits}"], capsys, "val does not exist")


def test_trainer_export(tmp_path, checkpoint, capsys):
    from trainer.export import main
    assert_usage(main, [tmp_path / "nowhere", "--format", "torchvision", "--out", tmp_path / "x.pth"], capsys,
                 "no such file or directory")
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert_usage(main, [checkpoint, "--format", "safetensors", "--out", blocked / "x"], capsys,
                 f"--out {blocked / 'x'}: cannot write")


def test_trainer_plot(tmp_path, capsys):
    from trainer.plot import main
    assert_usage(main, [tmp_path], capsys, "metrics.jsonl: no such file")


def test_make_demo_dataset(tmp_path, capsys):
    from data.make_demo_dataset import main
    assert_usage(main, ["--out", tmp_path / "x", "--classes", "99"], capsys, "--classes: must be in")
    (tmp_path / "other" / "train").mkdir(parents=True)
    (tmp_path / "other" / "README").write_text("somebody's data")
    assert_failure(main, ["--out", tmp_path / "other"], capsys, "not made by make_demo_dataset")


def test_prepare_imagenet(tmp_path, capsys):
    from data.prepare_imagenet import main
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file\n" * 100)
    names = ("--train-tar", "--val-tar", "--devkit")
    assert_usage(main, [*(x for n in names for x in (n, tmp_path / "missing.tar")), "--out", tmp_path / "o"],
                 capsys, "missing.tar: archive not found")
    assert_failure(main, [*(x for n in names for x in (n, junk)), "--out", tmp_path / "o"], capsys, str(junk))


def test_prepare_cifar(tmp_path, capsys):
    from data.prepare_cifar import main
    junk = tmp_path / "cifar-10-python.tar.gz"
    junk.write_bytes(b"not a tar file\n" * 100)
    assert_usage(main, [tmp_path / "missing.tar.gz", "--out", tmp_path / "o"], capsys, "archive not found")
    assert_failure(main, [junk, "--out", tmp_path / "o"], capsys, str(junk))


def test_verify(tmp_path, no_splits, capsys):
    from data.verify import main
    assert_usage(main, [no_splits], capsys, "has neither train/ nor val/")
    bad = tmp_path / "data" / "train" / "n01" / "bad.JPEG"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"<html>not an image</html>")
    assert main([str(tmp_path / "data"), "--workers", "1"]) == 1  # a report on stdout, not an error
    assert "bad.JPEG" in capsys.readouterr().out


def test_make_shards(tmp_path, no_splits, capsys):
    from data.make_shards import main
    assert_usage(main, [tmp_path / "nowhere", "--out", tmp_path / "o"], capsys, "no such directory")
    assert_failure(main, ["--verify", no_splits], capsys, "manifest.json does not exist")


def test_bench_commands(tmp_path, no_splits, capsys):
    from bench.export_agreement import main as agreement
    from bench.real_cifar import main as real_cifar
    assert_usage(agreement, [tmp_path / "nowhere"], capsys, "no such file or directory")
    assert_failure(real_cifar, ["--root", no_splits, "--out", tmp_path / "out"], capsys, "--root: ")


def test_argparse_errors_stay_exit_2(tmp_path):
    from data.make_shards import main
    with pytest.raises(SystemExit) as stop:
        main(["--verify", str(tmp_path), str(tmp_path)])
    assert stop.value.code == 2


def test_the_message_names_the_rank_that_failed_and_close_runs_on_every_exit():
    closed = []

    def fail_on_rank_3(args):
        error = DataError("shard 7 is truncated")
        error.failed_rank = 3
        raise error

    assert cli.run(lambda argv: argv, fail_on_rank_3, [], close=lambda: closed.append("data")) == 1
    assert cli.message(_raised(fail_on_rank_3)) == "error (on rank 3): shard 7 is truncated"
    assert cli.run(lambda argv: argv, lambda args: None, [], close=lambda: closed.append("ok")) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback, and still closes
        cli.run(lambda argv: argv, lambda args: 1 / 0, [], close=lambda: closed.append("bug"))
    assert cli.exit_code(UserInputError("x")) == 2
    assert closed == ["data", "ok", "bug"]


def _raised(fn):
    try:
        fn(None)
    except DataError as error:
        return error


@pytest.mark.parametrize("argv, code, needle", [
    (["-m", "trainer.main", "train.bogus=1"], 2, "config error: train.bogus: "),
    (["-m", "data.prepare_cifar", "missing.tar.gz", "--out", "unused"], 2, "error: missing.tar.gz: archive not found"),
])
def test_python_m_wiring(tmp_path, argv, code, needle):
    result = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=trainer_env(PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == code and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
