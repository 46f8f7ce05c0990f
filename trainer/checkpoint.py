"""Checkpoints: the save cadence, atomic writes (temp file, fsync, rename, then the `latest` pointer), pruning,
and loading that falls back past a corrupt file."""
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from common.errors import CheckpointError, ConfigError, Diverged
from trainer import distributed
from trainer.distributed import Dist

POINTER = "latest"
NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
UNREADABLE = ".unreadable"
# Room kept free beyond the checkpoint itself: the metrics, logs and W&B files of the run still need to grow.
HEADROOM_BYTES = 64 * 2**20


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every this many optimizer steps (and always at the end of each epoch); 0 saves at epoch ends only."""
    keep: int = 3
    """Checkpoints kept on disk; older ones are deleted once a newer one is complete."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError("checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        if self.keep < 1:
            raise ConfigError("checkpoint.keep", f"must be >= 1, got {self.keep}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """Writes through a temp file, fsynced and renamed; a failed write (disk full) leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _non_finite(model_state: dict) -> list:
    return [k for k, t in model_state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def to_cpu(tree):
    """The same nested dicts and lists with every tensor on the CPU: a checkpoint loads on a host without GPUs
    and without map_location."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def step_of(path: Path) -> int:
    return int(NAME.match(path.name).group(1))


class Checkpointer:
    """Owns the checkpoints of a run: when to save, writing them atomically on rank 0, pruning, and loading.

    `save` is collective: every rank calls it at the same steps, so the state (which gathers every rank's loader
    and RNG state) is built everywhere, and every rank returns only once the file is durable, or raises the
    same error as rank 0 when it could not be written.
    """

    def __init__(self, directory: Path, keep: int, every_steps: int = 0, dist: Optional[Dist] = None):
        self.dir = Path(directory)
        self.keep = keep
        self.every_steps = every_steps
        self.dist = dist or Dist(0, 0, 1, torch.device("cpu"))

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:09d}.pt"

    def saved(self) -> list:
        """Complete checkpoints on disk, oldest first (temp files never match the name)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if NAME.match(p.name))

    def due(self, step: int, *, epoch_end: bool = False) -> bool:
        """The cadence: every `every_steps` optimizer steps, and at every epoch end."""
        return epoch_end or bool(self.every_steps and step % self.every_steps == 0)

    def save(self, step: int, state: Callable[[], dict], *, epoch_end: bool = False,
             force: bool = False) -> Optional[Path]:
        """Saves `state()` if the cadence says so at `step` (or `force`); returns the path, None if not due."""
        if not (force or self.due(step, epoch_end=epoch_end)):
            return None
        snapshot = state()
        distributed.agree(lambda: self._write(to_cpu(snapshot), step) if self.dist.is_main else None, self.dist)
        return self.path_for(step)

    def _write(self, state: dict, step: int) -> None:
        bad = _non_finite(state["model"])
        if bad:
            raise Diverged(f"refusing to write a checkpoint with non-finite weights at step {step} "
                           f"(e.g. {bad[0]}); the last good checkpoint is kept in {self.dir}")
        path = self.path_for(step)
        self._check_free_space(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, lambda f: torch.save(state, f))
            # The pointer moves only once the file it names is complete and durable.
            _write_atomic(self.dir / POINTER, lambda f: f.write(path.name.encode() + b"\n"))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise CheckpointError(f"could not write checkpoint {path}: {reason}; the previous checkpoints in "
                                  f"{self.dir} are intact") from None
        self._prune(step)

    def _check_free_space(self, path: Path) -> None:
        """Refuses a write that cannot fit, judged by the size of the newest checkpoint: a disk that fills up
        mid-write costs the time to write it and, elsewhere, leaves the disk full."""
        previous = self.saved()
        if not previous:
            return
        needed = previous[-1].stat().st_size + HEADROOM_BYTES
        free = shutil.disk_usage(self.dir).free
        if free < needed:
            raise CheckpointError(f"not enough space for checkpoint {path}: about {needed / 2**20:.0f} MiB needed "
                                  f"(the last one was {previous[-1].stat().st_size / 2**20:.0f} MiB), "
                                  f"{free / 2**20:.0f} MiB free; the previous checkpoints in {self.dir} are intact")

    def _prune(self, step: int) -> None:
        """Keeps the checkpoint of `step` and the `keep - 1` newest before it. Files of later steps belong to a
        future this run has abandoned (it resumed from an earlier checkpoint), so they go too."""
        older = [p for p in self.saved() if step_of(p) < step]
        doomed = older[:max(len(older) - (self.keep - 1), 0)] + [p for p in self.saved() if step_of(p) > step]
        for old in doomed:
            old.unlink()

    def load_latest(self) -> Optional[Tuple[Path, dict]]:
        """The newest loadable checkpoint, or None when there is none at all.

        A truncated, corrupt or non-finite one is reported, set aside as `<name>.unreadable` (kept for a look,
        never loaded or pruned) and the previous one used. When checkpoints exist but none loads, starting
        afresh would silently throw the run away: that is an error.
        """
        candidates = self.saved()[::-1]
        pointer = self.dir / POINTER
        if pointer.is_file():
            named = self.dir / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        unreadable = []
        for path in candidates:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                bad = _non_finite(state["model"])
                if bad:
                    raise ValueError(f"non-finite weights, e.g. {bad[0]}")
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                print(f"warning: checkpoint {path} is unreadable ({reason}); trying the previous one",
                      file=sys.stderr)
                unreadable.append((path, reason))
                continue
            for bad_path, _ in unreadable:
                bad_path.rename(bad_path.with_name(bad_path.name + UNREADABLE))
            return path, state
        if unreadable:
            listed = "; ".join(f"{p.name} ({reason})" for p, reason in unreadable[:5])
            raise CheckpointError(f"none of the {len(unreadable)} checkpoints in {self.dir} can be loaded: {listed}. "
                                  f"Restore a good copy there, or move them away to start the run afresh")
        return None
