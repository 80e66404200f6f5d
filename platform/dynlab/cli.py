"""The shared command-line entry of every pipeline: parse ``key=value`` arguments, start Ray and an
MLflow run, run the pipeline inside a guard that marks the run FAILED on any error, print where the
results are. Errors caused by input are one clear line (no traceback) and exit code 2."""

from __future__ import annotations

import dataclasses
import time
import typing
from typing import Callable

from dynlab import config as config_mod
from dynlab import cluster, registry, steps, tracking
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


def main(doc: str, argv: list[str], body: Callable[[config_mod.Config, tracking.RunHandle, str], dict], default_experiment: str, plugins: typing.Sequence[str] = ("methods",)) -> int:
    """Resolve and check the config inside a guarded MLflow run (so bad input gives a FAILED run and
    one clear line), then start Ray and run ``body(cfg, handle, name)``."""
    for name in plugins:
        __import__(name)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(doc))
        return 0
    try:
        overrides = config_mod.parse_overrides(argv)
    except DynlabError as err:
        print(f"error: {err}")
        return 2
    short = {config_mod.SHORTCUTS.get(k, k): v for k, v in overrides.items()}
    experiment = str(short.get("run.experiment") or default_experiment)
    method = str(short.get("method", config_mod.Config.method))
    dataset = str(short.get("data.name", "digits"))
    prefix = default_experiment if default_experiment != "dynlab-train" else method
    name = str(short.get("run.name") or f"{prefix}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = {**overrides, "run.name": name} if "name" not in overrides else overrides
    if "run.experiment" not in short:
        overrides["run.experiment"] = experiment

    uri = tracking.tracking_uri()
    handle = tracking.open_run(experiment, name, tags={"dynlab.argv": " ".join(argv)}, resume_key=name)
    try:
        with tracking.run_guard(handle):
            from dynlab import data as data_mod

            cfg = config_mod.resolve(overrides)
            tracking.log_config(handle, cfg)
            info = data_mod.dataset_info(cfg.data)  # a missing dataset fails here, before any worker starts
            steps.check_budgets(cfg, info)
            out = body(cfg, handle, name)
    except BaseException as err:  # noqa: BLE001 - reported, run already marked FAILED by the guard
        cause = input_error(err)
        if cause is None:
            raise
        print(f"error: {cause}")
        print(f"[dynlab] MLflow run {handle.run_id} marked FAILED ({uri})")
        return 2
    finally:
        cluster.stop_if_started()
    report(out, handle, uri, name)
    return 0


def report(out: dict, handle: tracking.RunHandle, uri: str, name: str) -> None:
    import pandas as pd

    ev = out.get("evaluation")
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 2):
        if ev is not None:
            cols = [c for c in ("index", "name", "mmacs", "accuracy", "pareto") if c in ev.anytime]
            print("\nAnytime (test):\n" + ev.anytime[cols].to_string(index=False))
            if ev.budgeted is not None:
                b = ev.budgeted[ev.budgeted["mode"] == "budget"]
                if len(b):
                    t = pd.DataFrame({"budget MMACs": b["requested_budget"] / 1e6, "held-out MMACs": b["heldout_cost"] / 1e6, "test MMACs": b["test_cost"] / 1e6, "test acc %": b["test_accuracy"]})
                    print("\nBudgeted batch (thresholds from held-out, applied to test):\n" + t.to_string(index=False))
        comp = out.get("comparison")
        if comp is not None:
            cols = [c for c in comp.columns if c in ("trial", "status") or c.startswith("acc_") or c.startswith("acc@")]
            print("\nComparison (test accuracy %, per exit and per budget):\n" + comp[cols].to_string(index=False))
            bad = comp[comp["status"] != "ok"]
            for _, row in bad.iterrows():
                print(f"[dynlab] trial {row['trial']}: {row['status']} {row['error']}")
    print(f"\n[dynlab] run '{name}' finished. MLflow run {handle.run_id} in {uri}")
    if out.get("figure"):
        print(f"[dynlab] figure: {out['figure']}")
    print(f"[dynlab] browse: {tracking.ui_hint(uri)}")
