"""Errors raised on bad user input. Each names the field, the value and what is allowed."""


class DynlabError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(DynlabError, ValueError):
    """A configuration key or value is not allowed. ``hint`` adds a suggestion (a close key)."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        super().__init__(f"config '{key}' = {value!r} is not allowed: expected {allowed}" + (f" ({hint})" if hint else ""))

    def __reduce__(self):  # picklable, so that it crosses Ray process boundaries intact
        return (type(self), (self.key, self.value, self.allowed, self.hint))


def did_you_mean(word: str, options) -> str:
    """``"did you mean 'x'?"`` for the option closest to ``word`` (a typo), or ``""``."""
    import difflib

    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    if not close:  # a wrong section or a missing section prefix: compare the last part alone
        tail = str(word).rpartition(".")[2]
        close = [o for o in options if o.rpartition(".")[2] == tail][:1] or difflib.get_close_matches(tail, options, n=1, cutoff=0.75)
    return f"did you mean '{close[0]}'?" if close else ""


class DataError(DynlabError):
    """A dataset cannot be found or read."""


class StorageError(DynlabError):
    """A result cannot be written where it belongs (a full disk, a read-only folder)."""


def input_error(err: BaseException) -> DynlabError | None:
    """The DynlabError behind ``err``, also when Ray wrapped it: a task's ``cause``, chained
    exceptions, and the per-worker errors of a Ray Train ``WorkerGroupError`` (``worker_failures``)."""
    todo, seen = [err], set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DynlabError):
            return err
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(err, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [e for e in failures.values() if isinstance(e, BaseException)]
    return None
