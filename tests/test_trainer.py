"""The trainer in one process on the real DALI CPU pipeline: outputs, checkpoints, resume, and bad input."""
import json
import shutil

import pytest
import torch
import torchvision

from tests.helpers import TINY, main_in_process, metrics, run_trainer
from trainer.checkpoint import Checkpointer
from trainer.plot import main as plot_main

pytestmark = pytest.mark.slow  # the run all read is a real process; the others run trainer.main in this one

# One process at batch 8 sees the same 12 steps per epoch as two at batch 4.
ONE_PROCESS = ["train.batch_size=8"]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    result = run_trainer(1, *TINY, *ONE_PROCESS, f"data.root={tiny_data}", f"run.dir={run_dir}", "train.max_steps=14")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_run_writes_config_metrics_classes_and_summary(finished_run, tiny_data):
    run_dir, result = finished_run
    assert "done: step 14" in result.stdout and str(run_dir) in result.stdout
    assert (run_dir / "config.yaml").read_text().count("resnet20") == 1
    assert json.loads((run_dir / "classes.json").read_text()) == sorted(p.name for p in (tiny_data / "train").iterdir())
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 15))
    assert {"loss", "top1", "lr", "img_per_s", "data_wait", "step_time_s", "max_mem_mb", "max_mem_allocated_mb",
            "epoch"} <= set(train[0])
    val = metrics(run_dir, "val")
    assert [r["step"] for r in val] == [12, 14]  # end of epoch 1, then the end of the run
    assert all(r["samples"] == 16 for r in val)  # 4 classes x 4 val images, each counted once
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in val)


def test_checkpoints_are_atomic_plain_and_torchvision_shaped(finished_run):
    run_dir, _ = finished_run
    ckpt_dir = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    # keep=3 of steps 5, 10, 12 (epoch end), 14 (end); the pointer names the newest; no temp files remain.
    assert names == ["ckpt-000000010.pt", "ckpt-000000012.pt", "ckpt-000000014.pt", "latest"]
    assert (ckpt_dir / "latest").read_text().strip() == "ckpt-000000014.pt"
    state = torch.load(ckpt_dir / "ckpt-000000014.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "rng", "loader", "config"} <= set(state)
    assert state["step"] == 14 and state["epoch"] == 1
    assert not any(k.startswith("module.") for k in state["model"])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_rerun_of_a_finished_run_resumes_and_does_nothing(finished_run, tiny_data, capsys):
    run_dir, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_text()
    code, out, err = main_in_process([*TINY, *ONE_PROCESS, f"data.root={tiny_data}", f"run.dir={run_dir}",
                                      "train.max_steps=14"], capsys)
    assert code == 0, err[-3000:]
    assert "resuming at step 14" in out and "done: step 14" in out
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path):
    run_dir, _ = finished_run
    ckpts = Checkpointer(tmp_path / "checkpoints", keep=3)
    ckpts.dir.mkdir()
    for step in (12, 14):
        shutil.copy(run_dir / "checkpoints" / f"ckpt-{step:09d}.pt", ckpts.path_for(step))
    (ckpts.dir / "latest").write_text("ckpt-000000014.pt\n")
    data = ckpts.path_for(14).read_bytes()
    ckpts.path_for(14).write_bytes(data[: len(data) // 2])
    path, state = ckpts.load_latest()
    assert path == ckpts.path_for(12) and state["step"] == 12


def test_resnet18_checkpoint_loads_into_torchvision(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "r18"
    code, _, err = main_in_process([*TINY, "model.name=resnet18", "model.num_classes=1000", f"data.root={tiny_data}",
                                    f"run.dir={run_dir}", "train.max_steps=1"], capsys)
    assert code == 0, err[-3000:]
    state = torch.load(run_dir / "checkpoints" / "ckpt-000000001.pt", weights_only=True)
    torchvision.models.resnet18().load_state_dict(state["model"])


def test_plot_draws_the_run(finished_run, tmp_path):
    run_dir, _ = finished_run
    out = tmp_path / "m.png"
    assert plot_main([str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


@pytest.mark.parametrize("case", ["missing", "empty", "classes_differ"])
def test_bad_data_directory_is_named(case, tiny_data, tmp_path, capsys):
    root = tmp_path / "data"
    if case == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif case == "classes_differ":
        shutil.copytree(tiny_data, root)
        shutil.rmtree(next((root / "val").iterdir()))
    code, _, err = main_in_process([*TINY, f"data.root={root}", f"run.dir={tmp_path / 'run'}"], capsys)
    assert code == (2 if case == "missing" else 1)  # a missing root is caught before any work
    assert "error" in err and str(root) in err
    assert not list((tmp_path / "run" / "checkpoints").glob("ckpt-*"))


def test_unwritable_run_dir_is_named(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = main_in_process([*TINY, f"data.root={tiny_data}", f"run.dir={blocker / 'run'}"], capsys)
    assert code == 2 and f"run.dir: {blocker} is not a directory" in err


def test_checkpoint_of_another_model_is_refused(finished_run, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    config_before = (run_dir / "config.yaml").read_text()
    code, _, err = main_in_process([*TINY, *ONE_PROCESS, "model.name=resnet32", f"data.root={tiny_data}",
                                    f"run.dir={run_dir}"], capsys)
    assert code == 2  # a config that contradicts the run's checkpoint is a config error
    assert "model.name=resnet20" in err and "ckpt-000000014.pt" in err
    assert (run_dir / "config.yaml").read_text() == config_before  # the rejected config is not recorded


def test_diverging_run_stops_without_a_nan_checkpoint(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = main_in_process([*TINY, "optim.lr=1e30", "schedule.warmup_epochs=0", "train.max_nonfinite_steps=3",
                                    "checkpoint.every_steps=0", f"data.root={tiny_data}", f"run.dir={run_dir}"], capsys)
    assert code == 1 and "non-finite for 3 consecutive steps" in err
    recs = metrics(run_dir, "train")
    assert recs[-1]["nonfinite_steps"] == 2  # the third stops the run before it is logged
    assert not list((run_dir / "checkpoints").glob("ckpt-*"))
