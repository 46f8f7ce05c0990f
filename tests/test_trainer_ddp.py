"""Real 2-process DDP runs (torchrun, gloo, DALI CPU): exact resume after SIGKILL, exact evaluation, signals."""
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

from tests.helpers import (
    ROOT,
    TINY,
    last_train_step,
    metrics,
    module_command,
    run_trainer,
    trainer_command,
    trainer_env,
    wait_for,
    worker_pids,
)

pytestmark = pytest.mark.slow  # every test here trains in real processes

TIMING = {"img_per_s", "data_wait", "step_time_s", "max_mem_mb"}
STEPS = 24  # 2 epochs x 12 steps


def without_timing(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def wait_for_step(proc, run_dir, step, deadline_s=240):
    """Polls metrics.jsonl until a train record reaches `step`; the run's own output is the synchronisation."""
    def reached():
        if last_train_step(run_dir) >= step:
            return True
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()[-3000:]}"
        return False
    wait_for(reached, deadline_s, f"step {step}", interval_s=0.02)


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / f"ckpt-{STEPS:09d}.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "whole"
    result = run_trainer(2, *TINY, f"data.root={tiny_data}", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_two_ranks_train_and_only_rank0_writes(uninterrupted):
    run_dir, result = uninterrupted
    assert result.stdout.count("done: step 24") == 1
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert train[-1]["loss"] < train[0]["loss"]
    val = metrics(run_dir, "val")
    assert [r["step"] for r in val] == [12, 24] and all(r["samples"] == 16 for r in val)
    state = final_state(run_dir)
    assert state["world_size"] == 2 and len(state["loader"]) == 2 and len(state["rng"]) == 2


def test_sigkill_mid_epoch_then_same_command_resumes_bitwise(uninterrupted, tiny_data, tmp_path):
    whole_dir, _ = uninterrupted
    run_dir = tmp_path / "killed"
    command = trainer_command(2, *TINY, f"data.root={tiny_data}", f"run.dir={run_dir}")
    proc = subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_step(proc, run_dir, 17)  # checkpoints at 5, 10, 12 (epoch end), 15: killed mid-epoch 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = last_train_step(run_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest in ("ckpt-000000015.pt", "ckpt-000000020.pt")

    result = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step" in result.stdout

    whole, resumed = final_state(whole_dir), final_state(run_dir)
    for part in ("model", "optimizer"):
        flat_whole = torch.utils._pytree.tree_flatten(whole[part])[0]
        flat_resumed = torch.utils._pytree.tree_flatten(resumed[part])[0]
        assert len(flat_whole) == len(flat_resumed)
        for a, b in zip(flat_whole, flat_resumed):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, part
    def after(recs):
        return without_timing([r for r in recs if r["step"] > killed_at])
    assert after(metrics(run_dir)) == after(metrics(whole_dir))
    # The log holds each step once: records past the checkpoint were dropped on resume.
    steps = [r["step"] for r in metrics(run_dir, "train")]
    assert steps == list(range(1, STEPS + 1))


def test_evaluation_with_two_ranks_equals_one(uninterrupted):
    checkpoint = uninterrupted[0] / "checkpoints" / f"ckpt-{STEPS:09d}.pt"

    def evaluate(nproc):
        return subprocess.run(module_command(nproc, "tests.workers.evaluate", str(checkpoint)), cwd=ROOT,
                              env=trainer_env(), capture_output=True, text=True, timeout=300, check=False)
    one, two = evaluate(1), evaluate(2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    m1, m2 = json.loads(one.stdout.splitlines()[-1]), json.loads(two.stdout.splitlines()[-1])
    assert m1["samples"] == m2["samples"] == 16
    assert (m1["top1"], m1["top5"]) == (m2["top1"], m2["top5"])
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)


@pytest.mark.parametrize("signum, code", [(signal.SIGUSR1, 0), (signal.SIGTERM, 143)])
def test_signal_to_one_rank_stops_all_at_one_step_with_a_checkpoint(signum, code, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # No periodic checkpoints: the only mid-epoch checkpoint can come from the signal.
    command = trainer_command(2, *TINY, "checkpoint.every_steps=0", "train.stop_check_every=2",
                              f"data.root={tiny_data}", f"run.dir={run_dir}")
    proc = subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_step(proc, run_dir, 3)
        # One rank only: the flag must reach the other through agreement.
        os.kill(worker_pids(proc.pid)[1], signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if code:
        assert proc.returncode != 0
    else:
        assert proc.returncode == 0, err[-3000:]
    assert "stopping on a signal at step" in out
    saved = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert len(saved) == 1
    step = torch.load(saved[0], weights_only=True)["step"]
    # The ranks agree every 2nd step; the signal came after step 3.
    assert 4 <= step < 12 and step % 2 == 0 and saved[0].name == f"ckpt-{step:09d}.pt"


def test_sync_bn_on_cpu_warns_once_and_accumulation_steps_count(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(2, *TINY, "train.sync_bn=true", "train.grad_accum=2", "train.max_steps=3",
                         f"data.root={tiny_data}", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("train.sync_bn=true needs CUDA") == 1
    assert "global batch 16, 6 steps/epoch" in result.stdout
    assert [r["step"] for r in metrics(run_dir, "train")] == [1, 2, 3]


def test_resuming_with_another_world_size_is_an_error(uninterrupted, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    result = run_trainer(1, *TINY, f"data.root={tiny_data}", f"run.dir={run_dir}")
    assert result.returncode == 1
    assert "world size=2, this run has world size=1" in result.stderr
