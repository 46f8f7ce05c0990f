"""Errors a user can act on: each names the key, file or rank at fault."""
from data.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError", "UserInputError"]


class UserInputError(RuntimeError):
    """A run directory or checkpoint the job cannot use; raised before training starts."""
