"""The run directory's layout, known here alone, and the directory held by one job at a time: a lock that names its
holder, and the config history.

    run.dir/
      .lock                  held by the job writing here (flock; names its host, pid, Slurm job)
      config.yaml            the config in effect;  config_changes.jsonl  each resume's changes
      classes.json           the class names, in label order
      metrics.jsonl          one record per log step and evaluation (trainer.monitor)
      logs/rank<N>.log       every rank's log (common.log)
      checkpoints/ckpt-<step>.pt, checkpoints/latest (the name of the newest complete one)
"""
import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

from common.errors import UserInputError
from common.log import log

LOCK = ".lock"
CONFIG = "config.yaml"
CONFIG_CHANGES = "config_changes.jsonl"
CLASSES = "classes.json"
METRICS = "metrics.jsonl"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
POINTER = "latest"
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_file(directory: Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


def metrics_beside(checkpoint: Path) -> Optional[Path]:
    """The metrics.jsonl of the run a checkpoint file belongs to, None for a file outside a run's checkpoints/."""
    if not CHECKPOINT_NAME.match(Path(checkpoint).name):
        return None
    return Path(checkpoint).resolve().parent.parent / METRICS


def truncate_metrics(path: Path, step: int) -> int:
    """Drops the records past `step` (written after the checkpoint a resumed run starts from) and a torn last line;
    returns the last step the file had (0 for none), which is also the last one sent to W&B.

    Records are appended in step order and every resume truncates first, so what goes is a suffix: the file is
    cut in place, which needs no free space (a run that stopped on a full disk must be able to resume).
    """
    if not path.is_file():
        return 0
    keep_bytes = last_step = 0
    cut = False
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                record = None
            if record is None:
                break
            last_step = max(last_step, record["step"])
            cut = cut or record["step"] > step
            if not cut:
                keep_bytes += len(line)
    os.truncate(path, keep_bytes)
    return last_step


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

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    def write_classes(self, classes: list) -> None:
        (self.path / CLASSES).write_text(json.dumps(classes))

    def open(self) -> None:
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
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
                log.warning(f"{lock_path}: this file system cannot lock ({e.strerror}); nothing stops a second "
                            f"job from writing to {self.path} at the same time")
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
