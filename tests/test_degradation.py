"""The degradation experiment: its recipe, its verdicts on made-up curves, and `--quick` end to end."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT, trainer_env
from trainer.config import load_config
from trainer.experiments import degradation
from trainer.experiments.degradation_report import Run, comparison, read_run
from trainer.optim import scaled_lr


def made_up(name: str, train_error: float, test_error: float = 50.0) -> Run:
    return Run(name=name, depth=int(name[-2:]), plain=name.startswith("plain"), classes=30,
               train=[(3840, train_error)], test=[(3840, test_error)], final_window=80 * 32, step_time_s=1.0)


def test_the_recipe_is_the_papers_and_a_valid_config(tmp_path):
    overrides = degradation.recipe(degradation.DEFAULT, tmp_path, 30 * 512)  # 480 steps per epoch
    cfg = load_config(None, [*overrides, "model.name=plain56", f"run.dir={tmp_path / 'run'}"])
    # The paper's lr of 0.1 per 128 images, at the default's batch of 32.
    assert scaled_lr(cfg.optim, cfg.train.batch_size) == pytest.approx(0.1 * 32 / 128)
    assert (cfg.train.batch_size, cfg.optim.momentum, cfg.optim.weight_decay) == (32, 0.9, 1e-4)
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.warmup_epochs) == ("step", [4, 6], 0)
    # A random 32-px window of a 40-px image: the paper's shifts of up to 4 px, without scaling.
    assert cfg.data.crop_area == pytest.approx([0.64, 0.64]) and cfg.data.crop_aspect == [1.0, 1.0]
    assert (cfg.data.image_size, cfg.data.val_resize) == (32, 40)
    assert cfg.monitor.every_steps == 3840 // 48


def test_on_real_cifar10_the_recipe_takes_the_papers_pad_and_crop(tmp_path):
    overrides = degradation.recipe(degradation.CIFAR, tmp_path, 50_000, cifar=True)
    cfg = load_config(None, [*overrides, "model.name=resnet56", f"run.dir={tmp_path / 'run'}"])
    assert (cfg.data.train_crop, cfg.data.pad, cfg.data.image_size, cfg.data.val_resize) == ("pad_crop", 4, 32, 32)
    assert cfg.data.std is None and cfg.data.mean == pytest.approx([125.31, 122.95, 113.87])
    assert scaled_lr(cfg.optim, cfg.train.batch_size) == pytest.approx(0.1 * 32 / 128)
    assert (cfg.schedule.name, cfg.schedule.milestones) == ("step", [2, 3])


def test_the_deepest_runs_start_first():
    assert degradation.model_names([20, 56]) == ["resnet56", "plain56", "resnet20", "plain20"]


@pytest.mark.parametrize("argv", [["--depths", "21"], ["--depths", "20,x"], ["--epochs", "6"], ["--jobs", "0"],
                                  ["--cifar", "/nonexistent"], ["--quick", "--cifar", "."]])
def test_bad_arguments_stop_before_any_work(argv):
    with pytest.raises(SystemExit) as stop:
        degradation.parse_args(argv)
    assert stop.value.code == 2


def test_verdicts_weigh_the_difference_against_the_noise():
    assert comparison(made_up("plain20", 20.0), made_up("plain56", 30.0)).startswith(
        "plain-56 trains worse than plain-20: training error 30.0% vs 20.0% (+10.0 points")
    assert comparison(made_up("resnet20", 20.0), made_up("resnet56", 15.0)).startswith(
        "ResNet-56 trains better than ResNet-20")
    # 2560 images per final window: a standard error of 0.8 points each, so 1 point is noise.
    assert "no differently (within noise)" in comparison(made_up("resnet20", 20.0), made_up("resnet56", 19.0))


@pytest.mark.slow
def test_quick_run_writes_the_figure_and_the_table(tmp_path):
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    command = [sys.executable, "-m", "trainer.experiments.degradation", "--quick", "--out", str(out),
               "--report-dir", str(report_dir)]
    result = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    png, md = report_dir / "degradation.png", report_dir / "degradation.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    for label in ("plain-20", "plain-56", "ResNet-20", "ResNet-56"):
        assert f"| {label} |" in text
    assert "| ResNet-56 | 0.85 M |" in text and "6.97%" in text and "8.75%" in text
    assert "`python -m trainer.experiments.degradation --quick --out" in text and "A `--quick` run" in text
    for model in ("plain20", "plain56", "resnet20", "resnet56"):
        run = read_run(out / model)
        assert run.train[-1][0] == run.test[-1][0] == 28  # 120 images at batch 16, 4 epochs
        assert len(run.test) == 4

    # The page is rewritten from the runs and what the training invocation kept, without training.
    md.unlink()
    assert degradation.main(["--quick", "--out", str(out), "--report-dir", str(report_dir), "--report-only"]) == 0
    assert md.read_text() == text
