"""Errors raised on bad user input. Each names the field, the value and what is allowed."""


class DynlabError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(DynlabError, ValueError):
    """A configuration key or value is not allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config '{key}' = {value!r} is not allowed: expected {allowed}")


class DataError(DynlabError):
    """A dataset cannot be found or read."""
