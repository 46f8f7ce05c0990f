"""Errors a user can act on, raised by both data/ and trainer/: each names the key or file at fault.

They live in the lower layer because data/ never imports trainer/; trainer/errors.py holds the trainer's own.
"""


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self):  # picklable, so ranks can share it (all_gather_object)
        return type(self), (self.key, self.message)


class DataError(RuntimeError):
    """A dataset the loader cannot use: missing, empty, mismatched classes, or an undecodable file."""


class SplitTooSmall(DataError):
    """The train split holds fewer images than one batch on every rank: a batch size the data cannot fill."""
