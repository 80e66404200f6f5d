"""Pipeline steps on Ray: plain Ray tasks chained by passing results, ordered with ``graphlib``,
each cached under a content hash of what it depends on.

A :class:`Step` is a function ``fn(ctx, **inputs) -> dict`` whose inputs are the (JSON) results of
upstream steps. :func:`run` validates the graph, checks that the cache can be written, prints the
graph, and processes the steps as they become ready: a step whose key is in the cache is loaded (no
Ray task), any other runs as a Ray task (or in the driver, ``where="driver"``), independent steps
concurrently. A failed step is recorded and its downstream steps skipped; ``run`` never raises for
a step.

The key of a step (:func:`step_key`) is a SHA-256 over its function (module and qualified name),
``version``, the canonical JSON of ``config`` and, for every input, the *content identity* of the
upstream value it selects (the hash of its canonical JSON, where a path into the upstream's folder
counts by the hash of the file or folder it names). The step's name is not part of it: renamed but
identical work is shared, and a step whose upstream re-ran but produced the same content stays
cached. The cache itself (layout, atomic commit, paths) is :mod:`dynlab.stepcache`; on a
multi-node cluster ``cache_dir`` must be a shared mount: tasks write to it.

Parts, each readable alone: validation (:func:`validate`), keys (:func:`step_key`, :class:`Job`),
one attempt of a step wherever it runs (:func:`execute`), and the runner (:class:`_Runner`: start
a ready step, run it in the driver or submit it to Ray, settle its outcome, propagate failures).

This module imports Ray only when a task must run, so a pipeline whose steps are all cached
finishes in well under a second without starting Ray.
"""

from __future__ import annotations

import dataclasses
import errno
import graphlib
import json
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dynlab.errors import DynlabError
from dynlab.stepcache import RESULT_FILE, TMP_DIR  # noqa: F401  (names of the cache layout, kept here too)
from dynlab.stepcache import FORMAT, Cache, CacheError, DagError, absolute, canonical_json, content_form, plain, seal, sha

__all__ = ["Step", "StepContext", "StepRecord", "PipelineResult", "StepFailed", "DagError", "CacheError", "run", "validate", "describe", "step_key"]

WHERE = ("task", "driver")
STATUSES = ("cached", "ran", "failed", "skipped")
# Errors of a step's own writes into its cache folder that running it again cannot fix.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


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



# --- validation ------------------------------------------------------------------------------------


def fn_id(fn: Callable, step: str) -> str:
    """``module:qualname`` of a step function (part of its key), or a DagError for a lambda,
    closure or partial (whose name says nothing about what it computes)."""
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


def _check_names(steps: list[Step]) -> dict[str, int]:
    """Step name -> index, or a DagError for a non-step, an empty or a duplicate name."""
    seen: dict[str, int] = {}
    for i, s in enumerate(steps):
        if not isinstance(s, Step):
            raise DagError(f"steps[{i}] is a {type(s).__name__}, not a dynlab.dag.Step")
        if not isinstance(s.name, str) or not s.name:
            raise DagError(f"steps[{i}] has the name {s.name!r}: a step needs a non-empty string name")
        if s.name in seen:
            raise DagError(f"duplicate step name '{s.name}' (steps[{seen[s.name]}] and steps[{i}]): names must be unique")
        seen[s.name] = i
    return seen


def _check_options(s: Step) -> None:
    if not callable(s.fn):
        raise DagError(f"step '{s.name}': fn = {s.fn!r} is not callable")
    if s.cache:
        fn_id(s.fn, s.name)
    if s.where not in WHERE:
        raise DagError(f"step '{s.name}': where = {s.where!r} is not allowed: expected one of {', '.join(WHERE)}")
    if not isinstance(s.retries, int) or isinstance(s.retries, bool) or s.retries < 0:
        raise DagError(f"step '{s.name}': retries = {s.retries!r} is not allowed: expected an integer >= 0")
    if not isinstance(s.resources, Mapping):
        raise DagError(f"step '{s.name}': resources = {s.resources!r} is not allowed: expected a dict of Ray task options")
    plain(s.config, f"step '{s.name}': config", objects=True)


def _dependencies(s: Step, names: Mapping[str, int]) -> set[str]:
    """The upstream step names of ``s``, or a DagError for a malformed input."""
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
        if up not in names:
            raise DagError(f"step '{s.name}': input '{arg}' refers to unknown step '{up}' (steps: {', '.join(names)})")
        if up == s.name:
            raise DagError(f"step '{s.name}': input '{arg}' refers to the step itself (a cycle)")
        deps.add(up)
    return deps


def validate(steps: list[Step]) -> graphlib.TopologicalSorter:
    """Check names, inputs, options and cycles; returns the (not yet prepared) sorter."""
    names = _check_names(steps)
    graph = {}
    for s in steps:
        _check_options(s)
        graph[s.name] = _dependencies(s, names)
    try:
        graphlib.TopologicalSorter(graph).prepare()
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


# --- keys ------------------------------------------------------------------------------------------


def step_key(fn: str, version: str, config: Any, identities: dict[str, str]) -> str:
    """The cache key: what the result depends on (function, version, config, input contents)."""
    payload = {"dynlab.dag": FORMAT, "fn": fn, "version": version, "config": config, "inputs": identities}
    return sha(canonical_json(payload))


@dataclass(frozen=True)
class Job:
    """One step, keyed and placed in the cache: everything an attempt needs (sent to Ray tasks)."""

    name: str
    key: str
    fn: str
    version: str
    config: Any  # plain JSON
    identities: dict[str, str]  # input -> content hash
    cache: bool
    cache_dir: str
    final: str  # the result folder
    tmp_prefix: str  # this run's attempt folders of this step: <cache>/.tmp/<tmp_prefix>*
    counter: str  # file counting this run's attempts of this step

    @classmethod
    def of(cls, step: Step, identities: dict[str, str], cache: Cache, run_id: str) -> Job:
        fid = fn_id(step.fn, step.name) if step.cache else f"{getattr(step.fn, '__module__', '?')}:{getattr(step.fn, '__qualname__', repr(step.fn))}"
        config = plain(step.config, f"step '{step.name}': config", objects=True)
        key = step_key(fid, str(step.version), config, identities)
        attempts = f"{key}-{run_id}{sha(step.name)[:6]}"
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", getattr(step.fn, "__name__", "step")) or "step"
        return cls(
            step.name, key, fid, str(step.version), config, identities, step.cache, str(cache.root),
            str(cache.folder(folder, key)), f"{attempts}-", str(cache.tmp / f"{attempts}.attempts"),
        )  # fmt: skip

    def document(self, stored: dict, paths: list[dict], seconds: float) -> dict:
        """What ``result.json`` holds."""
        return {
            "format": FORMAT,
            "key": self.key,
            "step": self.name,
            "fn": self.fn,
            "version": self.version,
            "config": self.config,
            "inputs": self.identities,
            "result": stored,
            "paths": paths,
            "seconds": round(seconds, 4),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


# --- one attempt of a step (in a Ray worker or in the driver) ----------------------------------------


def _disk_error(err: BaseException, tmp: Path) -> CacheError | None:
    """A CacheError for a step's own write into its cache folder that failed for lack of space or
    permission (running it again cannot help), else None."""
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS and str(err.filename or "").startswith(str(tmp)):
        return CacheError.from_os(err, tmp, "write the step's files to")
    return None


def execute(fn: Callable, job: Job, config: Any, inputs: dict[str, Any]) -> dict:
    """Run one attempt of a step and commit its folder into the cache. Exceptions of ``fn``
    propagate (to be retried); a result that cannot be stored (not JSON, a full disk) comes back
    as ``{"ok": False, ...}`` with its attempt folder removed, since running it again would not help."""
    cache = Cache(job.cache_dir)
    attempt = cache.count_attempt(Path(job.counter))
    tmp = cache.new_attempt(job.tmp_prefix)
    t0 = time.perf_counter()
    try:
        result = fn(StepContext(job.name, job.key, tmp, config, attempt), **inputs)
    except BaseException as err:
        cache.discard(tmp)
        disk = _disk_error(err, tmp)
        if disk is None:
            raise
        return {"ok": False, "error": str(disk), "attempt": attempt, "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    try:
        stored, paths = seal(result, tmp, job.name)
        cache.write_result(tmp, job.document(stored, paths, seconds))
        doc = cache.commit(tmp, Path(job.final), job.key, replace=not job.cache)
    except (DagError, CacheError) as err:
        cache.discard(tmp)
        return {"ok": False, "error": str(err), "attempt": attempt, "seconds": seconds}
    return {"ok": True, "doc": doc, "attempt": attempt, "seconds": seconds}


_REMOTE = None


def _remote_execute(log: Callable[[str], Any]):
    """:func:`execute` as a Ray remote function; Ray is initialised (``RAY_ADDRESS`` or a local
    instance) only now that a task must run."""
    global _REMOTE
    from dynlab.cluster import ensure_ray

    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        log(f"[dag] starting Ray ({os.environ.get('RAY_ADDRESS') or 'local'})")
    ray = ensure_ray()
    if _REMOTE is None:
        _REMOTE = ray.remote(execute)
    return _REMOTE


# --- the runner --------------------------------------------------------------------------------------


class _Runner:
    """Processes the steps as the sorter releases them. Each step ends in one record: cached (loaded),
    ran, failed, or skipped (an upstream step failed). Steps with the same key as one running now
    wait for it ("followers") instead of computing the same thing twice."""

    def __init__(self, steps: list[Step], cache: Cache, log: Callable[[str], Any]):
        self.steps = {s.name: s for s in steps}
        self.order = [s.name for s in steps]
        self.cache = cache
        self.log = log
        self.run_id = secrets.token_hex(4)
        self.records: dict[str, StepRecord] = {}
        self.results: dict[str, dict] = {}  # absolute form, handed downstream
        self.contents: dict[str, dict] = {}  # content form, hashed into downstream keys
        self.blame: dict[str, str] = {}  # failed or skipped step -> the failed step at the root
        self.pending: dict[Any, tuple[str, Job, float]] = {}  # Ray ref -> (step, job, submitted at)
        self.driver_queue: list[tuple[str, Job, dict]] = []
        self.in_flight: dict[str, str] = {}  # key -> the step computing it
        self.followers: dict[str, list[str]] = {}  # step computing a key -> steps with the same key

    # records
    def _succeed(self, name: str, doc: dict, folder: Path, status: str, attempts: int, seconds: float) -> None:
        self.results[name] = absolute(doc, folder)
        self.contents[name] = content_form(doc)
        self.records[name] = StepRecord(name, doc["key"], status, attempts, round(seconds, 3), None, self.steps[name].where, str(folder))
        if status == "cached":
            self.log(f"[dag] cached {name}")
        else:
            self.log(f"[dag] ran {name} in {seconds:.1f}s" + (f" (attempt {attempts})" if attempts > 1 else ""))
        self.sorter.done(name)

    def _fail(self, name: str, key: str | None, error: str, attempts: int, seconds: float, tb: str | None = None, root: str | None = None) -> None:
        self.records[name] = StepRecord(name, key, "failed", attempts, round(seconds, 3), error, self.steps[name].where, None, tb)
        self.blame[name] = root or name
        self.log(f"[dag] FAILED {name} after {attempts} attempt(s): {error}")
        self.sorter.done(name)

    def _skip(self, name: str, root: str) -> None:
        self.blame[name] = root
        self.records[name] = StepRecord(name, None, "skipped", 0, 0.0, f"upstream {root} failed", self.steps[name].where)
        self.log(f"[dag] skipped {name} (upstream {root} failed)")
        self.sorter.done(name)

    # starting a ready step
    def _inputs(self, step: Step) -> tuple[dict[str, Any], dict[str, str]]:
        """Input values (absolute paths) and their content identities, from the upstream results."""
        values, identities = {}, {}
        for arg, (up, k) in step.upstream().items():
            value, content = self.results[up], self.contents[up]
            if k is not None:
                if k not in value:
                    raise DagError(f"step '{step.name}': input '{arg}' selects key '{k}' of step '{up}', whose result has the keys {sorted(value)}")
                value, content = value[k], content[k]
            values[arg] = value
            identities[arg] = sha(canonical_json(content))
        return values, identities

    def start(self, name: str) -> None:
        """A step whose upstream steps are all settled: skip, load, wait for the same work, or launch it."""
        step = self.steps[name]
        failed_upstream = [up for up, _ in step.upstream().values() if up in self.blame]
        if failed_upstream:
            self._skip(name, self.blame[failed_upstream[0]])
            return
        try:
            values, identities = self._inputs(step)
            job = Job.of(step, identities, self.cache, self.run_id)
        except DagError as err:
            self._fail(name, None, str(err), 0, 0.0)
            return
        if step.cache and (self._load_cached(name, job) or self._follow(name, job)):
            return
        if step.where == "driver":
            self.driver_queue.append((name, job, values))
        else:
            self._submit(name, job, values)

    def _load_cached(self, name: str, job: Job) -> bool:
        doc = self.cache.load(Path(job.final), job.key)
        if doc is not None:
            self._succeed(name, doc, Path(job.final), "cached", 0, 0.0)
        return doc is not None

    def _follow(self, name: str, job: Job) -> bool:
        """Wait for the step computing the same key, if one is running; else claim the key."""
        leader = self.in_flight.get(job.key)
        if leader is not None:
            self.followers.setdefault(leader, []).append(name)
            return True
        self.in_flight[job.key] = name
        return False

    # running
    def _submit(self, name: str, job: Job, values: dict) -> None:
        step = self.steps[name]
        options = {**step.resources, "max_retries": step.retries, "retry_exceptions": True, "name": f"dag:{name}"}
        ref = _remote_execute(self.log).options(**options).remote(step.fn, job, step.config, values)
        self.pending[ref] = (name, job, time.perf_counter())

    def run_driver_step(self) -> None:
        """The next driver step, in this process, with its retries."""
        name, job, values = self.driver_queue.pop(0)
        step = self.steps[name]
        started = time.perf_counter()
        for attempt in range(step.retries + 1):
            try:
                out = execute(step.fn, job, step.config, values)
            except Exception as err:  # noqa: BLE001  (recorded; KeyboardInterrupt propagates)
                if attempt < step.retries:
                    self.log(f"[dag] {name} failed (attempt {attempt + 1}), retrying: {type(err).__name__}: {err}")
                    continue
                self._outcome(name, job, None, err, started)
                return
            self._outcome(name, job, out, None, started)
            return

    def settle_tasks(self, block: bool) -> int:
        """Settle finished tasks: at least one if ``block``, else those already finished."""
        import ray

        refs = list(self.pending)
        done, _ = ray.wait(refs, num_returns=1) if block else ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            name, job, started = self.pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as err:  # noqa: BLE001  (RayTaskError, worker crashed, cancelled)
                self._outcome(name, job, None, err, started)
            else:
                self._outcome(name, job, out, None, started)
        return len(done)

    def cancel_tasks(self) -> None:
        if not self.pending:
            return
        import ray

        for ref in list(self.pending):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001  (already finished or gone)
                pass

    # settling
    def _outcome(self, name: str, job: Job, out: dict | None, err: BaseException | None, started: float) -> None:
        if err is None and out["ok"]:
            self._succeed(name, out["doc"], Path(job.final), "ran", out["attempt"], out["seconds"])
        elif err is None:
            self._fail(name, job.key, out["error"], out["attempt"], out["seconds"])
        else:
            cause = getattr(err, "cause", None) or err
            tb = str(err) if cause is not err else "".join(traceback.format_exception(err))
            attempts = max(self.cache.attempts(Path(job.counter)), 1)
            self._fail(name, job.key, f"{type(cause).__name__}: {cause}".strip(), attempts, time.perf_counter() - started, tb)
        self.cache.clear_attempts(job.tmp_prefix, Path(job.counter))
        self._settle_followers(name, job)

    def _settle_followers(self, leader: str, job: Job) -> None:
        """The steps that waited on the same key as ``leader`` share its outcome."""
        if self.in_flight.get(job.key) == leader:
            del self.in_flight[job.key]
        rec = self.records[leader]
        for f in self.followers.pop(leader, []):
            if rec.status == "ran":
                self._succeed(f, self.cache.load(Path(job.final), job.key), Path(job.final), "cached", 0, 0.0)
            else:
                self._fail(f, job.key, f"same work as step '{leader}', which failed: {rec.error}", 0, 0.0, root=leader)

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
            self.cancel_tasks()
            raise


def run(steps: list[Step], cache_dir: str | Path, *, tracker=None, log: Callable[[str], Any] = print) -> PipelineResult:
    """Run a pipeline: validate, check the cache, print the graph, then load or run every step as
    it becomes ready.

    Never raises for a failing step (see :meth:`PipelineResult.raise_for_failures`); raises
    :class:`DagError` for a malformed pipeline and :class:`CacheError` (naming the path) for a cache
    folder that cannot be created or written, both before anything runs. ``tracker`` (a
    :class:`dynlab.tracking.RunHandle`) receives ``dag/graph.txt``, ``dag/steps.json`` and the tags
    ``dynlab.dag.<status>=<count>``.
    """
    steps = list(steps)
    sorter = validate(steps)
    cache = Cache(Path(cache_dir).expanduser().resolve())  # Ray workers chdir elsewhere: absolute paths only
    cache.check_writable()
    graph = describe(steps)
    log(f"[dag] {len(steps)} step(s), cache {cache.root}:\n" + "".join(f"  {line}\n" for line in graph.splitlines()).rstrip("\n"))
    if tracker is not None:
        tracker.log_text(graph, "dag/graph.txt")

    t0 = time.perf_counter()
    runner = _Runner(steps, cache, log)
    runner.run(sorter)
    result = PipelineResult({n: runner.results[n] for n in runner.order if n in runner.results}, [runner.records[n] for n in runner.order], graph)
    counts = result.counts()
    log(f"[dag] done in {time.perf_counter() - t0:.1f}s: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if tracker is not None:
        tracker.log_text(json.dumps([r.to_dict() for r in result.records], indent=1), "dag/steps.json")
        tracker.set_tags({f"dynlab.dag.{k}": v for k, v in counts.items()})
    return result
