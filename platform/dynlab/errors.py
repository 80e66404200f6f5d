"""Errors raised on bad user input. Each names the field, the value and what is allowed."""


class DynlabError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(DynlabError, ValueError):
    """A configuration key or value is not allowed. ``hint`` adds a suggestion (a close key)."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        super().__init__(f"config {shown(key, quote=True)} = {shown(value)} is not allowed: expected {allowed}" + (f" ({hint})" if hint else ""))

    def __reduce__(self):  # picklable, so that it crosses Ray process boundaries intact
        return (type(self), (self.key, self.value, self.allowed, self.hint))


SHOWN_CHARS = 200  # a value echoed in an error line is cut beyond this: the line stays one readable line


def shown(value, quote: bool = False) -> str:
    """``repr(value)`` (``'value'`` for a key: ``quote``), its middle cut when longer than
    SHOWN_CHARS: a 10^6-item list from YAML aliases or a 300-character name must not become the
    line. Head and tail are kept (a long path's end says which file); control characters escaped."""
    text = f"'{value}'".encode("unicode_escape").decode("ascii") if quote else repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:120]} ... {text[-50:]} ({len(text)} characters)"


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


class TrainingDiverged(DynlabError):
    """The training loss became NaN or infinite: the run stops (FAILED) rather than train, select
    or publish a model of NaN weights."""


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
