"""`python -m trainer.evaluate` agrees exactly with the val figures the trainer logged, alone and under torchrun,
for the weights and their EMA; bad input is a message and an exit code, not a traceback."""
import json
import subprocess

import pytest
import torch

from tests.helpers import ROOT, TINY, metrics, module_command, trainer_env
from trainer.evaluate import main

EPOCH_END = 12  # TINY on tiny_data: 12 steps per epoch at 2 processes x batch 4


@pytest.fixture(scope="module")
def two_process_run(ddp_run):
    return ddp_run[0]


def logged(run_dir, step, split="val"):
    (record,) = [r for r in metrics(run_dir, split) if r["step"] == step]
    return record


def run_evaluate(nproc, *args):
    return subprocess.run(module_command(nproc, "trainer.evaluate", *args), cwd=ROOT, env=trainer_env(),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_two_processes_agree_exactly_with_the_trainer(two_process_run, tmp_path):
    out = tmp_path / "eval.json"
    result = run_evaluate(2, str(two_process_run), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = json.loads(out.read_text()), logged(two_process_run, 2 * EPOCH_END)
    assert got["step"] == 2 * EPOCH_END and got["world_size"] == 2
    # The same shards and batches as the trainer's: even the summed loss is bitwise the same.
    assert {k: got[k] for k in ("top1", "top5", "loss", "samples")} == \
           {k: want[k] for k in ("top1", "top5", "loss", "samples")}
    assert got["logged"]["top1"] == want["top1"] and "the trainer logged" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_one_process_agrees_with_a_two_process_trainer(two_process_run, ema, capsys):
    checkpoint = two_process_run / "checkpoints" / f"ckpt-{EPOCH_END:09d}.pt"
    assert main([str(checkpoint), *(["--ema"] if ema else [])]) == 0
    got = json.loads(checkpoint.with_name(f"ckpt-{EPOCH_END:09d}.eval{'-ema' if ema else ''}.json").read_text())
    want = logged(two_process_run, EPOCH_END, "val_ema" if ema else "val")
    assert got["weights"] == ("ema" if ema else "model") and got["world_size"] == 1
    # Counts are exact whatever the sharding; the loss is summed in another order.
    assert (got["top1"], got["top5"], got["samples"]) == (want["top1"], want["top5"], want["samples"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert f"top1 {want['top1']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_overrides_apply_to_the_recorded_config(two_process_run, tmp_path):
    out = tmp_path / "bs.json"
    assert main([str(two_process_run), "train.batch_size=3", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["samples"] == 16 and got["top1"] == logged(two_process_run, 2 * EPOCH_END)["top1"]


def test_missing_path_is_exit_2_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no such file or directory" in err and "Traceback" not in err


def test_directory_without_checkpoints_is_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"not a checkpoint\n", "pickle"], ids=["text", "foreign-pickle"])
def test_file_that_is_not_a_checkpoint_is_exit_2(tmp_path, content, capsys):
    path = tmp_path / "thing.pt"
    if content == "pickle":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint of this trainer" in err and "Traceback" not in err


def test_bad_override_is_exit_2_naming_the_key(tmp_path, capsys):
    from trainer.config import load_config, to_dict
    from trainer.models import build_model
    path = tmp_path / "ckpt-000000001.pt"
    cfg = load_config(None, TINY)
    torch.save({"model": build_model("resnet20", 3).state_dict(), "config": to_dict(cfg), "classes": ["a", "b", "c"],
                "step": 1}, path)
    assert main([str(path), "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err


def test_missing_file_under_torchrun_style_subprocess_has_no_traceback(tmp_path):
    result = run_evaluate(1, str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no such file" in result.stderr


@pytest.mark.parametrize("option", ["model.blurpool=true", "train.eval_flip=true"])
def test_a_checkpoint_evaluates_as_the_trainer_evaluated_it(tmp_path, option):
    """A blurpool net, and flip TTA: trainer.evaluate gives the in-training validation's figures."""
    from tests.test_trainer_unit import ALONE, SMALL
    from trainer.config import load_config
    from trainer.trainer import Trainer
    cfg = load_config(None, [*SMALL, option, f"run.dir={tmp_path / 'run'}"])
    with Trainer(cfg, ALONE) as t:
        t.train_step([next(iter(t.train_loader))])
        t.step = 1
        t.validate()
        t.save(force=True)
        want = t.last_val
    out = tmp_path / "eval.json"
    assert main([str(tmp_path / "run"), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["step"] == 1 and (got["top1"], got["samples"]) == (want["top1"], want["samples"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    if option == "train.eval_flip=true":  # and the flip was applied: without it the loss is another
        assert main([str(tmp_path / "run"), "train.eval_flip=false", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["loss"] != pytest.approx(want["loss"], rel=1e-6)
