"""Atomic checkpoints: temp file, fsync, rename, then the `latest` pointer; loading falls back past a corrupt file."""
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from data.errors import ConfigError

POINTER = "latest"
NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.dir = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:09d}.pt"

    def saved(self) -> list:
        """Complete checkpoints on disk, oldest first (temp files never match the name)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if NAME.match(p.name))

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        _write_atomic(path, lambda f: torch.save(state, f))
        # The pointer moves only once the file it names is complete and durable.
        _write_atomic(self.dir / POINTER, lambda f: f.write(path.name.encode() + b"\n"))
        for old in self.saved()[:-self.keep]:
            old.unlink()
        return path

    def load_latest(self) -> Optional[Tuple[Path, dict]]:
        """The newest loadable checkpoint; a truncated or corrupt one is reported and the previous one used."""
        candidates = self.saved()[::-1]
        pointer = self.dir / POINTER
        if pointer.is_file():
            named = self.dir / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                return path, torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
                print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "trying the previous one", file=sys.stderr)
        return None
