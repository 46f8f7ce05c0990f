"""The chaos suite: the faults and bad inputs of a shared cluster, each against the real trainer in processes.

Each test asserts the exit code, a message that names what is wrong, and that no checkpoint or metric record
was lost. docs/reliability.md tabulates them. Where a process around the trainer would add only its start-up (a
checkpoint that fails to load, pruning), trainer.main runs in this process, and one case of each also in a real one.
"""
import os
import random
import resource
import shutil
import signal
import subprocess

import pytest
import torch

from tests.helpers import ROOT, TINY, main_in_process, metrics, run_trainer, trainer_command, trainer_env, wait_for

pytestmark = pytest.mark.slow

# One process at batch 8 on tiny_data: 12 steps per epoch, 24 in the run.
ONE = [*TINY, "train.batch_size=8", "monitor.progress=false"]


def args(tiny_data, run_dir, *extra):
    return [*ONE, f"data.root={tiny_data}", f"run.dir={run_dir}", *extra]


def checkpoint_steps(run_dir):
    return sorted(int(p.name[5:14]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt"))


def latest(run_dir):
    ckpts = run_dir / "checkpoints"
    return torch.load(ckpts / (ckpts / "latest").read_text().strip(), map_location="cpu", weights_only=True)


def train_steps(run_dir):
    return [r["step"] for r in metrics(run_dir, "train")]


@pytest.fixture(scope="module")
def four_steps(tiny_data, tmp_path_factory):
    """A run stopped at step 4 with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    result = run_trainer(1, *args(tiny_data, run_dir, "train.max_steps=4", "checkpoint.every_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(run_dir) == [2, 4]
    return run_dir


def run_in_a_process(argv) -> tuple:
    result = run_trainer(1, *argv)
    return result.returncode, result.stdout, result.stderr


def copy_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _corrupt(path, how, tmp_path):
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "zeroed":
        path.write_bytes(bytes(path.stat().st_size))
    elif how == "nan_weights":
        state = torch.load(path, weights_only=True)
        next(t for t in state["model"].values() if t.is_floating_point())[0] = float("nan")
        torch.save(state, path)
    elif how == "malicious":
        exploit = _Exploit()
        exploit.marker = tmp_path / "pwned"
        torch.save({"model": exploit}, path)


@pytest.mark.parametrize("how, where", [("truncated", "in process"), ("zeroed", "in process"),
                                        ("nan_weights", "in process"), ("malicious", "in a process")])
def test_a_bad_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(four_steps, tiny_data, tmp_path, how,
                                                                          where, capsys):
    run_dir = copy_run(four_steps, tmp_path)
    bad = run_dir / "checkpoints" / "ckpt-000000004.pt"
    _corrupt(bad, how, tmp_path)
    argv = args(tiny_data, run_dir, "train.max_steps=6", "checkpoint.every_steps=2")
    code, out, err = main_in_process(argv, capsys) if where == "in process" else run_in_a_process(argv)
    assert code == 0, err[-3000:]
    assert f"checkpoint {bad} is unreadable" in err and "resuming at step 2" in out
    assert not (tmp_path / "pwned").exists()  # weights_only: the pickle's code never ran
    assert bad.with_name(bad.name + ".unreadable").is_file()  # kept for a look, never loaded or pruned
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 redone once, not duplicated
    assert latest(run_dir)["step"] == 6


def test_pruning_keeps_the_checkpoint_just_written_when_a_newer_file_is_corrupt(four_steps, tiny_data, tmp_path,
                                                                                capsys):
    # The repro: a newer-numbered unreadable file used to outlive the checkpoint just written.
    run_dir = copy_run(four_steps, tmp_path)
    _corrupt(run_dir / "checkpoints" / "ckpt-000000004.pt", "truncated", tmp_path)
    code, _, err = main_in_process(args(tiny_data, run_dir, "train.max_steps=3", "checkpoint.every_steps=1",
                                       "checkpoint.keep=1"), capsys)
    assert code == 0, err[-3000:]
    assert checkpoint_steps(run_dir) == [3]
    assert latest(run_dir)["step"] == 3
    assert train_steps(run_dir) == [1, 2, 3]
    # and the next run resumes from it
    code, out, _ = main_in_process(args(tiny_data, run_dir, "train.max_steps=5", "checkpoint.every_steps=1",
                                       "checkpoint.keep=1"), capsys)
    assert code == 0 and "resuming at step 3" in out


def test_a_run_whose_checkpoints_all_fail_to_load_is_refused_not_restarted(four_steps, tiny_data, tmp_path,
                                                                           capsys):
    run_dir = copy_run(four_steps, tmp_path)
    for path in (run_dir / "checkpoints").glob("ckpt-*.pt"):
        _corrupt(path, "zeroed", tmp_path)
    records = (run_dir / "metrics.jsonl").read_text()
    code, _, err = main_in_process(args(tiny_data, run_dir, "train.max_steps=6"), capsys)
    assert code == 1
    assert "none of the 2 checkpoints" in err and str(run_dir / "checkpoints") in err
    assert (run_dir / "metrics.jsonl").read_text() == records  # nothing truncated
    assert checkpoint_steps(run_dir) == [2, 4]  # nothing deleted or set aside


def _kill_when(process, condition):
    wait_for(lambda: condition() or process.poll() is not None, 120, "the moment to kill", interval_s=0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_at_any_moment_loses_nothing(tiny_data, tmp_path):
    """SIGKILL mid-save (a temp file exists), right after a save, and at random moments; then the run finishes
    with every step logged once and the same final weights as an uninterrupted run."""
    run_dir = tmp_path / "run"
    command = trainer_command(1, *args(tiny_data, run_dir, "checkpoint.every_steps=2", "train.epochs=2"))
    ckpts = run_dir / "checkpoints"
    moments = [
        lambda: any(ckpts.glob(".ckpt-*.tmp")),  # in the middle of writing a checkpoint
        lambda: len(checkpoint_steps(run_dir)) >= 4,
    ]
    rng = random.Random(0)
    for _ in range(2):
        at = rng.randint(1, 20)
        moments.append(lambda at=at: max(train_steps(run_dir), default=0) >= at)
    for moment in moments:
        process = subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        _kill_when(process, moment)
        assert process.returncode == -signal.SIGKILL  # killed, not finished
    result = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_steps(run_dir) == list(range(1, 25))
    reference = tmp_path / "reference"
    result = run_trainer(1, *args(tiny_data, reference, "checkpoint.every_steps=2", "train.epochs=2"))
    assert result.returncode == 0
    ours, theirs = latest(run_dir), latest(reference)
    assert ours["step"] == theirs["step"] == 24
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 6 MiB tmpfs (room for one tiny-model checkpoint and a bit); needs root's mount."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers a full disk")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_stops_with_the_bytes_needed_and_the_run_resumes(tiny_data, small_disk):
    run_dir = small_disk / "run"
    result = run_trainer(1, *args(tiny_data, run_dir, "checkpoint.every_steps=2"))
    assert result.returncode == 1
    assert "not enough space for checkpoint" in result.stderr and "MiB needed" in result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoint_steps(run_dir) == [2] and latest(run_dir)["step"] == 2
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    # The disk is still full: the rerun starts (metrics are cut in place), resumes, and stops the same way.
    result = run_trainer(1, *args(tiny_data, run_dir, "checkpoint.every_steps=2"))
    assert result.returncode == 1 and "resuming at step 2" in result.stdout
    assert "not enough space for checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert train_steps(run_dir)[:4] == [1, 2, 3, 4]


def _limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_write_that_fails_midway_leaves_no_temp_file_and_names_the_path(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    command = trainer_command(1, *args(tiny_data, run_dir, "train.max_steps=2", "checkpoint.every_steps=1"))
    result = subprocess.run(command, cwd=ROOT, env=trainer_env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True,
                            text=True, timeout=300, check=False, preexec_fn=_limit_file_size(500_000))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"could not write checkpoint {run_dir / 'checkpoints' / 'ckpt-000000001.pt'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((run_dir / "checkpoints").iterdir())


def test_a_second_job_on_a_busy_run_dir_is_refused_and_a_dead_ones_lock_is_not(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    command = trainer_command(1, *args(tiny_data, run_dir, "train.epochs=50"))
    first = subprocess.Popen(command, cwd=ROOT, env=trainer_env(SLURM_JOB_ID="4242"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: checkpoint_steps(run_dir), 120, "the first job's first checkpoint")
        second = run_trainer(1, *args(tiny_data, run_dir, "train.epochs=50"))
        assert second.returncode == 2
        assert "is in use by another job" in second.stderr
        assert f'"pid": {first.pid}' in second.stderr and '"slurm_job": "4242"' in second.stderr
        assert first.poll() is None  # the first job was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead job's lock: its requeue resumes and trains on.
    resume_at = latest(run_dir)["step"]
    third = run_trainer(1, *args(tiny_data, run_dir, f"train.max_steps={resume_at + 3}", "train.epochs=50"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming at step {resume_at}" in third.stdout and f"done: step {resume_at + 3}" in third.stdout


def test_a_resume_applies_a_new_lr_and_records_it(four_steps, tiny_data, tmp_path, capsys):
    changed, unchanged = copy_run(four_steps, tmp_path / "changed"), copy_run(four_steps, tmp_path / "unchanged")
    code, out, err = main_in_process(args(tiny_data, changed, "train.max_steps=6", "checkpoint.every_steps=2",
                                         "optim.lr=0.2"), capsys)
    assert code == 0, err[-3000:]
    assert "resuming with optim.lr=0.2 (was 0.1): applied" in out
    assert main_in_process(args(tiny_data, unchanged, "train.max_steps=6", "checkpoint.every_steps=2"), capsys)[0] == 0
    lr = {r["step"]: r["lr"] for r in metrics(changed, "train")}
    reference = {r["step"]: r["lr"] for r in metrics(unchanged, "train")}
    assert lr[4] == reference[4]
    assert lr[5] == pytest.approx(2 * reference[5]) and lr[6] == pytest.approx(2 * reference[6])
    assert "lr: 0.2" in (changed / "config.yaml").read_text()
    history = (changed / "config_changes.jsonl").read_text()
    assert '"step": 4' in history and '"optim.lr": [0.1, 0.2]' in history


def test_a_resume_that_would_change_the_meaning_is_refused_and_not_recorded(four_steps, tiny_data, tmp_path,
                                                                            capsys):
    run_dir = copy_run(four_steps, tmp_path)
    config = (run_dir / "config.yaml").read_text()
    records = (run_dir / "metrics.jsonl").read_text()
    code, _, err = main_in_process(args(tiny_data, run_dir, "train.max_steps=6", "checkpoint.every_steps=2",
                                       "schedule.name=step", "train.label_smoothing=0.2"), capsys)
    assert code == 2
    assert "config error" in err and "schedule.name=cosine (now step)" in err
    assert "train.label_smoothing=0.1 (now 0.2)" in err
    assert (run_dir / "config.yaml").read_text() == config and not (run_dir / "config_changes.jsonl").exists()
    assert (run_dir / "metrics.jsonl").read_text() == records and checkpoint_steps(run_dir) == [2, 4]


def test_the_demo_dataset_is_not_generated_into_a_folder_of_other_files(tmp_path, capsys):
    root = tmp_path / "imagenet"
    root.mkdir()
    (root / "README").write_text("somebody's data")
    code, _, err = main_in_process([*ONE, "data.demo=true", f"data.root={root}", f"run.dir={tmp_path / 'run'}"], capsys)
    assert code == 1
    assert f"{root}: not empty and not made by make_demo_dataset (README)" in err
    assert [p.name for p in root.iterdir()] == ["README"]
