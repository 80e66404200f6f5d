"""Errors raised on bad user input. Each names the field, the value and what is allowed."""


class DynlabError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(DynlabError, ValueError):
    """A configuration key or value is not allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config '{key}' = {value!r} is not allowed: expected {allowed}")

    def __reduce__(self):  # picklable, so that it crosses Ray process boundaries intact
        return (type(self), (self.key, self.value, self.allowed))


class DataError(DynlabError):
    """A dataset cannot be found or read."""


def input_error(err: BaseException) -> DynlabError | None:
    """The DynlabError behind ``err``, also when Ray wrapped it (a worker raised it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DynlabError):
            return err
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(err, attr, None)
            if isinstance(nxt, BaseException):
                err = nxt
                break
        else:
            return None
    return None
