"""The run directory, held by one job at a time: a lock that names its holder, and the config history."""
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from common.errors import UserInputError

LOCK = ".lock"
CONFIG = "config.yaml"
CONFIG_CHANGES = "config_changes.jsonl"


def _holder() -> dict:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job or os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunDir:
    """Opened by rank 0 before anything is written there, closed when the job ends.

    The lock is flock() on `.lock`: the kernel drops it when the holding process dies, however it dies, so a
    killed or preempted job never blocks its own requeue, while a second live job is refused with the first
    one's host, pid and Slurm job id. (Where a file system has no flock, as Lustre mounted without `-o flock`,
    a warning says that two jobs are not kept apart.)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_file = None

    def open(self) -> None:
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as e:
            raise UserInputError(f"run.dir: cannot write to {self.path}: {e.strerror or e}") from None

    def _lock(self) -> None:
        lock_path = self.path / LOCK
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                print(f"warning: {lock_path}: this file system cannot lock ({e.strerror}); nothing stops a second "
                      f"job from writing to {self.path} at the same time", file=sys.stderr)
                self._lock_file = f
                return
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise UserInputError(f"run.dir {self.path} is in use by another job ({holder}); wait for it to end, "
                                 f"stop it, or give this run another run.dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()) + "\n")
        f.flush()
        self._lock_file = f

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    def record_config(self, yaml_text: str, changes: dict, step: Optional[int]) -> None:
        """config.yaml is the config in effect; every resume that changed keys appends them to the history."""
        (self.path / CONFIG).write_text(yaml_text)
        if changes:
            record = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "changes": {k: list(v) for k, v in changes.items()}}
            with open(self.path / CONFIG_CHANGES, "a") as f:
                f.write(json.dumps(record) + "\n")
