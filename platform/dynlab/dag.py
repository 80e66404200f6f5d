"""Pipeline steps on Ray: plain Ray tasks chained by passing results, ordered with ``graphlib``,
each cached under a content hash of what it depends on.

A :class:`Step` is a function ``fn(ctx, **inputs) -> dict`` whose inputs are the (JSON) results of
upstream steps. :func:`run` validates the graph, prints it, and processes the steps as they become
ready: a step whose key is in the cache is loaded (no Ray task), any other runs as a Ray task (or in
the driver, ``where="driver"``), independent steps concurrently.

The key of a step is a SHA-256 over its function (module and qualified name), ``version``, the
canonical JSON of ``config`` and, for every input, the *content identity* of the upstream value it
selects (the hash of its canonical JSON, where a path into the upstream's folder counts by the
hash of the file or folder it names). The step's name is not part of it: renamed but identical work
is shared, and a step whose upstream re-ran but produced the same content stays cached.

Cache layout: ``<cache_dir>/<fn name>/<key>/`` holds the files the step wrote into its private
``ctx.out_dir`` and ``result.json``. A step writes into ``<cache_dir>/.tmp/<key>-<random>``; the
runner writes ``result.json`` last and renames the folder into place, so a folder without
``result.json`` (a crash, a leftover temp) is never taken for a result. Strings of a result that
are paths inside ``ctx.out_dir`` are stored relative and come back absolute, inside the cache
folder. On a multi-node cluster ``cache_dir`` must be a shared mount: tasks write to it.

This module imports Ray only when a task must run, so a pipeline whose steps are all cached
finishes in well under a second without starting Ray.
"""

from __future__ import annotations

import dataclasses
import graphlib
import hashlib
import json
import numbers
import os
import re
import secrets
import shutil
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable

from dynlab.errors import DynlabError

FORMAT = 1
RESULT_FILE = "result.json"
TMP_DIR = ".tmp"
WHERE = ("task", "driver")
STATUSES = ("cached", "ran", "failed", "skipped")


class DagError(DynlabError, ValueError):
    """A pipeline is malformed (names, inputs, cycles) or a step returned something unusable."""


class StepFailed(DynlabError, RuntimeError):
    """Raised by :meth:`PipelineResult.raise_for_failures`: names the failed and skipped steps."""

    def __init__(self, failed: list[StepRecord], skipped: list[StepRecord]):
        self.failed, self.skipped = failed, skipped
        lines = [f"{len(failed)} pipeline step(s) failed:"]
        lines += [f"  {r.name} (after {r.attempts} attempt(s)): {r.error}" for r in failed]
        if skipped:
            lines.append(f"skipped because of them: {', '.join(r.name for r in skipped)}")
        super().__init__("\n".join(lines))


@dataclass
class StepContext:
    """What a step function gets besides its inputs."""

    name: str
    key: str
    out_dir: Path  # an empty private folder for the step's files; sealed into the cache on success
    config: Any = None  # Step.config, as given
    attempt: int = 1


@dataclass
class Step:
    """One node of a pipeline: ``fn(ctx, **inputs) -> JSON-able dict``."""

    name: str  # unique in the pipeline, e.g. "predict[t=0.5]"
    fn: Callable[..., Mapping | None]
    config: Any = None  # JSON-able (or a dataclass / object with to_dict()): what the result depends on besides its inputs
    inputs: dict[str, str | tuple[str, str]] = field(default_factory=dict)  # arg -> step name, or (step name, result key)
    where: str = "task"  # "task": a Ray task; "driver": in the calling process (e.g. a step that runs Ray Tune itself)
    resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})  # Ray task options
    retries: int = 1  # re-runs after an exception
    cache: bool = True  # False: always runs (its result is still stored, never loaded)
    version: str = "1"  # bump to invalidate cached results after a code change

    def upstream(self) -> dict[str, tuple[str, str | None]]:
        """arg -> (step name, selected key or None)."""
        return {arg: (src, None) if isinstance(src, str) else (src[0], src[1]) for arg, src in self.inputs.items()}


@dataclass
class StepRecord:
    name: str
    key: str | None  # None when the step never got a key (skipped, or its inputs could not be selected)
    status: str  # cached | ran | failed | skipped
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None
    where: str = "task"
    path: str | None = None  # the cache folder of the result
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PipelineResult:
    results: dict[str, dict]  # step name -> result (paths absolute), for the steps that succeeded
    records: list[StepRecord]  # one per step, in the order the steps were given
    graph: str = ""

    def record(self, name: str) -> StepRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no step named {name!r}; steps: {', '.join(r.name for r in self.records)}")

    def __getitem__(self, name: str) -> dict:
        return self.results[name]

    def _with(self, status: str) -> list[str]:
        return [r.name for r in self.records if r.status == status]

    @property
    def ran(self) -> list[str]:
        return self._with("ran")

    @property
    def cached(self) -> list[str]:
        return self._with("cached")

    @property
    def failed(self) -> list[str]:
        return self._with("failed")

    @property
    def skipped(self) -> list[str]:
        return self._with("skipped")

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def counts(self) -> dict[str, int]:
        return {s: len(self._with(s)) for s in STATUSES}

    def raise_for_failures(self) -> PipelineResult:
        if not self.ok:
            by = {s: [r for r in self.records if r.status == s] for s in ("failed", "skipped")}
            raise StepFailed(by["failed"], by["skipped"])
        return self


# --- JSON: normalising, hashing, paths -------------------------------------------------------------


def _plain(value: Any, where: str, *, objects: bool = False) -> Any:
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
            out[k] = _plain(v, f"{where}[{k!r}]", objects=objects)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", objects=objects) for i, v in enumerate(value)]
    if objects and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where, objects=objects)
    if objects and callable(getattr(value, "to_dict", None)):
        return _plain(value.to_dict(), where, objects=objects)
    raise DagError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which JSON cannot hold: "
        "use dicts, lists, strings, numbers, booleans and None (write arrays and tables to files "
        "in ctx.out_dir and return their paths)"
    )


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _sha(text: str) -> str:
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


def _seal(result: Any, out_dir: Path, name: str) -> tuple[dict, list[dict]]:
    """The result as stored: plain JSON with paths into ``out_dir`` made relative, and the list
    of those paths (location, relative path, content hash)."""
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        raise DagError(f"step '{name}' returned a {type(result).__name__}: a step returns a dict (or None)")
    stored = _plain(result, f"step '{name}': result")
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


def _absolute(doc: dict, folder: Path) -> dict:
    """The result of a stored document with its relative paths made absolute inside ``folder``."""
    result = json.loads(json.dumps(doc["result"]))
    for p in doc["paths"]:
        _set_at(result, p["at"], str(folder) if p["rel"] == "." else str(folder / p["rel"]))
    return result


def _content(doc: dict) -> dict:
    """The result with each path replaced by what it names (relative name and content hash): the
    form whose hash identifies an input."""
    content = json.loads(json.dumps(doc["result"]))
    for p in doc["paths"]:
        _set_at(content, p["at"], f"\0file:{p['rel']}:sha256:{p['sha256']}")
    return content


# --- executing one step (in a Ray worker or in the driver) -----------------------------------------


def _bump(counter: Path) -> int:
    """Count this attempt in ``counter`` (one byte per attempt); returns the attempt number."""
    with open(counter, "ab") as f:
        f.write(b".")
        return f.tell()


def _load_doc(folder: Path, key: str) -> dict | None:
    """The stored document of a complete cache folder, or None."""
    try:
        doc = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("key") != key:
        return None
    return doc


def _commit(tmp: Path, final: Path, key: str, replace: bool) -> dict:
    """Move the finished ``tmp`` folder into place; returns the document that is there after."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        existing = _load_doc(final, key)
        if existing is not None and not replace:  # produced meanwhile by another pipeline: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
        old = tmp.with_name(f"{tmp.name}-old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    return json.loads((final / RESULT_FILE).read_text())


def _execute(fn: Callable, spec: dict, config: Any, inputs: dict[str, Any]) -> dict:
    """Run one attempt of a step and seal its folder into the cache. Exceptions of ``fn`` propagate
    (to be retried); a result that cannot be stored comes back as ``{"ok": False, ...}``, since
    running it again would not help."""
    attempt = _bump(Path(spec["counter"]))
    tmp = Path(spec["cache_dir"]) / TMP_DIR / f"{spec['tmp_prefix']}{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        result = fn(StepContext(spec["name"], spec["key"], tmp, config, attempt), **inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    try:
        stored, paths = _seal(result, tmp, spec["name"])
    except DagError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"ok": False, "error": str(err), "attempt": attempt, "seconds": seconds}
    doc = {
        "format": FORMAT,
        "key": spec["key"],
        "step": spec["name"],
        "fn": spec["fn"],
        "version": spec["version"],
        "config": spec["config"],
        "inputs": spec["identities"],
        "result": stored,
        "paths": paths,
        "seconds": round(seconds, 4),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    part = tmp / f"{RESULT_FILE}.part"
    part.write_text(json.dumps(doc, indent=1, allow_nan=True))
    os.replace(part, tmp / RESULT_FILE)  # written last: its presence marks a complete folder
    doc = _commit(tmp, Path(spec["final"]), spec["key"], replace=not spec["cache"])
    return {"ok": True, "doc": doc, "attempt": attempt, "seconds": seconds}


_REMOTE = None


def _ensure_ray(log: Callable[[str], Any]):
    """Ray, initialised (``RAY_ADDRESS`` or a local instance) only now that a task must run."""
    from dynlab.cluster import ensure_ray

    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        log(f"[dag] starting Ray ({os.environ.get('RAY_ADDRESS') or 'local'})")
    return ensure_ray()


# --- the runner --------------------------------------------------------------------------------------


def _fn_id(fn: Callable, step: str) -> str:
    qual = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not qual or not module or "<" in qual:
        raise DagError(
            f"step '{step}': fn {fn!r} must be a module-level function (its module and name are part of "
            "the cache key; put parameters in config rather than in a lambda, closure or partial)"
        )
    if module == "__main__":  # `python -m pipelines.x`: name it as importable, so keys do not depend on how it was started
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.modules["__main__"].__file__ or "main").stem
    return f"{module}:{qual}"


def _short(fn: Callable) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", getattr(fn, "__name__", "step")) or "step"


def validate(steps: list[Step]) -> graphlib.TopologicalSorter:
    """Check names, inputs, options and cycles; returns the (not yet prepared) sorter."""
    seen: dict[str, int] = {}
    for i, s in enumerate(steps):
        if not isinstance(s, Step):
            raise DagError(f"steps[{i}] is a {type(s).__name__}, not a dynlab.dag.Step")
        if not isinstance(s.name, str) or not s.name:
            raise DagError(f"steps[{i}] has the name {s.name!r}: a step needs a non-empty string name")
        if s.name in seen:
            raise DagError(f"duplicate step name '{s.name}' (steps[{seen[s.name]}] and steps[{i}]): names must be unique")
        seen[s.name] = i
    graph: dict[str, set[str]] = {}
    for s in steps:
        if not callable(s.fn):
            raise DagError(f"step '{s.name}': fn = {s.fn!r} is not callable")
        if s.cache:
            _fn_id(s.fn, s.name)
        if s.where not in WHERE:
            raise DagError(f"step '{s.name}': where = {s.where!r} is not allowed: expected one of {', '.join(WHERE)}")
        if not isinstance(s.retries, int) or isinstance(s.retries, bool) or s.retries < 0:
            raise DagError(f"step '{s.name}': retries = {s.retries!r} is not allowed: expected an integer >= 0")
        if not isinstance(s.resources, Mapping):
            raise DagError(f"step '{s.name}': resources = {s.resources!r} is not allowed: expected a dict of Ray task options")
        _plain(s.config, f"step '{s.name}': config", objects=True)
        if not isinstance(s.inputs, Mapping):
            raise DagError(f"step '{s.name}': inputs = {s.inputs!r} is not allowed: expected a dict arg -> step name or (step name, key)")
        deps = set()
        for arg, src in s.inputs.items():
            if not isinstance(arg, str) or not arg.isidentifier() or arg == "ctx":
                raise DagError(f"step '{s.name}': input name {arg!r} is not allowed: expected a Python identifier other than 'ctx'")
            ok = isinstance(src, str) or (isinstance(src, (tuple, list)) and len(src) == 2 and all(isinstance(x, str) for x in src))
            if not ok:
                raise DagError(f"step '{s.name}': input '{arg}' = {src!r} is not allowed: expected a step name or (step name, result key)")
            up = src if isinstance(src, str) else src[0]
            if up not in seen:
                raise DagError(f"step '{s.name}': input '{arg}' refers to unknown step '{up}' (steps: {', '.join(seen)})")
            if up == s.name:
                raise DagError(f"step '{s.name}': input '{arg}' refers to the step itself (a cycle)")
            deps.add(up)
        graph[s.name] = deps
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        cycle = err.args[1]
        raise DagError(f"the steps form a cycle: {' -> '.join(cycle)} (step '{cycle[0]}' depends on itself through it)") from None
    return graphlib.TopologicalSorter(graph)


def describe(steps: list[Step]) -> str:
    """The step graph, one line per step in a topological order: ``name <- arg=upstream[key], ...``."""
    by = {s.name: s for s in steps}
    order = list(graphlib.TopologicalSorter({s.name: {u for u, _ in s.upstream().values()} for s in steps}).static_order())
    lines = []
    for n in order:
        s = by[n]
        ins = ", ".join(f"{arg}={up}" + (f"[{k}]" if k is not None else "") for arg, (up, k) in s.upstream().items())
        flags = [f for f, on in (("driver", s.where == "driver"), ("not cached", not s.cache)) if on]
        lines.append(f"{n}" + (f" <- {ins}" if ins else "") + (f"   ({', '.join(flags)})" if flags else ""))
    return "\n".join(lines) + "\n"


class _Runner:
    def __init__(self, steps: list[Step], cache_dir: Path, log: Callable[[str], Any]):
        self.steps = {s.name: s for s in steps}
        self.order = [s.name for s in steps]
        self.cache_dir = cache_dir
        self.log = log
        self.run_id = secrets.token_hex(4)
        self.records: dict[str, StepRecord] = {}
        self.results: dict[str, dict] = {}  # absolute form, handed downstream
        self.contents: dict[str, dict] = {}  # content form, hashed into downstream keys
        self.blame: dict[str, str] = {}  # failed or skipped step -> the failed step at the root
        self.pending: dict[Any, tuple[str, dict, float]] = {}  # Ray ref -> (step, spec, submitted at)
        self.driver_queue: list[tuple[str, dict, dict]] = []
        self.in_flight: dict[str, str] = {}  # key -> the step computing it
        self.followers: dict[str, list[str]] = {}  # step computing a key -> steps with the same key

    # keys and cache
    def _inputs(self, step: Step) -> tuple[dict[str, Any], dict[str, str]]:
        values, identities = {}, {}
        for arg, (up, k) in step.upstream().items():
            value, content = self.results[up], self.contents[up]
            if k is not None:
                if k not in value:
                    raise DagError(f"step '{step.name}': input '{arg}' selects key '{k}' of step '{up}', whose result has the keys {sorted(value)}")
                value, content = value[k], content[k]
            values[arg] = value
            identities[arg] = _sha(canonical_json(content))
        return values, identities

    def _spec(self, step: Step, identities: dict[str, str]) -> dict:
        fn_id = _fn_id(step.fn, step.name) if step.cache else f"{getattr(step.fn, '__module__', '?')}:{getattr(step.fn, '__qualname__', repr(step.fn))}"
        config = _plain(step.config, f"step '{step.name}': config", objects=True)
        payload = {"dynlab.dag": FORMAT, "fn": fn_id, "version": str(step.version), "config": config, "inputs": identities}
        key = _sha(canonical_json(payload))
        return {
            "name": step.name,
            "key": key,
            "fn": fn_id,
            "version": str(step.version),
            "config": config,
            "identities": identities,
            "cache": step.cache,
            "cache_dir": str(self.cache_dir),
            "final": str(self.cache_dir / _short(step.fn) / key),
            "tmp_prefix": f"{key}-{self.run_id}{_sha(step.name)[:6]}-",  # this run's attempts of this step
            "counter": str(self.cache_dir / TMP_DIR / f"{key}-{self.run_id}{_sha(step.name)[:6]}.attempts"),
        }

    def _succeed(self, name: str, doc: dict, folder: Path, status: str, attempts: int, seconds: float) -> None:
        step = self.steps[name]
        self.results[name] = _absolute(doc, folder)
        self.contents[name] = _content(doc)
        self.records[name] = StepRecord(name, doc["key"], status, attempts, round(seconds, 3), None, step.where, str(folder))
        if status == "cached":
            self.log(f"[dag] cached {name}")
        else:
            self.log(f"[dag] ran {name} in {seconds:.1f}s" + (f" (attempt {attempts})" if attempts > 1 else ""))

    def _fail(self, name: str, key: str | None, error: str, attempts: int, seconds: float, tb: str | None = None) -> None:
        step = self.steps[name]
        self.records[name] = StepRecord(name, key, "failed", attempts, round(seconds, 3), error, step.where, None, tb)
        self.blame[name] = name
        self.log(f"[dag] FAILED {name} after {attempts} attempt(s): {error}")

    def _finish_key(self, leader: str, spec: dict) -> None:
        """Settle the steps that waited on the same key as ``leader``."""
        if self.in_flight.get(spec["key"]) == leader:
            del self.in_flight[spec["key"]]
        Path(spec["counter"]).unlink(missing_ok=True)
        for tmp in (self.cache_dir / TMP_DIR).glob(f"{spec['tmp_prefix']}*"):  # attempts killed before cleaning up
            shutil.rmtree(tmp, ignore_errors=True)
        rec = self.records[leader]
        for f in self.followers.pop(leader, []):
            if rec.status == "ran":
                doc = _load_doc(Path(spec["final"]), spec["key"])
                self._succeed(f, doc, Path(spec["final"]), "cached", 0, 0.0)
            else:
                self._fail(f, spec["key"], f"same work as step '{leader}', which failed: {rec.error}", 0, 0.0)
                self.blame[f] = leader
            self.sorter.done(f)

    # processing
    def start(self, name: str) -> None:
        """A step whose upstream steps are all settled: skip, load, or launch it."""
        step = self.steps[name]
        bad = [up for up, _ in step.upstream().values() if up in self.blame]
        if bad:
            root = self.blame[bad[0]]
            self.blame[name] = root
            self.records[name] = StepRecord(name, None, "skipped", 0, 0.0, f"upstream {root} failed", step.where)
            self.log(f"[dag] skipped {name} (upstream {root} failed)")
            self.sorter.done(name)
            return
        try:
            values, identities = self._inputs(step)
            spec = self._spec(step, identities)
        except DagError as err:
            self._fail(name, None, str(err), 0, 0.0)
            self.sorter.done(name)
            return
        final = Path(spec["final"])
        if step.cache:
            doc = _load_doc(final, spec["key"])
            if doc is not None:
                self._succeed(name, doc, final, "cached", 0, 0.0)
                self.sorter.done(name)
                return
            if spec["key"] in self.in_flight:  # the same work under another name, running now
                self.followers.setdefault(self.in_flight[spec["key"]], []).append(name)
                return
            self.in_flight[spec["key"]] = name
        if step.where == "driver":
            self.driver_queue.append((name, spec, values))
        else:
            self._submit(name, spec, values)

    def _submit(self, name: str, spec: dict, values: dict) -> None:
        global _REMOTE
        step = self.steps[name]
        ray = _ensure_ray(self.log)
        if _REMOTE is None:
            _REMOTE = ray.remote(_execute)
        options = {**step.resources, "max_retries": step.retries, "retry_exceptions": True, "name": f"dag:{name}"}
        ref = _REMOTE.options(**options).remote(step.fn, spec, step.config, values)
        self.pending[ref] = (name, spec, time.perf_counter())

    def _attempts(self, spec: dict) -> int:
        try:
            return Path(spec["counter"]).stat().st_size
        except OSError:
            return 0

    def _outcome(self, name: str, spec: dict, out: dict | None, err: BaseException | None, started: float) -> None:
        if err is None and out["ok"]:
            self._succeed(name, out["doc"], Path(spec["final"]), "ran", out["attempt"], out["seconds"])
        elif err is None:
            self._fail(name, spec["key"], out["error"], out["attempt"], out["seconds"])
        else:
            cause = getattr(err, "cause", None) or err
            tb = str(err) if cause is not err else "".join(traceback.format_exception(err))
            self._fail(name, spec["key"], f"{type(cause).__name__}: {cause}".strip(), max(self._attempts(spec), 1), time.perf_counter() - started, tb)
        self._finish_key(name, spec)
        self.sorter.done(name)

    def run_driver_step(self) -> None:
        name, spec, values = self.driver_queue.pop(0)
        step = self.steps[name]
        started = time.perf_counter()
        for attempt in range(step.retries + 1):
            try:
                out = _execute(step.fn, spec, step.config, values)
            except Exception as err:  # noqa: BLE001  (recorded; KeyboardInterrupt propagates)
                if attempt < step.retries:
                    self.log(f"[dag] {name} failed (attempt {attempt + 1}), retrying: {type(err).__name__}: {err}")
                    continue
                self._outcome(name, spec, None, err, started)
                return
            self._outcome(name, spec, out, None, started)
            return

    def settle_tasks(self, block: bool) -> int:
        """Settle finished tasks: at least one if ``block``, else those already finished."""
        import ray

        refs = list(self.pending)
        done, _ = ray.wait(refs, num_returns=1) if block else ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            name, spec, started = self.pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as err:  # noqa: BLE001  (RayTaskError, worker crashed, cancelled)
                self._outcome(name, spec, None, err, started)
            else:
                self._outcome(name, spec, out, None, started)
        return len(done)

    def run(self, sorter: graphlib.TopologicalSorter) -> None:
        self.sorter = sorter
        self.sorter.prepare()
        try:
            while self.sorter.is_active():
                for name in self.sorter.get_ready():
                    self.start(name)
                if self.pending and self.settle_tasks(block=False):
                    continue  # submit what they unblocked before the driver gets busy
                if self.driver_queue:
                    self.run_driver_step()  # driver steps run one at a time, while tasks go on
                elif self.pending:
                    self.settle_tasks(block=True)
        except BaseException:
            if self.pending:
                import ray

                for ref in list(self.pending):
                    try:
                        ray.cancel(ref)
                    except Exception:  # noqa: BLE001
                        pass
            raise


def run(steps: list[Step], cache_dir: str | Path, *, tracker=None, log: Callable[[str], Any] = print) -> PipelineResult:
    """Run a pipeline: validate, print the graph, then load or run every step as it becomes ready.

    Never raises for a failing step (see :meth:`PipelineResult.raise_for_failures`); raises
    :class:`DagError` for a malformed pipeline before anything runs. ``tracker`` (a
    :class:`dynlab.tracking.RunHandle`) receives ``dag/graph.txt``, ``dag/steps.json`` and the tags
    ``dynlab.dag.<status>=<count>``.
    """
    steps = list(steps)
    sorter = validate(steps)
    cache_dir = Path(cache_dir).expanduser().resolve()  # Ray workers chdir elsewhere: absolute paths only
    (cache_dir / TMP_DIR).mkdir(parents=True, exist_ok=True)
    graph = describe(steps)
    log(f"[dag] {len(steps)} step(s), cache {cache_dir}:\n" + "".join(f"  {line}\n" for line in graph.splitlines()).rstrip("\n"))
    if tracker is not None:
        tracker.log_text(graph, "dag/graph.txt")

    t0 = time.perf_counter()
    runner = _Runner(steps, cache_dir, log)
    runner.run(sorter)
    result = PipelineResult({n: runner.results[n] for n in runner.order if n in runner.results}, [runner.records[n] for n in runner.order], graph)
    counts = result.counts()
    log(f"[dag] done in {time.perf_counter() - t0:.1f}s: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if tracker is not None:
        tracker.log_text(json.dumps([r.to_dict() for r in result.records], indent=1), "dag/steps.json")
        tracker.set_tags({f"dynlab.dag.{k}": v for k, v in counts.items()})
    return result
