"""`python -m trainer.lr_find`: fast.ai's suggestions and smoothing on known curves, the ramp and its stopping
rules on a fake trainer, and the real test on the DALI CPU pipeline, in this process and under torchrun."""
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, TINY, module_command, trainer_env
from trainer.lr_find import main, range_test, smooth, suggest

GRID = np.round(np.arange(-6, 1.001, 0.05), 2)  # log10 of the lr, as a 141-step ramp from 1e-6 to 10 reads it


def curve(loss_at) -> tuple:
    return [float(10**x) for x in GRID], [loss_at(x) for x in GRID]


def single_valley(x):
    """Flat until lr 1e-2, then down a cosine to its minimum at lr 1 (steepest at 0.1), then a steep climb."""
    if x < -2:
        return 2.3
    return 1.3 + 0.5 * (1 + math.cos(math.pi * (x + 2) / 2)) if x <= 0 else 1.3 + 3 * x


def drop_then_slope(x):
    """Flat until 1e-3, a sharp drop centred on 10**-2.5, then a gentle slope down to the minimum at lr 1."""
    if x < -3:
        return 2.3
    if x < -2:
        return 1.5 + 0.4 * (1 + math.cos(math.pi * (x + 3)))
    return 1.5 - 0.1 * (x + 2) if x <= 0 else 1.3 + 3 * x


def decades(suggestions: dict) -> dict:
    return {name: round(math.log10(lr), 2) for name, lr in suggestions.items()}


def test_a_single_valley_gives_its_middle_its_steepest_point_and_a_tenth_of_its_minimum():
    lrs, losses = curve(single_valley)
    got = decades(suggest(lrs, losses, steps=len(lrs)))
    # Each is lr 0.1 here, to within one or two points of the 0.05-decade grid.
    assert got == pytest.approx({"valley": -1, "steepest": -1, "min/10": -1}, abs=0.11)


def test_the_three_suggestions_read_different_features_of_the_curve():
    lrs, losses = curve(drop_then_slope)
    got = decades(suggest(lrs, losses, steps=len(lrs)))
    # valley: half-way down the whole descent (1e-3 to 1); steepest: the drop; min/10: a tenth of lr 1.
    assert got == pytest.approx({"valley": -1.5, "steepest": -2.5, "min/10": -1}, abs=0.11)


def blow_up_then_fall_back(x):
    """single_valley until lr 1, a spike past it, then a steep fall back that is not a descent to read."""
    if x <= 0:
        return single_valley(x)
    return 4.0 - 4.0 * (x - 0.5) if x > 0.5 else 1.3 + 5.4 * x


def test_steepest_is_read_on_the_way_down_to_the_minimum_only():
    lrs, losses = curve(blow_up_then_fall_back)
    assert decades(suggest(lrs, losses, steps=len(lrs)))["steepest"] == pytest.approx(-1, abs=0.11)


def test_the_first_tenth_and_the_last_five_points_are_not_read():
    lrs, losses = curve(single_valley)
    losses[3] = -100.0  # a minimum in the first tenth, as a fresh net's first steps can show
    losses[-2] = -100.0  # and one among the last points
    assert decades(suggest(lrs, losses, steps=len(lrs)))["min/10"] == pytest.approx(-1, abs=0.11)


def test_a_curve_too_short_to_read_is_an_error_that_names_the_way_out():
    with pytest.raises(Exception, match="lower --end-lr or raise --steps"):
        suggest([1e-3, 1e-2, 1e-1], [1.0, 2.0, 9.0], steps=100)


def test_the_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)  # no pull towards 0 at the start
    beta = 0.98
    assert smooth([1.0, 0.0, 0.0]) == pytest.approx([1.0, beta / (1 + beta), beta**2 / (1 + beta + beta**2)])


class FakeTrainer:
    """What range_test uses of a Trainer: the optimizer, the scheduler its step steps, the model and train_step,
    whose loss is a function of the lr."""

    def __init__(self, loss_at):
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)  # the run's own
        self.model = torch.nn.Identity()
        self.loss_at = loss_at

    def train_step(self, micro_batches):
        loss = self.loss_at(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        return torch.tensor(4 * loss), torch.tensor(0), 4  # summed over 4 images, as Trainer.train_step


def fake_test(loss_at, steps=20):
    return range_test(FakeTrainer(loss_at), iter(lambda: [], None), 1e-4, 1.0, steps)


def test_the_ramp_replaces_the_schedule_and_rises_exponentially_from_start_to_end():
    lrs, losses, stopped = fake_test(lambda lr: 1.0)
    assert lrs == pytest.approx([1e-4 * 1e4 ** (k / 19) for k in range(20)], rel=1e-9)
    assert losses == [1.0] * 20 and stopped == "--steps 20 ran"


def test_the_test_stops_once_the_smoothed_loss_passes_four_times_its_minimum():
    lrs, losses, stopped = fake_test(lambda lr: 1.0 if lr < 1e-2 else 1000.0)
    assert "passed 4x its minimum" in stopped
    smoothed = smooth(losses)
    assert smoothed[-1] > 4 * min(smoothed) and smoothed[-2] <= 4 * min(smoothed[:-1])
    assert len(lrs) == len(losses) < 20


def test_a_non_finite_loss_stops_the_test_and_is_not_recorded():
    lrs, losses, stopped = fake_test(lambda lr: 1.0 if lr < 1e-2 else math.nan)
    # The ramp first passes 1e-2 at its 11th step: 1e-4 * 1e4 ** (10 / 19) = 0.0127.
    assert stopped == "the loss was not finite at step 11 (lr 0.0127)"
    assert losses == [1.0] * 10 and len(lrs) == 10


def lr_find_argv(data_root, *extra):
    return ["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, f"data.root={data_root}", "data.demo=false",
            "--steps", "30", *extra]


@pytest.mark.slow
def test_one_process_writes_the_plot_and_the_data_and_proposes_an_lr_within_the_ramp(tiny_data, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: runs/lr_find/<config name>
    assert main(lr_find_argv(tiny_data)) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "runs" / "lr_find" / "demo"
    assert (out / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    result = json.loads((out / "lr_find.json").read_text())
    # 24 steps per epoch at batch 4: the ramp goes on into the second epoch unless the loss diverges first.
    assert 10 < len(result["lrs"]) == len(result["losses"]) == len(result["smoothed"]) <= 30
    assert result["lrs"][0] == 1e-6 and result["global_batch"] == 4
    proposal = result["proposal"]
    assert proposal["method"] == "valley" and 1e-6 <= proposal["lr"] <= 10
    assert proposal["optim.lr"] == pytest.approx(proposal["lr"] * 256 / 4)
    assert f"optim.lr={proposal['optim.lr']:.3g}\n" in capsys.readouterr().out
    assert result["config"]["run"]["dir"] == "runs/lr_find/demo" and result["config"]["model"]["name"] == "resnet20"
    assert not any((out / "checkpoints").iterdir())  # a test, not a run: nothing to resume from


@pytest.mark.slow
def test_two_processes_stop_together_when_the_loss_diverges(tiny_data, tmp_path):
    out = tmp_path / "lr"
    # A ramp to an lr of 1e5, which no net survives: the test must stop before its last step.
    argv = lr_find_argv(tiny_data, "--start-lr", "1e-3", "--end-lr", "1e5", "--out", str(out))
    result = subprocess.run(module_command(2, "trainer.lr_find", *argv), cwd=ROOT, env=trainer_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((out / "lr_find.json").read_text())
    # Each rank stops on the loss averaged over both: a rank that stopped alone would leave the other waiting in
    # DDP's all-reduce until the timeout.
    assert found["global_batch"] == 8 and 10 < len(found["lrs"]) < 30
    assert found["stopped"].startswith(("the smoothed loss passed 4x", "the loss was not finite"))
    assert result.stdout.count("<- proposed") == 1  # rank 0 alone reports


@pytest.mark.parametrize("extra, needle", [
    (["train.bogus=1"], "config error: train.bogus: "),
    (["--steps", "3"], "config error: --steps: must be >= 10"),
    (["--start-lr", "1", "--end-lr", "0.1"], "config error: --end-lr: must be finite and above --start-lr=1.0"),
])
def test_bad_input_is_exit_2_before_any_work(tmp_path, capsys, extra, needle):
    assert main(lr_find_argv(tmp_path / "no_data", "--out", str(tmp_path / "lr"), *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "lr").exists()


def test_a_training_runs_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-000000005.pt").write_bytes(b"")
    assert main(lr_find_argv(tmp_path / "no_data", "--out", str(run))) == 2
    assert "holds a training run's checkpoints" in capsys.readouterr().err
