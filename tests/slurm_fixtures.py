"""The throwaway two-node Slurm cluster (tests/slurm_cluster.py) as a pytest fixture, and job helpers."""
import subprocess

import pytest

from tests.slurm_cluster import LocalSlurm, missing_reason
from tests.launch_support import wait_for

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running cluster; skipped only where Slurm is not installed or cannot run as this user."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    # A start failure on a machine that has everything is a bug and fails the tests that need the cluster.
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def job_fields(cluster, job_id):
    """scontrol's one-line record of the job as {field: value} (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=cluster.env(), capture_output=True,
                         text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_until_final(cluster, job_id, timeout_s):
    state = lambda: job_fields(cluster, job_id)["JobState"] in FINAL_STATES  # noqa: E731
    wait_for(state, timeout_s, f"job {job_id} to end", interval_s=1)
    return job_fields(cluster, job_id)
