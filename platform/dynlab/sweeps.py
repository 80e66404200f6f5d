"""Ray Tune sweeps over any config keys, each trial trained by Ray Train.

The search space (grid / choices / random axes, extra trials such as a baseline, repeats with
seeds) is expanded in the driver into a fixed list of :class:`Trial` s with stable ids: random
axes are sampled with the run seed, so the same command gives the same trials and each trial's
training can be cached under its config hash. Tune then runs one trial per id (``grid_search``
over the ids), with optional ASHA early stopping; each trial is a function that fits a
``TorchTrainer`` (the Ray 2.60 pattern) and logs into an MLflow child run of the pipeline's run.

A finished trial publishes its selected weights to ``<cache>/train/<train_hash>/``; a later sweep
skips trials found there, and an interrupted trial resumes from its Ray Train checkpoints (its
Train run is named after its hash), so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from dynlab import config as config_mod
from dynlab import storage as storage_mod
from dynlab import tracking, training
from dynlab.errors import ConfigError, input_error

TRAIN_CACHE = "train"
RESULT_FILE = "result.json"


@dataclass
class Trial:
    id: str  # stable and readable, e.g. "temperature=0.5-seed0"
    label: str  # for tables and legends, e.g. "temperature=0.5"
    overrides: dict[str, Any]
    config: dict[str, Any]  # resolved Config.to_dict()
    train_key: str  # Config.train_hash(): identical training => identical key

    def cfg(self) -> config_mod.Config:
        return config_mod.from_dict(self.config)


def _label(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "base"
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def _sample(domain, rng: np.random.Generator):
    kind, *args = domain
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "loguniform":
        return float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
    if kind == "choice":
        return args[0][int(rng.integers(len(args[0])))]
    raise ValueError(f"unknown random axis {kind!r}: use ('uniform', lo, hi), ('loguniform', lo, hi) or ('choice', [values])")


def expand(
    base: config_mod.Config,
    grid: dict[str, list] | None = None,
    random: dict[str, tuple] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> list[Trial]:
    """Concrete trials: the cartesian product of ``grid``, times ``base.sweep.num_samples`` draws of
    the ``random`` axes, plus ``extra`` trials (e.g. a baseline), each repeated ``base.sweep.repeats``
    times with seeds run.seed, run.seed+1, ... Every trial config is resolved (so validated) here."""
    grid, random = dict(grid or {}), dict(random or {})
    points_n = math.prod(len(v) for v in grid.values()) * (max(1, base.sweep.num_samples) if random else 1) + len(extra or [])
    check_size(base, points_n, bool(random))  # before any trial config is resolved: 100000 of them take minutes
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    if random:
        rng = np.random.default_rng(base.run.seed)
        draws = [{k: _sample(d, rng) for k, d in random.items()} for _ in range(max(1, base.sweep.num_samples))]
        points = [{**p, **d} for p in points for d in draws]
    points += list(extra or [])
    trials, seen = [], set()
    for point in points:
        for r in range(base.sweep.repeats):
            overrides = dict(point)
            if base.sweep.repeats > 1:
                overrides["run.seed"] = base.run.seed + r
            cfg = base.with_overrides(overrides)
            label = _label(point)
            tid = label.replace(", ", "-").replace(" ", "") + (f"-seed{cfg.run.seed}" if base.sweep.repeats > 1 else "")
            if tid in seen:
                raise ConfigError("sweep.values", tid, "distinct points: two trials share this id, so the search space repeats a point")
            seen.add(tid)
            trials.append(Trial(tid, label, overrides, cfg.to_dict(), cfg.train_hash()))
    return trials


MAX_TRIALS = 200  # a larger sweep is asked for explicitly (sweep.allow_large=true)


def check_size(base: config_mod.Config, points: int, random: bool = False) -> None:
    """A sweep of more than MAX_TRIALS trials (``points`` x ``sweep.repeats``) needs
    ``sweep.allow_large=true``: a stray ``sweep.repeats=100000`` or a pasted list of 1,000 values
    would otherwise start them all without a word. The line names the key that makes it large."""
    s = base.sweep
    n = points * s.repeats
    if n <= MAX_TRIALS or s.allow_large:
        return
    if s.repeats > 1 and points <= MAX_TRIALS:
        key, value = "sweep.repeats", s.repeats
    elif random and s.num_samples > MAX_TRIALS:
        key, value = "sweep.num_samples", s.num_samples
    else:
        key, value = "sweep.values", s.values
    raise ConfigError(key, value, f"a sweep of at most {MAX_TRIALS} trials: this one has {n} ({points} point(s) x {s.repeats} seed(s)); add sweep.allow_large=true to run them all")


def cache_root(cfg: config_mod.Config) -> Path:
    """The step cache: ``sweep.cache_dir``, ``$DYNLAB_STEP_CACHE``, else ``<local storage>/cache``."""
    return storage_mod.cache_path(cfg)


def cached_training(cache: Path, train_key: str) -> dict | None:
    """The published result of a finished training, or None (a partial folder never counts)."""
    f = cache / TRAIN_CACHE / train_key / RESULT_FILE
    if not f.is_file():
        return None
    result = json.loads(f.read_text())
    result["checkpoint_dir"] = str(f.parent)
    return result


def publish_training(cache: Path, train_key: str, checkpoint_dir: str, result: dict) -> dict:
    """Copy the selected weights and config into the cache, atomically (result.json written last,
    then the folder renamed into place). ``checkpoint_dir`` is a folder or, on remote storage, a URI."""
    final = cache / TRAIN_CACHE / train_key
    tmp = cache / ".tmp" / f"{train_key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    storage_mod.copy_files(checkpoint_dir, tmp, (training.BEST_FILE, "config.yaml"))
    (tmp / RESULT_FILE).write_text(json.dumps(result, indent=1, default=str))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(final)
    except OSError:  # already there: published concurrently by an identical trial (keep theirs) ...
        old = cached_training(cache, train_key)
        if old is not None and old.get("stopped_early") and not result.get("stopped_early"):
            # ... or stopped early by ASHA and now trained to the end: the complete one replaces it
            stale = cache / ".tmp" / f"{train_key}-stopped-{uuid.uuid4().hex[:8]}"
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached_training(cache, train_key)


def in_process(cfg: config_mod.Config) -> bool:
    """Whether a trial trains in its own Tune trial process (Ray Train's local mode) rather than in a
    Ray Train worker group of its own: one CPU worker, local storage, ``sweep.in_process``."""
    return cfg.sweep.in_process and cfg.run.num_workers <= 1 and not cfg.run.use_gpu and "://" not in training.storage_path(cfg)


def trial_need(cfg: config_mod.Config) -> tuple[float, float]:
    """(CPUs, GPUs) a trial holds while it trains: in-process its CPUs; else its Tune driver's
    ``sweep.trial_cpus`` plus every worker's CPUs (and GPU)."""
    if in_process(cfg):
        return max(cfg.run.cpus_per_worker, cfg.sweep.trial_cpus), 0.0
    workers = max(1, cfg.run.num_workers)
    return cfg.sweep.trial_cpus + cfg.run.cpus_per_worker * workers, float(workers) if cfg.run.use_gpu else 0.0


def trials_that_fit(cfgs: list[config_mod.Config], nodes: list[dict[str, float]]) -> int:
    """How many of the largest of these trials the cluster runs at once (at least 1). An in-process
    trial lives on one node; a worker group's workers may spread over nodes."""
    cpu, gpu = (max(x) for x in zip(*(trial_need(c) for c in cfgs)))
    if all(in_process(c) for c in cfgs):
        fit = sum(int(n.get("CPU", 0.0) // cpu + 1e-9) for n in nodes) if cpu > 0 else len(cfgs)
    else:
        fit = int(sum(n.get("CPU", 0.0) for n in nodes) // cpu + 1e-9) if cpu > 0 else len(cfgs)
    if gpu > 0:
        fit = min(fit, int(sum(n.get("GPU", 0.0) for n in nodes) // gpu + 1e-9))
    return max(1, fit)


def concurrency(base: config_mod.Config, todo: list[Trial], nodes: list[dict[str, float]]) -> int:
    """Trials at a time: ``sweep.max_concurrent``, or as many as fit when it is 0. Asking for more
    than fit is warned about and lowered to what fits (the trials beyond would only hold their
    slot and loop on "worker group startup timed out"), unless ``run.wait_for_resources`` (an
    autoscaling cluster brings the rest)."""
    cfgs = [t.cfg() for t in todo]
    fit = trials_that_fit(cfgs, nodes)
    requested = base.sweep.max_concurrent
    if requested == 0:
        return min(fit, len(todo))
    if requested > fit and not base.run.wait_for_resources:
        cpu, gpu = (max(x) for x in zip(*(trial_need(c) for c in cfgs)))
        have = f"{sum(n.get('CPU', 0.0) for n in nodes):g} CPU(s)" + (f" and {sum(n.get('GPU', 0.0) for n in nodes):g} GPU(s)" if gpu else "")
        print(f"[sweep] warning: sweep.max_concurrent={requested} does not fit: each trial holds {cpu:g} CPU(s)" + (f" and {gpu:g} GPU(s)" if gpu else "")
              + f", the cluster has {have}: running {fit} at a time (sweep.max_concurrent=0 picks what fits; on an autoscaling cluster run.wait_for_resources=true keeps {requested})", flush=True)
        return fit
    return requested


def train_trial(tune_config: dict, specs: dict, parent: dict, experiment: str, cache: str, plugins: list[str], owner: str = "") -> None:
    """One Tune trial: fit a TorchTrainer for the trial's config, logging into a child run. The
    child run is keyed by the Train run's name, not by the parent: a trial interrupted under one
    invocation continues its curve in the same child run under the next (re-pointed to the new
    parent). ``owner`` is the driver process, which the run lives and dies with."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    training.import_plugins(plugins)
    spec = specs[tune_config["trial"]]
    cfg = config_mod.from_dict(spec["config"])
    name = train_run_name(experiment, spec["train_key"])
    handle = tracking.open_run(
        experiment,
        spec["id"],
        # the node the trial ran on (the latest attempt's): where to look for its logs on a cluster
        tags={"dynlab.trial": spec["id"], "dynlab.trial_label": spec["label"], "dynlab.train_key": spec["train_key"], "dynlab.trial_node": ray.get_runtime_context().get_node_id()},
        parent_run_id=parent["run_id"],
        resume_key=name,
        uri=parent["uri"],
        owner=owner or None,
    )
    try:
        with tracking.run_guard(handle):  # marks the run FAILED, with the error as a tag
            tracking.log_config(handle, cfg)
            result = training.fit(cfg, name, tracking=handle.as_payload(), plugins=plugins, callbacks=[TuneReportCallback()], in_process=spec["in_process"])
            publish_training(Path(cache), spec["train_key"], result.checkpoint_dir, {"train_key": spec["train_key"], "run_id": handle.run_id, "metrics": result.metrics})
    except Exception as err:
        cause = input_error(err)
        if cause is None:
            raise  # a crash: Tune restarts the trial from its checkpoint (run.max_failures)
        # bad input found while training (a corrupt image, ...): a restart would meet it again, so
        # the trial ends here and the driver reads why (Tune retries every exception it sees)
        note = input_error_file(Path(cache), spec["train_key"])
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(str(cause))


def input_error_file(cache: Path, train_key: str) -> Path:
    """Where a trial leaves the bad input that ended it, for the driver to report."""
    return cache / ".errors" / f"{train_key}.txt"


def train_run_name(experiment: str, train_key: str) -> str:
    """The Ray Train run of a trial: the same training gets the same run, and so resumes it."""
    return f"{experiment}-{train_key}"


def _latest_checkpoint(storage: str, name: str) -> str | None:
    """The newest complete checkpoint of a Train run, a folder or (remote storage) a URI."""
    if storage_mod.is_remote(storage):
        return storage_mod.latest_checkpoint(storage_mod.join(storage, name), training.CHECKPOINT_FILES)
    last = training.latest_checkpoint(Path(storage) / name)
    return str(last) if last else None


def finish_stopped_trials(trials: list[Trial], parent: tracking.RunHandle, experiment: str, storage: str, cache: Path) -> None:
    """After Tune, for trials that neither raised nor published: a scheduler (ASHA) stopped them.
    Stopped after their last epoch (ASHA stops at max_t, before the trial function returns), the
    training is complete. Stopped earlier, it is the result ASHA asked for: published too, marked
    ``stopped_early`` (a sweep without ASHA trains it on from its checkpoint; see
    :func:`needs_training`). Either way its run is closed FINISHED, tagged by whom it was stopped.
    A trial stopped before its first checkpoint has nothing to publish: its run is closed KILLED."""
    client = tracking.client(parent.uri)
    children = client.search_runs([parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    runs = {r.data.tags.get("dynlab.trial"): r for r in children}
    for t in trials:
        run = runs.get(t.id)
        if cached_training(cache, t.train_key) is not None:
            continue
        last = _latest_checkpoint(storage, train_run_name(experiment, t.train_key))
        state = torch.load(storage_mod.open_file(last, training.STATE_FILE), map_location="cpu", weights_only=True) if last else None
        epochs = t.cfg().run.epochs
        complete = state is not None and state["epoch"] == epochs - 1
        if state is not None:
            result = {"train_key": t.train_key, "run_id": run.info.run_id if run else "", "metrics": {"best_score": state["best_score"], "best_epoch": state["best_epoch"]}}
            if not complete:
                result["stopped_early"] = {"epochs": state["epoch"] + 1, "of": epochs}
            publish_training(cache, t.train_key, str(last), result)
        if run is not None:
            client.set_tag(run.info.run_id, "dynlab.stopped_by_scheduler", "after the last epoch" if complete else f"early, after epoch {state['epoch'] + 1} of {epochs}" if state else "before its first checkpoint")
            client.set_terminated(run.info.run_id, "FINISHED" if state is not None else "KILLED")


def needs_training(cache: Path, t: Trial, base: config_mod.Config) -> bool:
    """Not in the cache, or stopped early by ASHA while this sweep runs without it (it then trains
    on from its checkpoint; the complete result replaces the stopped one)."""
    done = cached_training(cache, t.train_key)
    return done is None or (bool(done.get("stopped_early")) and not base.sweep.asha)


def stopped_note(done: dict | None) -> str:
    early = (done or {}).get("stopped_early")
    return f"stopped by ASHA after {early['epochs']}/{early['of']} epochs" if early else ""


@contextlib.contextmanager
def stop_signal() -> Iterator[list[str]]:
    """A list that is non-empty after the block when Tune was stopped by SIGINT (Ctrl-C). Tune
    catches the signal itself, stops its trials and returns normally; its handler says so in a
    warning, which is the one trace it leaves, so we listen for that record."""
    caught: list[str] = []

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Stop signal received"):
                caught.append(record.getMessage())

    listener = Listener(logging.WARNING)
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addHandler(listener)
    try:
        yield caught
    finally:
        tune_logger.removeHandler(listener)


def close_children(parent: tracking.RunHandle, status: str, why: str) -> list[str]:
    """Close the child runs of ``parent`` still RUNNING (their trial processes were stopped)."""
    c = tracking.client(parent.uri)
    running = c.search_runs([parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'")
    for run in running:
        c.set_tag(run.info.run_id, "dynlab.closed_by", why)
        c.set_terminated(run.info.run_id, status)
    return [r.info.run_id for r in running]


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per trial
    trained: list[str] = field(default_factory=list)  # trial ids trained in this invocation


def run(base: config_mod.Config, trials: list[Trial], parent: tracking.RunHandle, experiment: str, plugins: list[str] | None = None) -> SweepResult:
    """Train every trial not already in the cache with Ray Tune; return one row per trial."""
    from ray import tune

    plugins = plugins or ["methods"]
    cache = cache_root(base)
    tracking.close_orphans(parent.experiment_id, parent.uri)  # runs a killed invocation left RUNNING
    first: dict[str, Trial] = {}
    for t in (t for t in trials if needs_training(cache, t, base)):
        first.setdefault(t.train_key, t)
    todo = list(first.values())  # one training per train key: the same training in two experiments is trained once
    shared = [t for t in trials if t.train_key in first and first[t.train_key] is not t]
    errors: dict[str, str] = {}
    if not todo:  # said too, so that a log shows a re-run trained nothing
        print(f"[sweep] 0 of {len(trials)} trials to train ({len(trials)} cached)", flush=True)
    if todo:
        from dynlab.cluster import ensure_ray

        ray = ensure_ray()
        at_once = concurrency(base, todo, [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")])
        local = {t.id: in_process(t.cfg()) for t in todo}
        how = "each in its trial's process (Ray Train local mode)" if all(local.values()) else "each with a Ray Train worker group" if not any(local.values()) else "in-process or with a worker group"
        also = f", {len(shared)} sharing another trial's training" if shared else ""
        print(f"[sweep] {len(todo)} of {len(trials)} trials to train ({len(trials) - len(todo) - len(shared)} cached{also}), {at_once} at a time, {how}", flush=True)
        for t in todo:  # left by an earlier invocation that was killed before reading it
            input_error_file(cache, t.train_key).unlink(missing_ok=True)
        storage = training.storage_path(base)
        # absolute here, in the driver: a trial runs in its own folder, where "./dynlab_runs" is elsewhere
        specs = {t.id: {"id": t.id, "label": t.label, "config": {**t.config, "run": {**t.config["run"], "storage_path": storage}}, "train_key": t.train_key, "in_process": local[t.id]} for t in todo}
        needs = {t.id: trial_need(t.cfg()) for t in todo}
        resources = {tid: tune.PlacementGroupFactory([{"CPU": cpu if local[tid] else base.sweep.trial_cpus}]) for tid, (cpu, _) in needs.items()}
        fn = tune.with_parameters(train_trial, specs=specs, parent=parent.as_payload(), experiment=experiment, cache=str(cache), plugins=plugins, owner=tracking.process_owner())
        scheduler = None
        if base.sweep.asha:
            scheduler = tune.schedulers.ASHAScheduler(metric="heldout/acc_mean", mode="max", max_t=base.run.epochs, grace_period=base.sweep.grace_period)
        # an in-process trial has no Ray Train worker group to restart it: Tune restarts it (from its checkpoint)
        retries = base.run.max_failures if any(local.values()) else 0
        tuner = tune.Tuner(
            tune.with_resources(fn, lambda config: resources[config["trial"]]),
            param_space={"trial": tune.grid_search([t.id for t in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once, scheduler=scheduler, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{experiment}-sweep-{uuid.uuid4().hex[:6]}", storage_path=storage, verbose=1, failure_config=tune.FailureConfig(max_failures=retries)),
        )
        with stop_signal() as stopped:
            grid = tuner.fit()
        if stopped:
            close_children(parent, "KILLED", "interrupted (SIGINT or SIGTERM): run the same command again to resume")
            raise KeyboardInterrupt("sweep interrupted: its trials were stopped and their runs closed KILLED")
        for r in grid:
            if r.error is not None:
                errors[r.config["trial"]] = _short_error(r.error)
        for t in todo:
            note = input_error_file(cache, t.train_key)
            if note.is_file():  # ended by bad input, not retried
                errors[t.id] = note.read_text()[:500]
                note.unlink()
        finish_stopped_trials([t for t in todo if t.id not in errors], parent, experiment, storage, cache)
        errors.update({t.id: errors[first[t.train_key].id] for t in shared if first[t.train_key].id in errors})
    rows = []
    for t in trials:
        done = cached_training(cache, t.train_key)
        status = "ok" if done else ("error" if t.id in errors else "stopped")
        metrics = (done or {}).get("metrics", {})
        rows.append(
            {
                "trial": t.id,
                "label": t.label,
                "status": status,
                "error": errors.get(t.id, ""),
                "cached": t not in todo,
                "train_key": t.train_key,
                "run_id": (done or {}).get("run_id", ""),
                "checkpoint_dir": (done or {}).get("checkpoint_dir", ""),
                "note": "; ".join(n for n in (stopped_note(done), training.cost_band_note(metrics)) if n),
                "heldout_acc_best": metrics.get("best_acc", metrics.get("best_score", float("nan"))),  # best_score is not an accuracy when a cost band ranks the epochs
                "best_epoch": metrics.get("best_epoch", float("nan")),
                **{f"param:{k}": str(v) for k, v in t.overrides.items()},
            }
        )
    return SweepResult(pd.DataFrame(rows), [t.id for t in todo if cached_training(cache, t.train_key)])


def _short_error(err: BaseException) -> str:
    err = getattr(err, "cause", None) or err  # a Ray task error (an in-process trial raised): what the trial raised
    cause = input_error(err)
    text = str(cause) if cause is not None else f"{type(err).__name__}: {err}"
    return text.strip().splitlines()[-1][:500] if cause is None else text[:500]
