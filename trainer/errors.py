"""The trainer's own errors a user can act on; each names the file, key or rank at fault.

Configuration and dataset errors (ConfigError, DataError) are defined once, in data/errors.py: data/ is the
lower layer and never imports trainer/, so the types both packages raise live there.
"""


class UserInputError(RuntimeError):
    """A run directory or checkpoint the job cannot use; raised before training starts."""


class Diverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps, or a checkpoint would hold non-finite weights."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the earlier ones are intact."""
