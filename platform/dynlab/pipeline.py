"""The sweep pipeline every ablation shares, as a DAG of cached steps:

    sweep (Ray Tune; every trial trained by Ray Train)
      -> predict[trial] -> calibrate[trial] -> evaluate[trial]   (Ray tasks, per trial)
      -> report                              (overlay figure, comparison tables with their noise, in the parent run)

A pipeline that trains in stages (IMTA: phase I, then phase II from phase I's weights) declares
them as :class:`Stage` s: one sweep step per stage (``sweep[<stage>]``), a later stage's step after
the stage it starts from, and predict/calibrate/evaluate for the trials of the compared stages.

MLflow layout: one experiment per pipeline, a parent run per invocation (the DAG graph and step
records, the report), a child run per trial (training curves, then calibration and evaluation).
Trained weights are cached per trial config and predictions/evaluations per content hash, so an
unchanged pipeline trains nothing and changing one knob reruns only what depends on it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dynlab import config as config_mod
from dynlab import comparison, dag, evaluation, plots, steps, sweeps, tracking, training
from dynlab.config import NOT_TRAINING


def _tables(heldout: str, test: str, indices: str) -> steps.PredictionTables:
    return steps.PredictionTables(pd.read_parquet(heldout), pd.read_parquet(test), json.loads(Path(indices).read_text()))


# ------------------------------------------------------------------ step functions (module level: cache keys name them)


@dataclasses.dataclass
class Stage:
    """One training stage: its trials; ``after``, the stage whose trained weights they start from
    (their ``run.init_from`` is ``<cache>/train/<train key>`` of a trial of that stage, so one
    upstream training serves every trial that names it, and changing a knob of this stage never
    retrains the upstream one); ``compare``: whether its trials are evaluated and in the report."""

    name: str
    trials: list[sweeps.Trial]
    after: str | None = None
    compare: bool = True

    @property
    def step(self) -> str:
        return "sweep" if self.name == "sweep" else f"sweep[{self.name}]"


def blocked_trials(trials: list[sweeps.Trial], upstream: dict) -> dict[str, str]:
    """``{trial id: why}`` for trials whose ``run.init_from`` names an upstream trial that did not
    finish: they cannot start, and are reported failed without training."""
    failed = {info["train_key"]: (tid, info["status"]) for tid, info in upstream.items() if isinstance(info, dict) and info.get("status") != "ok"}
    out = {}
    for t in trials:
        start = Path(t.config["run"]["init_from"] or ".").name
        if start in failed:
            tid, status = failed[start]
            out[t.id] = f"not started: the trial it starts from ({tid}) {status}"
    return out


def sweep_step(ctx: dag.StepContext, upstream: dict | None = None) -> dict:
    """Train every trial of one stage that is not cached (Ray Tune); one entry per trial."""
    c = ctx.config
    base = config_mod.from_dict(c["base"])
    trials = [sweeps.Trial(**t) for t in c["trials"]]
    parent = tracking.RunHandle(**c["parent"])
    blocked = blocked_trials(trials, upstream or {})
    if blocked:
        print(f"[pipeline] stage {c['stage']}: {len(blocked)} trial(s) cannot start: {', '.join(blocked)}", flush=True)
    runnable = [t for t in trials if t.id not in blocked]
    result = sweeps.run(base, runnable, parent, c["experiment"], plugins=c["plugins"]) if runnable else sweeps.SweepResult(pd.DataFrame())
    skipped = [{"trial": t.id, "label": t.label, "status": "failed", "error": blocked[t.id], "cached": False, "train_key": t.train_key, "run_id": "", "checkpoint_dir": "", "note": ""} for t in trials if t.id in blocked]
    table = pd.concat([result.table, pd.DataFrame(skipped)], ignore_index=True) if skipped else result.table
    table.to_parquet(ctx.out_dir / "sweep.parquet", index=False)
    parent.log_frame(table, "sweep" if c["stage"] == "sweep" else f"sweep_{c['stage']}", "sweep", csv=True)
    out: dict[str, Any] = {"table": str(ctx.out_dir / "sweep.parquet"), "trained": result.trained}
    keep = ("status", "error", "label", "train_key", "run_id", "checkpoint_dir", "note")  # not "cached": it changes between invocations
    for row in table.to_dict("records"):
        out[row["trial"]] = {k: row[k] for k in keep}
    return out


def predict_step(ctx: dag.StepContext, trained: dict) -> dict:
    """Predict held-out and test with the trial's selected weights."""
    if trained["status"] != "ok":
        return {"status": trained["status"], "error": trained["error"]}
    training.import_plugins(ctx.config["plugins"])  # a fresh Ray worker: fill the registries first
    cfg = config_mod.from_dict(ctx.config["config"])
    tables = steps.predict(cfg, trained["checkpoint_dir"], ctx.config["plugins"])
    tables.heldout.to_parquet(ctx.out_dir / "heldout.parquet", index=False)
    tables.test.to_parquet(ctx.out_dir / "test.parquet", index=False)
    (ctx.out_dir / "heldout_indices.json").write_text(json.dumps(tables.heldout_indices))
    return {"status": "ok", "heldout": str(ctx.out_dir / "heldout.parquet"), "test": str(ctx.out_dir / "test.parquet"), "indices": str(ctx.out_dir / "heldout_indices.json")}


def calibrate_step(ctx: dag.StepContext, predictions: dict) -> dict:
    """Thresholds per budget from the held-out predictions, as ``thresholds.json`` (one row per
    operating point): what evaluation and the real early-exit engine consume."""
    if predictions["status"] != "ok":
        return {"status": predictions["status"], "error": predictions.get("error", "")}
    training.import_plugins(ctx.config["plugins"])
    cfg = config_mod.from_dict(ctx.config["config"])
    calibration = steps.calibrate(cfg, _tables(predictions["heldout"], predictions["test"], predictions["indices"]))
    if calibration is None:  # anytime only
        return {"status": "ok"}
    return {"status": "ok", "thresholds": str(evaluation.save_thresholds(calibration, ctx.out_dir / "thresholds.json"))}


def evaluate_step(ctx: dag.StepContext, trained: dict, predictions: dict, calibration: dict) -> dict:
    """Anytime and budgeted evaluation (the calibrate step's thresholds applied to held-out and
    test); logged into the trial's child run (once: cached afterwards)."""
    if predictions["status"] != "ok":
        return {"status": predictions["status"], "error": predictions.get("error", "")}
    training.import_plugins(ctx.config["plugins"])
    cfg = config_mod.from_dict(ctx.config["config"])
    tables = _tables(predictions["heldout"], predictions["test"], predictions["indices"])
    thresholds = evaluation.load_thresholds(calibration["thresholds"]) if "thresholds" in calibration else None
    ev = steps.evaluate(cfg, tables, thresholds) if thresholds is not None else steps.evaluate(cfg, _without_heldout(tables))
    ev.anytime.to_parquet(ctx.out_dir / "anytime.parquet", index=False)
    out = {"status": "ok", "anytime": str(ctx.out_dir / "anytime.parquet")}
    if ev.budgeted is not None:
        ev.budgeted.to_parquet(ctx.out_dir / "budgeted.parquet", index=False)
        out["budgeted"] = str(ctx.out_dir / "budgeted.parquet")
    child = tracking.RunHandle(ctx.config["tracking_uri"], trained["run_id"], ctx.config["experiment_id"])
    steps.log_evaluation(child, cfg, tables, ev, trained["checkpoint_dir"])
    return out


def _without_heldout(tables: steps.PredictionTables) -> steps.PredictionTables:
    """The calibrate step found nothing to calibrate: evaluation must not calibrate by itself."""
    return steps.PredictionTables(tables.heldout.iloc[0:0], tables.test, tables.heldout_indices)


_SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def _trial_row(trial_id: str, info: dict, ev: dict) -> dict[str, Any]:
    seed = _SEED_SUFFIX.search(trial_id)  # sweeps.expand names repeated trials "<label>-seed<N>"
    return {
        "trial": trial_id,
        "label": info["label"],
        "seed": int(seed.group(1)) if seed else None,
        "status": ev.get("status", info["status"]),
        "error": info["error"] or ev.get("error", ""),
        "note": info.get("note", ""),  # e.g. stopped early by ASHA
        "run_id": info["run_id"],
    }


def collect_results(trials: dict[str, str], sweep: dict, evaluations: dict) -> tuple[pd.DataFrame, dict[str, list]]:
    """One row per trial, every seed kept (accuracy columns with their ``_se``, see
    :func:`dynlab.comparison.trial_columns`), and the curves grouped by label: ``{label: [(anytime,
    budgeted or None), ...]}``, one entry per successful seed, so seeds never overwrite each other."""
    rows, curves = [], {}
    for trial_id, step_name in trials.items():
        info, ev = sweep[trial_id], evaluations[step_name]
        row = _trial_row(trial_id, info, ev)
        if ev.get("status") == "ok":
            anytime = pd.read_parquet(ev["anytime"])
            budgeted = pd.read_parquet(ev["budgeted"]) if "budgeted" in ev else None
            curves.setdefault(info["label"], []).append((anytime, budgeted))
            row.update(comparison.trial_columns(anytime, budgeted))
        rows.append(row)
    return pd.DataFrame(rows), curves


def _log_table(parent: tracking.RunHandle, table: pd.DataFrame, out_dir: Path, name: str) -> Path:
    table.to_parquet(out_dir / f"{name}.parquet", index=False)
    table.to_csv(out_dir / f"{name}.csv", index=False)
    parent.log_artifact(out_dir / f"{name}.parquet", "report")
    parent.log_artifact(out_dir / f"{name}.csv", "report")
    return out_dir / f"{name}.parquet"


def report_step(ctx: dag.StepContext, **inputs: dict) -> dict:
    """The per-trial table (one row per trial and seed), the per-label summary (mean, std and noise
    over seeds), the printed comparison and the overlay figure; logged to the parent run."""
    c = ctx.config
    parent = tracking.RunHandle(**c["parent"])
    sweep = {k: v for name in c["sweeps"] for k, v in inputs[name].items()}  # every compared stage's trials
    table, curves = collect_results(c["trials"], sweep, inputs)
    out = {"table": str(_log_table(parent, table, ctx.out_dir, "comparison"))}
    out["summary"] = str(_log_table(parent, comparison.summarize(table), ctx.out_dir, "summary"))
    parent.log_text(comparison.format_table(table), "report/comparison.txt")
    if curves:
        fig = plots.plot_overlay(curves, ctx.out_dir / "comparison.png", c["title"])
        parent.log_artifact(fig, "report")
        out["figure"] = str(fig)
    return out


# ------------------------------------------------------------------ building and running the DAG


def build(base: config_mod.Config, stages: list[Stage] | list[sweeps.Trial], parent: tracking.RunHandle, experiment: str, title: str, plugins: list[str], after_report: list[dag.Step] = ()) -> list[dag.Step]:
    """The steps of a pipeline; a plain list of trials is one stage named ``sweep``. ``after_report``:
    steps a pipeline adds after the shared ones (a reproduction's paper-vs-ours report reads ``report``)."""
    stages = as_stages(stages)
    gpu = 1 if base.run.use_gpu else 0
    common = {"plugins": plugins}
    by_name = {s.name: s for s in stages}
    out, evals = [], {}
    for stage in stages:
        inputs = {"upstream": by_name[stage.after].step} if stage.after else {}
        out.append(
            dag.Step(
                stage.step,
                sweep_step,
                config={"base": base.to_dict(), "trials": [dataclasses.asdict(t) for t in stage.trials], "parent": parent.as_payload(), "experiment": experiment, "stage": stage.name, **common},
                inputs=inputs,
                where="driver",  # it drives Ray Tune itself
                cache=False,  # cheap when every trial is cached; re-running it retries failed or stopped trials
                retries=0,
            )
        )
        if not stage.compare:
            continue
        for t in stage.trials:
            cfg = t.cfg()
            # step configs hold only what results depend on: no run names or paths, which change per invocation
            predict_cfg = {"config": cfg.hashed_dict(exclude=NOT_TRAINING), **common}
            eval_cfg = {"config": cfg.hashed_dict(), "tracking_uri": parent.uri, "experiment_id": parent.experiment_id, **common}
            out.append(dag.Step(f"predict[{t.id}]", predict_step, config=predict_cfg, inputs={"trained": (stage.step, t.id)}, resources={"num_cpus": 1, "num_gpus": gpu}))
            calib_cfg = {"config": cfg.hashed_dict(exclude=("sweep", "eval.flat_curve")), **common}  # what the thresholds depend on
            out.append(dag.Step(f"calibrate[{t.id}]", calibrate_step, config=calib_cfg, inputs={"predictions": f"predict[{t.id}]"}, resources={"num_cpus": 1}))
            out.append(dag.Step(f"evaluate[{t.id}]", evaluate_step, config=eval_cfg, inputs={"trained": (stage.step, t.id), "predictions": f"predict[{t.id}]", "calibration": f"calibrate[{t.id}]"}, resources={"num_cpus": 1}))
            evals[t.id] = f"evaluate[{t.id}]"
    compared = [s for s in stages if s.compare]
    arg = {f"e{i}": name for i, name in enumerate(evals.values())}
    sweep_args = {f"s{i}": s.step for i, s in enumerate(compared)}
    out.append(
        dag.Step(
            "report",
            report_step,
            config={"parent": parent.as_payload(), "title": title, "trials": {tid: f"e{i}" for i, tid in enumerate(evals)}, "sweeps": list(sweep_args)},
            inputs={**sweep_args, **arg},
            where="driver",
            cache=False,  # logs into this invocation's parent run
        )
    )
    return out + list(after_report)


def as_stages(stages: list[Stage] | list[sweeps.Trial]) -> list[Stage]:
    """Stages checked: unique names and trial ids, ``after`` naming an earlier stage."""
    if not stages or not isinstance(stages[0], Stage):
        return [Stage("sweep", list(stages))]
    seen, ids = set(), set()
    for s in stages:
        if s.name in seen or (s.after is not None and s.after not in seen):
            raise ValueError(f"stage {s.name!r}: names must be unique and 'after' must name an earlier stage (have {sorted(seen)})")
        seen.add(s.name)
        dup = ids & {t.id for t in s.trials}
        if dup:
            raise ValueError(f"stage {s.name!r}: trial ids {sorted(dup)} are already in an earlier stage")
        ids |= {t.id for t in s.trials}
    return list(stages)


def main(doc: str, experiment: str, trials: Callable[[config_mod.Config], list[sweeps.Trial]], title: Callable[[config_mod.Config], str], argv: list[str] | None = None) -> int:
    """The command line of a sweep pipeline module: ``key=value`` arguments -> base config ->
    ``trials(base)`` -> :func:`run`, inside a guarded parent run of experiment ``experiment``."""
    from dynlab import cli

    def body(cfg, handle, name):
        return run(cfg, trials(cfg), handle, experiment, title(cfg))

    def plan(cfg):  # every trial's config is checked before the first epoch
        return [t.cfg() for t in trials(cfg)]

    return cli.main(doc, sys.argv[1:] if argv is None else argv, body, default_experiment=experiment, plan=plan)


def run(base: config_mod.Config, trials: list[Stage] | list[sweeps.Trial], parent: tracking.RunHandle, experiment: str, title: str, plugins: list[str] | None = None, after_report: list[dag.Step] = ()) -> dict:
    """Run the sweep pipeline (one stage, or the declared :class:`Stage` s, then ``after_report``);
    returns the comparison table, the figure, the DAG result and the ids of the trials trained by
    this invocation."""
    plugins = plugins or ["methods"]
    stages = as_stages(trials)
    every = [t for s in stages for t in s.trials]
    parent.set_tags({"dynlab.pipeline": experiment, "dynlab.trials": len(every)})
    parent.log_text("\n".join(f"{s.name}\t{t.id}\t{t.train_key}\t{json.dumps(t.overrides)}" for s in stages for t in s.trials), "trials.tsv")
    result = dag.run(build(base, stages, parent, experiment, title, plugins, after_report), sweeps.cache_root(base) / "steps", tracker=parent)
    result.raise_for_failures()
    report = result["report"]
    return {
        "comparison": pd.read_parquet(report["table"]),  # per trial and seed; comparison.format_table prints it
        "summary": pd.read_parquet(report["summary"]),  # per label: mean, std and noise over seeds
        "figure": report.get("figure"),
        "dag": result,
        "trained": sorted(t for s in stages for t in result[s.step]["trained"]),
    }
