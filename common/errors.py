"""Errors a user can act on, each naming the key, file, shard or rank at fault, and the exit code each maps to.

They live below data/ and trainer/, which both raise them: data/ never imports trainer/. Every command maps them
the same way (common.cli): a mistake in what the user asked for exits 2, a dataset, checkpoint or run that cannot
go on exits 1.
"""


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self):  # picklable, so ranks can share it (all_gather_object)
        return type(self), (self.key, self.message)


class UserInputError(RuntimeError):
    """A run directory, checkpoint or argument the command cannot use, found before any work starts."""


class DataError(RuntimeError):
    """A dataset the loader cannot use: missing, empty, mismatched classes, or an undecodable file."""


class SplitTooSmall(DataError):
    """The train split holds fewer images than one batch on every rank: a batch size the data cannot fill."""


class Diverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps, or a checkpoint would hold non-finite weights."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the earlier ones are intact."""


# What each error means for the exit code: the user's input (fix it and run again) or the run itself.
USAGE_ERRORS = (ConfigError, UserInputError)
RUN_ERRORS = (DataError, CheckpointError, Diverged)
EXIT_USAGE = 2
EXIT_FAILURE = 1
