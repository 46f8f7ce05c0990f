"""launch/torchrun_multinode.sh with real torchrun, gloo and the demo trainer on CPU: elastic restart and no hangs."""
import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # every test here trains in real processes

SCRIPT = helpers.ROOT / "launch" / "torchrun_multinode.sh"
RUN_TIMEOUT_S = 240


@contextlib.contextmanager
def running(run_dir, overrides, **env):
    """The launcher's process (torchrun after exec); on the way out nothing of it is left running."""
    with open(run_dir.parent / f"{run_dir.name}.log", "wb") as log:
        proc = subprocess.Popen([str(SCRIPT), f"run.dir={run_dir}", *overrides], cwd=helpers.ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=helpers.launch_env(NPROC_PER_NODE=2, **env))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # torchrun starts each worker in its own session: end them by pid, then the agent.
            for pid in helpers.worker_pids(proc.pid).values():
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def finish(proc, timeout_s=RUN_TIMEOUT_S):
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not exit within {timeout_s} s")


def log_of(run_dir):
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_demo):
    run_dir = tmp_path_factory.mktemp("torchrun") / "uninterrupted"
    with running(run_dir, helpers.short_run(tiny_demo), MAX_RESTARTS=0) as proc:
        assert finish(proc) == 0, log_of(run_dir)
    return run_dir


def test_killed_worker_is_restarted_and_run_matches_uninterrupted(tmp_path, tiny_demo, uninterrupted):
    run_dir = tmp_path / "elastic"
    with running(run_dir, helpers.short_run(tiny_demo), MAX_RESTARTS=1) as proc:
        # After the step-4 checkpoint and a few steps more, so that the restart must redo steps from a checkpoint.
        helpers.wait_for(lambda: helpers.last_train_step(run_dir) >= 6, 120, "step 6 of the first attempt")
        os.kill(helpers.worker_pids(proc.pid)[1], signal.SIGKILL)
        code = finish(proc)
    log = log_of(run_dir)
    assert code == 0, log
    assert "resuming at step 4" in log, log
    helpers.assert_same_model(run_dir, uninterrupted)


def test_stalled_rank_ends_the_job_within_the_timeout(tmp_path, tiny_demo):
    timeout_s = 20
    run_dir = tmp_path / "stalled"
    overrides = [*helpers.short_run(tiny_demo, epochs=20), f"distributed.timeout_s={timeout_s}"]
    with running(run_dir, overrides, MAX_RESTARTS=0) as proc:
        helpers.wait_for(lambda: helpers.last_train_step(run_dir) >= 2, 120, "step 2")
        os.kill(helpers.worker_pids(proc.pid)[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The live rank's collective fails after timeout_s; torchrun then gives the stopped worker 30 s to exit
        # before SIGKILL. Anything much beyond that would be a hang.
        code = finish(proc, timeout_s=timeout_s + 60)
        elapsed = time.monotonic() - stopped_at
    assert code != 0, log_of(run_dir)
    finished = helpers.last_train_step(run_dir) >= 20 * helpers.STEPS_PER_EPOCH
    assert not finished, "the run finished although a rank was stopped"
    print(f"stalled rank: torchrun exited {code} {elapsed:.1f} s after SIGSTOP (distributed.timeout_s={timeout_s})")
