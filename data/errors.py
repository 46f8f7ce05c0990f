"""Errors a user can act on: each names the key or file at fault."""


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(RuntimeError):
    """A dataset the loader cannot use: missing, empty, mismatched classes, or an undecodable file."""
