"""Orchestration overhead of a sweep pipeline: how much of its wall time is the work itself.

Runs a sweep pipeline as a user does (``python -m <pipeline>``, its own process, a local Ray) in a
fresh temporary folder (its own run storage, step cache, data cache and SQLite MLflow store), then
reads back from MLflow what each trial logged and what the DAG recorded:

    python -m benchmarks.overhead                                   # pipelines.ablation_temperature, its defaults
    python -m benchmarks.overhead sweep.values=[0.5] sweep.baseline=false epochs=1    # any pipeline key=value
    python -m benchmarks.overhead --pipeline pipelines.ablation_batch_size --keep /tmp/bench

Per trial and in total it prints
  epochs    the number of training epochs logged (``epoch_seconds`` points)
  epoch_s   the sum of ``epoch_seconds`` (training and held-out scoring of every epoch)
  predict_s, calibrate_s, evaluate_s   the seconds each DAG step recorded (``dag/steps.json``), steps_s their sum
  span_s    per trial: its training run's span (MLflow child run start -> end) plus its steps' seconds;
            in total: the pipeline's wall time (process start -> exit, Ray start-up and shut-down included)
  useful    (epoch_s + steps_s) / (span_s x slots): the fraction of the time the work itself ran.
            ``slots`` is the number of trials the sweep ran at a time (1 per trial row): with two
            trials at once on two cores each epoch runs on half the machine, so its seconds count
            against two slots of wall time, never twice.
and the phases of the wall time (from the pipeline's timestamped log: start-up before the DAG,
the sweep step, the steps after it, the tail after the DAG). The table is written as CSV (path
printed); the pipeline's log, with the elapsed seconds in front of every line, beside it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STEP_KINDS = ("predict", "calibrate", "evaluate")
PROGRESS = re.compile(r"^\[(sweep|dag)\] (?!cached)|\[dynlab\] epoch \d+/\d+  loss|\[dynlab\] run '|^error|Traceback|worker group startup timed out")
PHASE_MARKS = {  # first log line of each phase
    "dag": re.compile(r"^\[dag\] \d+ step\(s\)"),
    "sweep": re.compile(r"^\[sweep\] \d+ of \d+ trials"),
    "first_epoch": re.compile(r"\[dynlab\] epoch 1/\d+  loss"),
    "sweep_done": re.compile(r"^\[dag\] ran sweep in"),
    "dag_done": re.compile(r"^\[dag\] done in"),
}
CONCURRENCY = re.compile(r"^\[sweep\] \d+ of \d+ trials to train .*?(\d+) at a time")


@dataclass
class Measurement:
    table: pd.DataFrame  # one row per trial, then the "total" row
    wall: float
    slots: int
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    returncode: int = 0
    log: Path | None = None
    csv: Path | None = None


def run_pipeline(pipeline: str, overrides: list[str], workdir: Path, echo=print) -> tuple[float, int, list[tuple[float, str]]]:
    """The pipeline in its own process in ``workdir``; returns its wall time, exit code and its
    output lines with the elapsed seconds at which each arrived."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env.update(
        RAY_ADDRESS="local",  # a Ray of its own, even where `ray start` left a cluster that ray.init() would join
        MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
        DYNLAB_CACHE=str(workdir / "data-cache"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    args = [sys.executable, "-m", pipeline, f"run.storage_path={workdir / 'runs'}", *overrides]
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            line = line.rstrip("\n")
            lines.append((t, line))
            if PROGRESS.search(line):
                echo(f"  {t:6.1f}s  {line.strip()[:150]}")
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    return time.perf_counter() - t0, rc, lines


def _experiment(pipeline: str) -> str:
    return getattr(importlib.import_module(pipeline), "EXPERIMENT")


def read_back(uri: str, experiment: str, workdir: Path) -> tuple[pd.DataFrame, list[dict]]:
    """Per trial: epochs logged, their seconds, the training run's span; and the DAG step records."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "dynlab.trial" not in r.data.tags]
    children = [r for r in runs if "dynlab.trial" in r.data.tags]
    if len(parents) != 1:
        raise RuntimeError(f"expected one pipeline run in experiment {experiment!r}, found {len(parents)}")
    steps_json = Path(c.download_artifacts(parents[0].info.run_id, "dag/steps.json", str(workdir)))
    records = json.loads(steps_json.read_text())
    rows = []
    for r in sorted(children, key=lambda r: r.data.tags["dynlab.trial"]):
        hist = c.get_metric_history(r.info.run_id, "epoch_seconds")
        end = r.info.end_time or r.info.start_time
        rows.append({"trial": r.data.tags["dynlab.trial"], "epochs": len(hist), "epoch_s": sum(m.value for m in hist), "train_span_s": (end - r.info.start_time) / 1000})
    return pd.DataFrame(rows, columns=["trial", "epochs", "epoch_s", "train_span_s"]), records


def tabulate(per_trial: pd.DataFrame, records: list[dict], wall: float, slots: int) -> pd.DataFrame:
    """The table: one row per trial, then the total (sums, the pipeline's wall time)."""
    steps = {kind: {} for kind in STEP_KINDS}
    for rec in records:
        m = re.fullmatch(r"(\w+)\[(.*)\]", rec["name"])
        if m and m.group(1) in steps:
            steps[m.group(1)][m.group(2)] = float(rec["seconds"]) if rec["status"] == "ran" else 0.0
    t = per_trial.copy()
    for kind in STEP_KINDS:
        t[f"{kind}_s"] = [steps[kind].get(trial, 0.0) for trial in t["trial"]]
    t["steps_s"] = t[[f"{k}_s" for k in STEP_KINDS]].sum(axis=1)
    t["span_s"] = t["train_span_s"] + t["steps_s"]
    t["slots"] = 1
    total = {c: t[c].sum() for c in ["epochs", "epoch_s", *(f"{k}_s" for k in STEP_KINDS), "steps_s", "train_span_s"]}
    total.update(trial="total", span_s=wall, slots=slots)
    t = pd.concat([t, pd.DataFrame([total])], ignore_index=True)
    t["epochs"] = t["epochs"].astype(int)
    t["useful"] = (t["epoch_s"] + t["steps_s"]) / (t["span_s"] * t["slots"]).where(t["span_s"] > 0)
    return t[["trial", "epochs", "epoch_s", "predict_s", "calibrate_s", "evaluate_s", "steps_s", "train_span_s", "span_s", "slots", "useful"]]


def phases(lines: list[tuple[float, str]], wall: float, records: list[dict]) -> dict[str, float]:
    """Seconds of: start-up (process start -> the DAG prints its graph), sweep set-up (-> the
    first epoch), the sweep step, the steps after it, and the tail (DAG done -> process exit)."""
    at: dict[str, float] = {}
    for t, line in lines:
        for name, pattern in PHASE_MARKS.items():
            if name not in at and pattern.search(line):
                at[name] = t
    out = {}
    if "dag" in at:
        out["start-up (imports, checks, MLflow run) before the DAG"] = at["dag"]
    if "dag" in at and "first_epoch" in at:
        out["DAG start -> first epoch logged (Ray, Tune, worker group, data, model)"] = at["first_epoch"] - at["dag"]
    sweep = next((r["seconds"] for r in records if r["name"] == "sweep"), None)
    if sweep is not None:
        out["sweep step (all training)"] = sweep
    if "sweep_done" in at and "dag_done" in at:
        out["sweep done -> DAG done (steps not overlapped with training, report)"] = at["dag_done"] - at["sweep_done"]
    if "dag_done" in at:
        out["DAG done -> process exit (summary, Ray shut-down)"] = wall - at["dag_done"]
    return out


def slots_of(lines: list[tuple[float, str]]) -> int:
    for _, line in lines:
        m = CONCURRENCY.search(line)
        if m:
            return int(m.group(1))
    return 1


def measure(pipeline: str, overrides: list[str], workdir: Path, echo=print) -> Measurement:
    workdir.mkdir(parents=True, exist_ok=True)
    wall, rc, lines = run_pipeline(pipeline, overrides, workdir, echo)
    log = workdir / "pipeline.log"
    log.write_text("".join(f"{t:8.2f}  {line}\n" for t, line in lines))
    if rc != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"{pipeline} exited with {rc} (log: {log}):\n{tail}")
    per_trial, records = read_back(f"sqlite:///{workdir / 'mlflow.db'}", _experiment(pipeline), workdir)
    slots = slots_of(lines)
    return Measurement(tabulate(per_trial, records, wall, slots), wall, slots, phases(lines, wall, records), rc, log)


def format_table(m: Measurement) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        text = m.table.to_string(index=False)
    total = m.table.iloc[-1]
    lines = [text, ""]
    lines.append(f"wall {m.wall:.1f} s ({m.wall / 60:.2f} min), {int(total['epochs'])} epochs in {total['epoch_s']:.1f} s, "
                 f"predict/calibrate/evaluate {total['steps_s']:.1f} s, {m.slots} trial(s) at a time: useful fraction {total['useful']:.2f}"
                 f" (unnormalised (epochs + steps) / wall = {(total['epoch_s'] + total['steps_s']) / m.wall:.2f})")
    if m.phases:
        lines.append("phases of the wall time:")
        lines += [f"  {s:7.1f} s  {name}" for name, s in m.phases.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Measurement:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="pipelines.ablation_temperature", help="a sweep pipeline module (default: %(default)s)")
    ap.add_argument("--keep", default="", help="run in this folder and keep it (default: a temporary folder, removed afterwards)")
    ap.add_argument("--csv", default="", help="where to write the table (default: overhead-<time>.csv in the current folder)")
    ap.add_argument("overrides", nargs="*", help="key=value passed to the pipeline (e.g. epochs=1 sweep.values=[0.5])")
    args = ap.parse_args(argv)
    csv = Path(args.csv or f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.csv").resolve()
    workdir = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="dynlab-overhead-"))
    if args.keep and workdir.exists() and any(workdir.iterdir()):
        ap.error(f"--keep {workdir}: not empty (a fresh folder measures a fresh run: nothing cached)")
    print(f"[overhead] {args.pipeline} {' '.join(args.overrides)}".rstrip() + f"  (in {workdir}; {os.cpu_count()} CPUs)", flush=True)
    try:
        m = measure(args.pipeline, args.overrides, workdir, echo=lambda s: print(s, flush=True))
        csv.parent.mkdir(parents=True, exist_ok=True)
        m.table.to_csv(csv, index=False)
        m.csv = csv
        log = csv.with_suffix(".log")
        shutil.copy2(m.log, log)
        m.log = log
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + format_table(m))
    print(f"[overhead] table: {csv}\n[overhead] pipeline log (elapsed seconds per line): {m.log}")
    return m


if __name__ == "__main__":
    main()
