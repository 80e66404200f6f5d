"""The step cache of :mod:`dynlab.dag`: results as plain JSON, their content identity, and the
folder that holds them.

Layout: ``<root>/<fn name>/<key>/`` holds the files a step wrote into its private ``ctx.out_dir``
and ``result.json``. A step writes into ``<root>/.tmp/<key>-<random>``; :meth:`Cache.write_result`
writes ``result.json`` last and :meth:`Cache.commit` renames the folder into place, so a folder
without ``result.json`` (a crash, a full disk, a leftover temp) is never taken for a result. A
write that fails (no space left, no permission) raises :class:`CacheError` naming the path, and
the attempt's folder is discarded: nothing is left that a later run would read.

Strings of a result that are paths inside ``ctx.out_dir`` are stored relative and come back
absolute, inside the cache folder, so the cache can move.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from dynlab.errors import DynlabError

FORMAT = 1
RESULT_FILE = "result.json"
TMP_DIR = ".tmp"


class DagError(DynlabError, ValueError):
    """A pipeline is malformed (names, inputs, cycles) or a step returned something unusable."""


class CacheError(DynlabError):
    """The step cache cannot be written (a full disk, no permission, a read-only mount): names the path."""

    def __init__(self, path: str | Path, doing: str, reason: str):
        self.path, self.doing, self.reason = str(path), doing, reason
        super().__init__(f"cannot {doing} {self.path}: {reason} (the step cache needs a writable folder with free space)")

    @classmethod
    def from_os(cls, err: OSError, path: str | Path, doing: str) -> "CacheError":
        return cls(err.filename or path, doing, err.strerror or str(err))

    def __reduce__(self):  # picklable: it comes back from Ray tasks
        return (type(self), (self.path, self.doing, self.reason))


# --- JSON: normalising, hashing, paths ------------------------------------------------------------


def plain(value: Any, where: str, *, objects: bool = False) -> Any:
    """``value`` as plain JSON data (dict / list / str / int / float / bool / None), or a DagError
    naming ``where``. Paths become strings, tuples lists, numpy scalars Python numbers. With
    ``objects``, dataclasses and objects with ``to_dict()`` are accepted too (configs)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DagError(f"{where} has the key {k!r} ({type(k).__name__}): JSON keys must be strings")
            out[k] = plain(v, f"{where}[{k!r}]", objects=objects)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]", objects=objects) for i, v in enumerate(value)]
    if objects and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), where, objects=objects)
    if objects and callable(getattr(value, "to_dict", None)):
        return plain(value.to_dict(), where, objects=objects)
    raise DagError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which JSON cannot hold: "
        "use dicts, lists, strings, numbers, booleans and None (write arrays and tables to files "
        "in ctx.out_dir and return their paths)"
    )


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's relative names and file contents."""
    if path.is_file():
        return _file_digest(path)
    h = hashlib.sha256(b"dir\0")
    for p in sorted(path.rglob("*")):
        if p.is_file() and not (p.parent == path and p.name == RESULT_FILE):
            h.update(f"{p.relative_to(path).as_posix()}\0{_file_digest(p)}\0".encode())
    return h.hexdigest()


def _walk_strings(value: Any, at: tuple = ()):
    """(location, string) for every string value, depth first."""
    if isinstance(value, str):
        yield at, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, (*at, i))


def _set_at(value: Any, at: list | tuple, new: Any) -> Any:
    if not at:
        return new
    value[at[0]] = _set_at(value[at[0]], at[1:], new)
    return value


def _location(at) -> str:
    return "result" + "".join(f"[{a!r}]" for a in at)


def seal(result: Any, out_dir: Path, name: str) -> tuple[dict, list[dict]]:
    """The result as stored: plain JSON with paths into ``out_dir`` made relative, and the list
    of those paths (location, relative path, content hash)."""
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        raise DagError(f"step '{name}' returned a {type(result).__name__}: a step returns a dict (or None)")
    stored = plain(result, f"step '{name}': result")
    root = str(out_dir)
    paths = []
    for at, s in list(_walk_strings(stored)):
        if s == root or s.startswith(root + os.sep):
            p = Path(s)
            if not p.exists():
                raise DagError(f"step '{name}': {_location(at)} = {s!r} points into ctx.out_dir, but the step wrote nothing there")
            rel = p.relative_to(out_dir).as_posix()
            if rel == RESULT_FILE:
                raise DagError(f"step '{name}': {RESULT_FILE} in ctx.out_dir is reserved for the runner")
            paths.append({"at": list(at), "rel": rel, "sha256": _tree_digest(p)})
            _set_at(stored, at, rel)
    if (out_dir / RESULT_FILE).exists():
        raise DagError(f"step '{name}' wrote {RESULT_FILE} into ctx.out_dir: that name is reserved for the runner")
    return stored, paths


def absolute(doc: dict, folder: Path) -> dict:
    """The result of a stored document with its relative paths made absolute inside ``folder``."""
    result = json.loads(json.dumps(doc["result"]))
    for p in doc["paths"]:
        _set_at(result, p["at"], str(folder) if p["rel"] == "." else str(folder / p["rel"]))
    return result


def content_form(doc: dict) -> dict:
    """The result with each path replaced by what it names (relative name and content hash): the
    form whose hash identifies an input."""
    content = json.loads(json.dumps(doc["result"]))
    for p in doc["paths"]:
        _set_at(content, p["at"], f"\0file:{p['rel']}:sha256:{p['sha256']}")
    return content


# --- the cache folder --------------------------------------------------------------------------------


class Cache:
    """Reads, writes and commits the result folders under ``root`` (an absolute path: Ray workers
    chdir elsewhere). Small and picklable, so a Ray task builds its own from the path."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR

    def check_writable(self) -> None:
        """Create the cache and write a probe file into it, or raise CacheError naming the path:
        a pipeline fails here, before any step runs, rather than after its first long step."""
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError.from_os(err, self.tmp, "create the step cache folder") from None
        probe = self.tmp / f"probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"dynlab")
        except OSError as err:  # names the folder, not the probe file the user never made
            raise CacheError(self.tmp, "write into the step cache folder", err.strerror or str(err)) from None
        finally:
            probe.unlink(missing_ok=True)

    def folder(self, name: str, key: str) -> Path:
        return self.root / name / key

    def load(self, folder: Path, key: str) -> dict | None:
        """The stored document of a complete result folder for ``key``, or None."""
        try:
            doc = json.loads((folder / RESULT_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("key") != key:
            return None
        return doc

    def count_attempt(self, counter: Path) -> int:
        """Count an attempt in ``counter`` (one byte each, across processes); its number."""
        try:
            with open(counter, "ab") as f:
                f.write(b".")
                return f.tell()
        except OSError as err:
            raise CacheError.from_os(err, counter, "count an attempt in") from None

    def attempts(self, counter: Path) -> int:
        try:
            return counter.stat().st_size
        except OSError:
            return 0

    def new_attempt(self, prefix: str) -> Path:
        """An empty private folder for one attempt of a step."""
        tmp = self.tmp / f"{prefix}{secrets.token_hex(4)}"
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise CacheError.from_os(err, tmp, "create the step's folder") from None
        return tmp

    def write_result(self, tmp: Path, doc: dict) -> None:
        """``result.json`` into the attempt folder, written whole or not at all (its presence
        marks a complete folder)."""
        part = tmp / f"{RESULT_FILE}.part"
        try:
            part.write_text(json.dumps(doc, indent=1, allow_nan=True))
            os.replace(part, tmp / RESULT_FILE)
        except OSError as err:
            raise CacheError.from_os(err, tmp / RESULT_FILE, "write the step result") from None

    def commit(self, tmp: Path, final: Path, key: str, replace: bool) -> dict:
        """Move the finished ``tmp`` folder into place; returns the document that is there after.
        An equal result committed meanwhile by another pipeline is kept unless ``replace``."""
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():  # not a folder in the way: the disk or permissions
                    raise
                existing = self.load(final, key)
                if existing is not None and not replace:  # produced meanwhile by another pipeline
                    self.discard(tmp)
                    return existing
                self._swap(tmp, final)
            return json.loads((final / RESULT_FILE).read_text())
        except OSError as err:
            raise CacheError.from_os(err, final, "commit the step result to") from None

    def _swap(self, tmp: Path, final: Path) -> None:
        """Replace the folder ``final`` by ``tmp``; the old one comes back if that fails."""
        old = tmp.with_name(f"{tmp.name}-old")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def discard(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def clear_attempts(self, prefix: str, counter: Path) -> None:
        """Remove the attempt counter and the folders of attempts killed before cleaning up."""
        counter.unlink(missing_ok=True)
        for tmp in self.tmp.glob(f"{prefix}*"):
            self.discard(tmp)
