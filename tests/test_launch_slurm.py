"""launch/slurm_resnet50.sh on a real two-node Slurm (tests/slurm_cluster.py): gloo on CPU, one worker per node."""
import subprocess

import pytest

from tests.helpers import (
    ROOT,
    assert_same_model,
    final_checkpoint,
    free_port,
    last_train_step,
    launch_env,
    metrics,
    short_run,
    wait_for,
    wait_until_final,
)

pytestmark = pytest.mark.slow  # every test here trains in real processes

SCRIPT = ROOT / "launch" / "slurm_resnet50.sh"
# Each emulated node has 2 CPUs on a 2-core machine: one intra-op thread per worker avoids oversubscription.
SLURM_OVERRIDES = ["train.threads=1"]


def submit(cluster, runs_root, overrides):
    """sbatch the launcher on both nodes for a CPU run; returns (job id, run dir, job log)."""
    env = cluster.env(launch_env(NPROC_PER_NODE=1, MASTER_PORT=free_port(), RUNS_ROOT=runs_root))
    out = subprocess.run(["sbatch", "--parsable", "-N2", "--gpus-per-node=0", "--time=20",
                          f"--output={runs_root}/%j.out", str(SCRIPT), *SLURM_OVERRIDES, *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    return job_id, runs_root / f"slurm-{job_id}", runs_root / f"{job_id}.out"


def read(path):
    return path.read_text(errors="replace") if path.exists() else "(no job log)"


def assert_ran_on_both_nodes(log, run_dir):
    assert "0: node n1: starting torchrun" in log and "1: node n2: starting torchrun" in log, log
    assert final_checkpoint(run_dir)["world_size"] == 2


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, tiny_demo):
    job_id, run_dir, log = submit(slurm, tmp_path_factory.mktemp("slurm_runs"), short_run(tiny_demo, epochs=3))
    job = wait_until_final(slurm, job_id, 300)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), read(log)
    return run_dir


def test_demo_reaches_its_accuracy_across_two_nodes(slurm, tmp_path):
    """The expensive one: the whole demo schedule (a few minutes of both cores), its dataset made by rank 0."""
    demo = tmp_path / "demo"
    job_id, run_dir, log = submit(slurm, tmp_path, [f"data.root={demo}", "monitor.wandb=false"])
    job = wait_until_final(slurm, job_id, 1200)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), read(log)
    assert_ran_on_both_nodes(read(log), run_dir)
    final_val = metrics(run_dir, "val")[-1]
    assert final_val["top1"] >= 90, final_val


def test_usr1_checkpoints_requeues_and_resumes_bitwise(slurm, tmp_path, tiny_demo, uninterrupted):
    job_id, run_dir, log = submit(slurm, tmp_path, short_run(tiny_demo, epochs=3))
    # Past the step-4 checkpoint, mid-epoch: the stop must save its own checkpoint, not fall back to step 4.
    wait_for(lambda: last_train_step(run_dir) >= 6, 180, f"step 6 of job {job_id}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env(), check=True)
    job = wait_until_final(slurm, job_id, 300)
    text = read(log)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "requeueing job" in text and "resuming at step" in text, text
    stopped_at = int(text.split("stopping on a signal at step ")[1].split(";")[0])
    assert stopped_at >= 6 and f"resuming at step {stopped_at}" in text, text
    assert_ran_on_both_nodes(text, run_dir)
    assert_same_model(run_dir, uninterrupted)


def test_scancel_saves_and_does_not_requeue(slurm, tmp_path, tiny_demo):
    job_id, run_dir, log = submit(slurm, tmp_path, short_run(tiny_demo, epochs=3))
    wait_for(lambda: last_train_step(run_dir) >= 2, 180, f"step 2 of job {job_id}")
    subprocess.run(["scancel", job_id], env=slurm.env(), check=True)
    job = wait_until_final(slurm, job_id, 120)
    text = read(log)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), text
    assert "stopping on a signal at step" in text and "requeueing" not in text, text
    assert final_checkpoint(run_dir)["step"] == int(text.split("stopping on a signal at step ")[1].split(";")[0])
