"""The shared command-line entry of every pipeline: parse ``key=value`` arguments, check everything
that can be checked before work starts (:mod:`dynlab.preflight`), then open an MLflow run and run
the pipeline inside a guard that marks the run FAILED (KILLED on Ctrl-C or SIGTERM) on any error,
and print where the results are. Exit codes: 0 done, 1 a failure (failed trials or steps), 2 bad
input (one clear line, no traceback; found before the run starts it leaves no MLflow run at all),
130 Ctrl-C, 143 SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import signal
import threading
import time
import typing
from typing import Callable

from dynlab import config as config_mod
from dynlab import cluster, preflight, registry, storage, tracking
from dynlab.dag import StepFailed
from dynlab.errors import DynlabError, input_error


def usage(doc: str) -> str:
    lines = [doc.strip(), "", "Config keys (default):"]
    for section, cls in config_mod.FIXED_SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            extra = f.metadata.get("choices") and f" one of {', '.join(map(str, f.metadata['choices']))}" or ""
            lines.append(f"  {section}.{f.name} = {default!r}{extra}  {f.metadata.get('help', '')}".rstrip())
    for kind, table in (("method", registry.METHODS), ("backbone", registry.BACKBONES)):
        for name, entry in table.items():
            fields = ", ".join(f"{name}.{f.name}" for f in dataclasses.fields(entry.config_cls))
            lines.append(f"  {kind}={name}: {entry.description} [{fields}]")
    lines.append("  preset=" + " | ".join(registry.PRESETS))
    lines.append("  shortcuts: " + ", ".join(f"{k} -> {v}" for k, v in config_mod.SHORTCUTS.items()))
    return "\n".join(lines)


def run_name(cfg: config_mod.Config, default_experiment: str) -> str:
    """A fresh unique run name: two commands started in the same second must not share (and so
    reopen) one run. A name given as ``run.name`` is kept: the same name resumes."""
    prefix = default_experiment if default_experiment != "dynlab-train" else cfg.method
    return f"{prefix}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def main(
    doc: str,
    argv: list[str],
    body: Callable[[config_mod.Config, tracking.RunHandle, str], dict],
    default_experiment: str,
    plugins: typing.Sequence[str] = ("methods",),
    plan: Callable[[config_mod.Config], list[config_mod.Config]] | None = None,
    defaults: dict | None = None,
) -> int:
    """Resolve the config and check it, the data, storage, tracking store and cluster for every
    config the pipeline will train (``plan(cfg)``, default ``[cfg]``) before anything is written: bad
    input is one line, exit code 2 and no MLflow run. Then open the run and call
    ``body(cfg, handle, name)`` inside a guard: a later failure marks the run FAILED (exit 1, or 2
    when a worker found bad input), Ctrl-C marks it KILLED (exit 130), and so does SIGTERM (exit
    143), failed trials exit 1. ``defaults``: dotted keys under the command line's (a
    reproduction's scale), which any key given on the command line overrides."""
    for module in plugins:
        __import__(module)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(doc))
        return 0
    try:
        cfg = config_mod.resolve({**(defaults or {}), **config_mod.normalize_keys(config_mod.parse_overrides(argv))})
        named = bool(cfg.run.name)
        name = cfg.run.name or run_name(cfg, default_experiment)
        experiment = default_experiment if cfg.run.experiment == config_mod.RunConfig.experiment else cfg.run.experiment
        cfg = cfg.with_overrides({"run.name": name, "run.experiment": experiment})
        uri = tracking.tracking_uri()
        preflight.check_all(plan(cfg) if plan else [cfg], uri, tune_trials=plan is not None)
    except DynlabError as err:
        print(f"error: {err}")
        cluster.stop_if_started()
        return 2

    with sigterm_as_ctrl_c() as terminated:
        return _run(cfg, argv, body, uri, name, named, terminated)


def _run(cfg, argv, body, uri: str, name: str, named: bool, terminated: list[int]) -> int:
    """Open the run and call the pipeline's body inside the guard (see :func:`main`)."""
    tracking.close_orphans(tracking.experiment_id(cfg.run.experiment, uri), uri)  # runs left RUNNING by a killed driver
    handle = tracking.open_run(cfg.run.experiment, name, tags={"dynlab.argv": " ".join(argv)}, resume_key=name)
    print(f"[dynlab] MLflow run {handle.run_id} ('{name}') in {uri}", flush=True)
    try:
        with tracking.run_guard(handle):
            tracking.log_config(handle, cfg)
            out = body(cfg, handle, name)
            failed = failed_trials(out)
            if failed:
                raise TrialsFailed(failed)
    except KeyboardInterrupt:
        why = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\n[dynlab] {why}: MLflow run {handle.run_id} marked KILLED. Run the same command again to resume" + ("" if named else f" (with run.name={name})") + ".")
        return 128 + signal.SIGTERM if terminated else 130
    except TrialsFailed as err:
        report(out, handle, uri, name, finished=False)
        print(storage.results_line(cfg, handle.run_id, uri, out.get("figure")), flush=True)
        print(f"error: {err}")
        print(f"[dynlab] MLflow run {handle.run_id} marked FAILED; run the same command again to retry the failed trials (finished ones are cached)")
        return 1
    except BaseException as err:  # noqa: BLE001 - reported, run already marked FAILED by the guard
        cause = input_error(err)
        if cause is None:
            raise
        print(f"error: {cause}")
        print(f"[dynlab] MLflow run {handle.run_id} marked FAILED ({uri})")
        return 1 if isinstance(cause, StepFailed) else 2
    finally:
        cluster.stop_if_started()
    report(out, handle, uri, name)
    print(storage.results_line(cfg, handle.run_id, uri, out.get("figure")), flush=True)
    return 0


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (``kill``, a scheduler or container stopping the job) does what Ctrl-C does: every
    MLflow run still RUNNING is closed KILLED and the command can be run again to resume. The
    handler hands the signal to whatever handles SIGINT at that moment: Python's (a
    KeyboardInterrupt where the driver is), or Ray Tune's while a sweep runs (it stops the trials,
    whose child runs are then closed). Yields a list that holds the signal once one came (exit 143)."""
    terminated: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield terminated
        return

    def handler(signum, frame):
        terminated.append(signum)
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint):
            on_sigint(signal.SIGINT, frame)
        else:  # SIG_IGN / SIG_DFL: stop all the same, through the guard
            raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, before)


class TrialsFailed(DynlabError):
    """Some trials of a sweep failed: the pipeline reports the others and exits non-zero."""

    def __init__(self, failed: list[tuple[str, str, str]]):
        self.failed = failed
        lines = [f"{len(failed)} trial(s) did not finish:"] + [f"  {t}: {status} {error}".rstrip() for t, status, error in failed]
        super().__init__("\n".join(lines))


def failed_trials(out: dict) -> list[tuple[str, str, str]]:
    """``(trial, status, error)`` of every trial in the comparison whose status is not ok."""
    comp = out.get("comparison") if isinstance(out, dict) else None
    if comp is None or "status" not in comp:
        return []
    return [(str(r["trial"]), str(r["status"]), str(r.get("error", "") or "")) for _, r in comp.iterrows() if r["status"] != "ok"]


def report(out: dict, handle: tracking.RunHandle, uri: str, name: str, finished: bool = True) -> None:
    """Print what a run produced; every accuracy with its noise (binomial standard error on the
    test set, or the spread over seeds), so that a difference of a few test images is not read as
    a result."""
    import pandas as pd

    from dynlab import comparison

    ev = out.get("evaluation")
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 2):
        if ev is not None:
            a = ev.anytime
            t = pd.DataFrame({c: a[c] for c in ("index", "name", "mmacs", "accuracy", "pareto") if c in a})
            t["± SE"] = comparison.binomial_se(a["accuracy"], a["n_samples"])
            print(f"\nAnytime (test accuracy %, ± binomial standard error on {int(a['n_samples'].iloc[0])} test images):\n" + t.to_string(index=False))
            if ev.budgeted is not None:
                b = ev.budgeted[ev.budgeted["mode"] == "budget"]
                if len(b):
                    t = pd.DataFrame({"budget MMACs": b["requested_budget"] / 1e6, "held-out MMACs": b["heldout_cost"] / 1e6, "test MMACs": b["test_cost"] / 1e6, "test acc %": b["test_accuracy"], "± SE": comparison.binomial_se(b["test_accuracy"], b["n_test"])})
                    print("\nBudgeted batch (thresholds from held-out, applied to test):\n" + t.to_string(index=False))
        comp = out.get("comparison")
        if comp is not None:
            print("\nComparison (test accuracy %, per exit and per budget):\n" + comparison.format_table(comp))
    if out.get("epilogue"):  # a pipeline's own last word, e.g. a reproduction's claims and verdicts
        print(out["epilogue"])
    print(f"\n[dynlab] run '{name}' {'finished' if finished else 'ended with failed trials'}. MLflow run {handle.run_id} in {uri}")
    if out.get("figure"):
        print(f"[dynlab] figure: {out['figure']}")
    print(f"[dynlab] browse: {tracking.ui_hint(uri)}")
    comp = out.get("comparison")
    if comp is not None and "run_id" in comp and comp["run_id"].astype(bool).sum() > 1:  # the trials' runs, side by side
        print(f"[dynlab] compare the trials: {tracking.compare_link([r for r in comp['run_id'] if r], handle.experiment_id)}")
