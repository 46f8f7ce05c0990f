"""Real 2-process DDP runs (torchrun, gloo, DALI CPU): exact resume after SIGKILL (of the job, or of its torchrun agent
alone), exact evaluation, signals."""
import json
import math
import os
import re
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    DDP_RUN,
    ROOT,
    TINY,
    final_checkpoint,
    last_train_step,
    main_in_process,
    make_coded,
    metrics,
    module_command,
    run_trainer,
    trainer_command,
    trainer_env,
    wait_for,
    worker_pids,
)
from trainer.optim import ScheduleConfig, lr_factor

pytestmark = pytest.mark.slow  # every test here trains in real processes

TIMING = {"img_per_s", "img_per_s_per_device", "data_wait", "data_wait_max", "step_time_s", "max_mem_mb",
          "max_mem_allocated_mb"}
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


def kill_job(proc):
    """SIGKILL to the workers and their torchrun agent, as a node loss would: torchrun starts each worker in a
    session of its own, so killing the agent's process group alone would let them save and stop (they follow their
    agent), not lose what they did since the last checkpoint."""
    for pid in worker_pids(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / f"ckpt-{STEPS:09d}.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(ddp_run):
    """conftest's ddp_run, shared with test_evaluate: helpers.DDP_RUN on tiny_data."""
    return ddp_run


def test_two_ranks_train_and_only_rank0_writes(uninterrupted):
    run_dir, result = uninterrupted
    assert result.stdout.count("done: step 24") == 1
    # The console is rank 0's; each rank's own log is in its file, rank 1's included.
    for rank in (0, 1):
        lines = (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert any(f" rank {rank} INFO run dir: " in line for line in lines)
        assert any(f" rank {rank} INFO done: step 24" in line for line in lines)
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    # 24 steps of batch 4 are too few for the loss to fall reliably: that is the demo's test (test_launch_slurm).
    assert all(math.isfinite(r["loss"]) for r in train)
    val = metrics(run_dir, "val")
    assert [r["step"] for r in val] == [12, 24] and all(r["samples"] == 16 for r in val)
    state = final_state(run_dir)
    assert state["world_size"] == 2 and len(state["loader"]) == 2 and len(state["rng"]) == 2


def kill_mid_epoch_and_resume_bitwise(whole_dir, overrides, run_dir):
    """Runs the uninterrupted run's command (its `overrides`) into run_dir, SIGKILLs it mid-epoch 2, runs the same
    command again and checks that it ends as the uninterrupted run did, bitwise."""
    command = trainer_command(2, *overrides, f"run.dir={run_dir}")
    proc = subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_step(proc, run_dir, 17)  # checkpoints at 5, 10, 12 (epoch end), 15: killed mid-epoch 2
    finally:
        kill_job(proc)
    killed_at = last_train_step(run_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest in ("ckpt-000000015.pt", "ckpt-000000020.pt")

    result = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step" in result.stdout
    assert_ends_as(whole_dir, run_dir, killed_at)


def assert_ends_as(whole_dir, run_dir, killed_at):
    """The run in run_dir, killed after step `killed_at` and resumed, ended as the uninterrupted one did, bitwise."""
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


def test_sigkill_mid_epoch_then_same_command_resumes_bitwise(uninterrupted, tiny_data, tmp_path):
    kill_mid_epoch_and_resume_bitwise(uninterrupted[0], [*DDP_RUN, f"data.root={tiny_data}"], tmp_path / "killed")


def test_sigkill_mid_epoch_on_shards_then_same_command_resumes_bitwise(tiny_shards, tmp_path):
    data = ["data.format=webdataset", f"data.root={tiny_shards}"]
    whole = run_trainer(2, *TINY, *data, f"run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert [r["samples"] for r in metrics(tmp_path / "whole", "val")] == [16, 16]
    kill_mid_epoch_and_resume_bitwise(tmp_path / "whole", [*TINY, *data], tmp_path / "killed")


def running(pid) -> bool:
    """Whether process `pid` still runs (an exited orphan may stay a zombie a while, until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_of_the_torchrun_agent_stops_its_workers_and_the_same_command_resumes_bitwise(uninterrupted,
                                                                                            tiny_data, tmp_path):
    # torchrun starts each worker in a session of its own: a SIGKILL of the agent alone (the OOM killer's pick, a
    # kill by hand) reaches no worker, and left them training on as orphans, holding run.dir (and GPUs).
    run_dir = tmp_path / "run"
    command = trainer_command(2, *DDP_RUN, "train.stop_check_every=1", f"data.root={tiny_data}", f"run.dir={run_dir}")
    with open(tmp_path / "first.log", "w") as out:  # the orphans' output has no reader once the agent is gone
        agent = subprocess.Popen(command, cwd=ROOT, env=trainer_env(), stdout=out, stderr=subprocess.STDOUT)
    workers = {}
    try:
        wait_for(lambda: last_train_step(run_dir) >= 17 or agent.poll() is not None, 240, "step 17", interval_s=0.02)
        assert agent.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        killed_after = last_train_step(run_dir)  # mid-epoch 1 (12 steps an epoch), past the step-15 checkpoint
        workers = worker_pids(agent.pid)
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        killed = time.monotonic()
        agent.wait()
        wait_for(lambda: not any(map(running, workers.values())), 60, "the workers to exit after their agent")
        print(f"the workers exited {time.monotonic() - killed:.1f} s after their agent was killed")
    finally:
        for pid in filter(running, workers.values()):
            os.kill(pid, signal.SIGKILL)
    logs = [(run_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    stopped = {int(m) for log in logs for m in re.findall(r"stopping on a signal at step (\d+)", log)}
    assert len(stopped) == 1, (tmp_path / "first.log").read_text()[-3000:]
    stopped_at = stopped.pop()
    assert killed_after <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"ckpt-{stopped_at:09d}.pt"

    result = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in result.stdout
    assert_ends_as(uninterrupted[0], run_dir, stopped_at)


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


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """39 train images, each a solid colour that names it (helpers.make_coded): 9 steps of 4 per epoch."""
    root = tmp_path_factory.mktemp("coded")
    make_coded(str(root), train_per_class=13, val_per_class=2)
    return root


CODED_STEPS = 9  # per epoch at a global batch of 4: 36 of the 39 images, 3 dropped


def recording(nproc, coded, run_dir, records, *extra):
    command = module_command(nproc, "tests.workers.record_train", *TINY, "train.batch_size=2",
                             "checkpoint.every_steps=2", f"data.root={coded}", f"run.dir={run_dir}", *extra)
    return command, trainer_env(RECORD_DIR=str(records))


def codes_read(records, epoch, up_to_step):
    """The images the recorded ranks read for the steps of `epoch` up to `up_to_step` (a SIGKILL may tear the
    last line; steps past a checkpoint that a resume repeats are left out by `up_to_step`)."""
    seen = []
    for path in sorted(records.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["epoch"] == epoch and record["step"] <= up_to_step:
                seen += record["codes"]
    return seen


def lr_is_the_schedules(run_dir, global_batch):
    factor = partial(lr_factor, ScheduleConfig(warmup_epochs=0.5), steps_per_epoch=CODED_STEPS,
                     total_steps=2 * CODED_STEPS)
    return all(r["lr"] == pytest.approx(0.1 * global_batch / 256 * factor(r["step"]), rel=1e-6)
               for r in metrics(run_dir, "train"))


def test_sigkill_on_two_ranks_then_one_rank_reads_the_rest_of_the_epoch_once(coded, tmp_path):
    run_dir = tmp_path / "run"
    command, env = recording(2, coded, run_dir, tmp_path / "two")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_step(proc, run_dir, 3)  # checkpoints every 2 steps: killed mid-epoch 1
    finally:
        kill_job(proc)
    assert last_train_step(run_dir) < CODED_STEPS, "the first epoch ended before the kill"
    checkpoint = final_checkpoint(run_dir)
    saved_at = checkpoint["step"]
    assert 2 <= saved_at < CODED_STEPS and checkpoint["world_size"] == 2

    command, env = recording(1, coded, run_dir, tmp_path / "one")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    # The per-rank batch stays 2; accumulating 2 keeps the global batch of 4.
    assert "resuming with train.grad_accum=2 (was 1): applied" in result.stdout
    assert f"global batch 4, {CODED_STEPS} steps/epoch, resuming at step {saved_at}" in result.stdout
    assert "exact in coverage, not bitwise" in result.stdout

    seen = codes_read(tmp_path / "two", 0, saved_at) + codes_read(tmp_path / "one", 0, CODED_STEPS)
    assert len(seen) == len(set(seen)) == 4 * CODED_STEPS and set(seen) <= set(range(39))
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 2 * CODED_STEPS + 1))
    assert lr_is_the_schedules(run_dir, 4)
    final = final_checkpoint(run_dir)
    assert final["step"] == 2 * CODED_STEPS and final["world_size"] == 1 and final["images_seen"] == 4 * 18


def test_a_one_rank_run_resumes_on_two_ranks_with_the_global_batch_kept(coded, tmp_path):
    run_dir = tmp_path / "run"
    # 1 rank x batch 4, with an EMA, stopped after step 3 (saved there).
    command, env = recording(1, coded, run_dir, tmp_path / "one", "train.batch_size=4", "optim.ema_decay=0.9")
    first = subprocess.run([*command, "train.max_steps=3"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]

    command, env = recording(2, coded, run_dir, tmp_path / "two", "train.batch_size=4", "optim.ema_decay=0.9")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    # 4 images a step cannot be 4 per rank on 2 ranks: the per-rank batch halves instead.
    assert "resuming with train.batch_size=2 (was 4): applied" in result.stdout
    assert f"global batch 4, {CODED_STEPS} steps/epoch, resuming at step 3" in result.stdout

    seen = codes_read(tmp_path / "one", 0, 3) + codes_read(tmp_path / "two", 0, CODED_STEPS)
    assert len(seen) == len(set(seen)) == 4 * CODED_STEPS
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 2 * CODED_STEPS + 1))
    assert [r["step"] for r in metrics(run_dir, "val_ema")] == [3, CODED_STEPS, 2 * CODED_STEPS]
    assert lr_is_the_schedules(run_dir, 4)
    assert final_checkpoint(run_dir)["world_size"] == 2


def test_a_global_batch_that_cannot_be_split_over_the_new_ranks_is_refused(coded, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = main_in_process([*TINY, "train.batch_size=3", "checkpoint.every_steps=2", f"data.root={coded}",
                                    f"run.dir={run_dir}", "train.max_steps=1"], capsys)  # one rank, in this process
    assert code == 0, err[-3000:]
    result = run_trainer(2, *TINY, "train.batch_size=3", f"data.root={coded}", f"run.dir={run_dir}")
    assert result.returncode != 0  # each worker exits 2; torchrun reports a failed worker as 1
    assert "config error (on rank 0): train.batch_size:" in result.stderr
    assert "the checkpoint's global batch of 3 (3 x 1 ranks x 1 accumulated) cannot be kept on 2 ranks" \
        in result.stderr
