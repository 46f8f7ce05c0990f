"""The run's log, on the standard `logging`: rank 0's lines on the console, every rank's lines in a file of its own.

Rank 0 writes info to stdout and warnings and errors to stderr, prefixed `warning: ` / `error: ` (the text users,
tests and the Slurm script read), through tqdm so a progress bar stays whole. `to_file` adds
`run.dir/logs/rank<N>.log` on every rank, timestamped, where the other ranks' warnings can be read.
"""
import logging
import sys
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("imagenet_trainer")
FILE_FORMAT = "%(asctime)s rank {rank} %(levelname)s %(message)s"


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, message = sys.stderr, f"{record.levelname.lower()}: {message}"
            else:
                stream = sys.stdout
            tqdm.write(message, file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: a failed emit reports, never raises
            self.handleError(record)


def setup(rank: int) -> None:
    """Console output on rank 0 only; the other ranks log to their file alone. Idempotent: tests and tools that
    build several runs in one process keep one console handler."""
    log.setLevel(logging.INFO)
    log.propagate = False  # no root handler (and no logging.lastResort on the other ranks) prints it twice
    for handler in [h for h in log.handlers if not isinstance(h, logging.FileHandler)]:
        log.removeHandler(handler)
    log.addHandler(_Console() if rank == 0 else logging.NullHandler())


def to_file(directory: Path, rank: int) -> logging.Handler:
    """Adds `directory/rank<rank>.log` (appended: a resumed run continues it); returns the handler to remove."""
    directory.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(directory / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter(FILE_FORMAT.format(rank=rank)))
    log.addHandler(handler)
    return handler


def remove(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()
