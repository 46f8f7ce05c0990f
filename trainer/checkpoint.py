"""Checkpoints: a checkpoint is the union of a run's stateful parts (snapshot, restore); the save cadence, atomic
writes (temp file, fsync, rename, then the `latest` pointer), pruning, and loading that falls back past a corrupt
file."""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from common.errors import CheckpointError, ConfigError, Diverged, UserInputError
from common.log import log
from trainer import distributed
from trainer.distributed import Dist
from trainer.run_dir import CHECKPOINT_NAME, POINTER, checkpoint_file, checkpoint_step

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


class PerRank:
    """A part every rank holds its own of (the loader's position, the RNG streams): saved as the list of every
    rank's state, gathered; `restore` is handed that list, to take its own or merge them all."""

    def __init__(self, get: Callable[[], Any], restore: Callable[[list], None], dist: Dist):
        self.get, self.restore, self.dist = get, restore, dist

    def state_dict(self) -> list:
        return distributed.all_gather(self.get(), self.dist)

    def load_state_dict(self, states: list) -> None:
        self.restore(states)


# The part whose state_dict() is stored at the top level of the checkpoint rather than under its name (the trainer's
# own counters and the run's facts, where format 2 keeps them); it names its keys in STATE_KEYS.
TOP_LEVEL = "trainer"


def snapshot(parts: Dict[str, Any]) -> dict:
    """The checkpoint of `parts` ({name: a part with state_dict(), or None for one this run does not have}).
    Collective where a part is PerRank: every rank must call it."""
    state = dict(parts[TOP_LEVEL].state_dict()) if TOP_LEVEL in parts else {}
    for name, part in parts.items():
        if name != TOP_LEVEL:
            state[name] = None if part is None else part.state_dict()
    return state


def restore(parts: Dict[str, Any], state: dict, source: Path) -> None:
    """Loads every part from `state`, in the order of `parts` (the trainer's counters first: the RNG reseeds
    from its step). A part the checkpoint lacks, or a state the checkpoint holds that no part restores, is an
    error naming it: a state saved and never restored is a resume that silently differs."""
    top = tuple(parts[TOP_LEVEL].STATE_KEYS) if TOP_LEVEL in parts else ()
    missing = [name for name in (*top, *parts) if name != TOP_LEVEL and name not in state]
    unclaimed = [key for key in state if key not in parts and key not in top]
    if missing or unclaimed:
        found = [missing and f"it lacks {', '.join(missing)}",
                 unclaimed and f"no part of this trainer restores {', '.join(unclaimed)}"]
        raise UserInputError(f"checkpoint {source} does not match this trainer's parts: "
                             f"{'; '.join(filter(None, found))}")
    for name, part in parts.items():
        saved = {k: state[k] for k in top} if name == TOP_LEVEL else state[name]
        if part is None or saved is None:
            continue
        try:
            part.load_state_dict(saved)
        except (RuntimeError, KeyError, ValueError) as e:
            # load_state_dict's first line only says that it failed; the second names the key at fault.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            reason = lines[min(1, len(lines) - 1)]
            raise UserInputError(f"checkpoint {source}: its {name} does not fit this run: {reason}") from None


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
        return checkpoint_file(self.dir, step)

    def saved(self) -> list:
        """Complete checkpoints on disk, oldest first (temp files never match the name)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if CHECKPOINT_NAME.match(p.name))

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
        older = [p for p in self.saved() if checkpoint_step(p) < step]
        doomed = older[:max(len(older) - (self.keep - 1), 0)] + [p for p in self.saved() if checkpoint_step(p) > step]
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
                log.warning(f"checkpoint {path} is unreadable ({reason}); trying the previous one")
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
