"""The wrapper every `python -m` command runs through: parse, run, close, and one exit code per kind of error.

    def main(argv=None) -> int:
        return cli.run(parse_args, command, argv, close=distributed.shutdown)

A mistake in what the user asked for (common.errors.USAGE_ERRORS: a config value, a path or argument the command
cannot use) exits 2, as argparse's own errors do; a dataset, checkpoint or run that cannot go on (RUN_ERRORS) exits 1.
Either is one line on stderr, never a traceback, in one format that users, tests and launch/ read:
`config error: KEY: MESSAGE`, or `error: MESSAGE`; `(on rank R)` follows `error` when the ranks shared one rank's
error (trainer.distributed.agree). Any other exception is a bug and keeps its traceback.
"""
import sys
from typing import Callable, List, Optional

from common.errors import EXIT_FAILURE, EXIT_USAGE, RUN_ERRORS, USAGE_ERRORS, ConfigError


def message(error: Exception) -> str:
    rank = getattr(error, "failed_rank", None)
    where = f" (on rank {rank})" if rank is not None else ""
    return f"{'config error' if isinstance(error, ConfigError) else 'error'}{where}: {error}"


def exit_code(error: Exception) -> int:
    return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_FAILURE


def run(parse_args: Callable, command: Callable, argv: Optional[List[str]] = None,
        close: Optional[Callable[[], None]] = None) -> int:
    """`command(parse_args(argv))`'s exit code (None counts as 0), or the error's; `close()` runs on every exit,
    an exception or argparse's SystemExit included."""
    try:
        return command(parse_args(argv)) or 0
    except USAGE_ERRORS + RUN_ERRORS as error:
        print(message(error), file=sys.stderr, flush=True)
        return exit_code(error)
    finally:
        if close is not None:
            close()
