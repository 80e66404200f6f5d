"""The steps a pipeline chains: train -> predict -> evaluate -> log.

Each step is a plain function of plain inputs, so a pipeline can run it in the driver, as a Ray
task, or (later) cache it under a hash of its inputs. Nothing is logged until a step has produced
its whole result: a failed step leaves no half-written artifact behind.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dynlab import data as data_mod
from dynlab import evaluation, gating, plots, training
from dynlab.frames import scalar_columns
from dynlab.predictions import ExitPredictions, GatedPredictions
from dynlab.tracking import RunHandle, cost_step


@dataclass
class PredictionTables:
    heldout: pd.DataFrame
    test: pd.DataFrame
    heldout_indices: list[int]


@dataclass
class Evaluation:
    anytime: pd.DataFrame
    budgeted: pd.DataFrame | None  # None for prediction types without exits


def predict(cfg, checkpoint_dir: str, plugins: list[str] | None = None) -> PredictionTables:
    """Load the selected (best held-out) weights and predict the held-out and test splits."""
    training.import_plugins(plugins or ["methods"])
    bundle = data_mod.build_datasets(cfg.data, cfg.run.seed)
    method, model = training.load_trained(cfg, checkpoint_dir, bundle.info)
    device = torch.device("cuda") if cfg.run.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    frames = {"heldout": pd.DataFrame()}  # data.heldout=0: no held-out split, anytime evaluation only
    for split, ds in (("heldout", bundle.heldout), ("test", bundle.test)):
        if len(ds) == 0:
            continue
        preds, labels = training.predict_dataset(method, model, ds, cfg.data.eval_batch_size, device, cfg.run.predict_batches)
        frames[split] = evaluation.predictions_frame(preds, labels, split)
    return PredictionTables(frames["heldout"], frames["test"], [int(i) for i in bundle.heldout_indices])


def check_model(cfg, info) -> None:
    """Build the model once in the driver, so that a method or backbone setting that only the
    model reveals (exit weights per exit, ...) fails before training; requested budgets outside
    [first exit, last exit] fail now too, not after training."""
    from dynlab.errors import ConfigError
    from dynlab.registry import get_method

    model = get_method(cfg.method).cls(cfg).build_model(info)
    table = getattr(model, "cost_table", None)
    if not cfg.eval.budgets or table is None:  # no budgets asked for, or not an early-exit network
        return
    lo, hi = table.macs[0] / 1e6, table.macs[-1] / 1e6
    if any(not lo <= b <= hi for b in cfg.eval.budgets):
        raise ConfigError("eval.budgets", cfg.eval.budgets, f"MMACs per image within [{lo:.3f}, {hi:.3f}], the costs of the first and last exit of this {cfg.backbone}")


def default_budgets(costs: torch.Tensor, n: int) -> list[float]:
    """``n`` budgets evenly spaced strictly inside [first exit cost, last exit cost]."""
    lo, hi = float(costs[0]), float(costs[-1])
    return [lo + (hi - lo) * (i + 1) / (n + 1) for i in range(n)]


def calibrate(cfg, tables: PredictionTables) -> pd.DataFrame | None:
    """Thresholds per operating point from the held-out split (the requested budgets, else
    ``eval.num_budgets`` evenly spaced ones, plus the reference p-grid), or None when there is
    nothing to calibrate: not an early-exit network, no held-out split, or no budgets asked for."""
    if tables.heldout.empty:
        return None
    heldout, _ = evaluation.frame_to_predictions(tables.heldout, "heldout")
    if not isinstance(heldout, ExitPredictions):
        return None
    budgets = [b * 1e6 for b in cfg.eval.budgets] or default_budgets(heldout.costs, cfg.eval.num_budgets)
    if not (budgets or cfg.eval.p_grid):
        return None
    return evaluation.calibrate_budgets(heldout, budgets or None, p_grid=cfg.eval.p_grid)


def evaluate(cfg, tables: PredictionTables, calibration: pd.DataFrame | None = None) -> Evaluation:
    """Anytime table on test; budgeted batch: the thresholds of ``calibration`` (default: calibrated
    here, :func:`calibrate`) applied to held-out and test."""
    test, test_labels = evaluation.frame_to_predictions(tables.test, "test")
    any_df = evaluation.anytime(test, test_labels)
    if isinstance(test, GatedPredictions) and test.gates is not None and getattr(cfg.backbone_cfg, "gated", True):  # not the dense network
        any_df["category_spread"] = gate_spread(cfg, test, test_labels)  # do the gates route by category?
    if calibration is None:
        calibration = calibrate(cfg, tables)
    if calibration is None or not isinstance(test, ExitPredictions):
        return Evaluation(any_df, None)  # anytime only
    heldout, heldout_labels = evaluation.frame_to_predictions(tables.heldout, "heldout")
    return Evaluation(any_df, evaluation.apply_thresholds(calibration, heldout, heldout_labels, test, test_labels, flat_curve=cfg.eval.flat_curve))


def gate_categories(cfg, num_classes: int) -> tuple[list[int] | None, list[str] | None]:
    """The class -> category mapping the method trained with (a method setting ``categories``, as
    DMNN's, resolved by :func:`dynlab.data.class_categories`) and the categories' names; (None,
    None) when the method has none or it is ``none`` (execution rates per class only)."""
    spec = getattr(cfg.method_cfg, "categories", None)
    if not isinstance(spec, str):
        return None, None
    mapping = data_mod.class_categories(spec, cfg.data, num_classes, f"{cfg.method}.categories")
    return (mapping, data_mod.category_names(spec, cfg.data, max(mapping) + 1)) if mapping is not None else (None, None)


def gate_spread(cfg, preds: GatedPredictions, labels) -> float:
    """The widest difference of one sub-block's execution rate across the categories the method
    trained with (per class when it has none): 0 for a static network (see gating.category_spread)."""
    mapping, _ = gate_categories(cfg, preds.logits.shape[1])
    by = gating.rates_by_category(preds.gates, preds.subblocks, labels, mapping)
    return gating.category_spread(by)


def log_evaluation(handle: RunHandle, cfg, tables: PredictionTables, ev: Evaluation, checkpoint_dir: str | None = None) -> Path:
    """Everything a run leaves: tables, curves as metrics on a cost axis, the figure, the checkpoint.
    Written to a temporary folder first and logged only when complete."""
    points: list[tuple[str, float, int]] = []
    for _, row in ev.anytime.iterrows():  # every anytime row has an index and a cost
        i = int(row["index"])
        points += [("anytime/test_accuracy", row["accuracy"], cost_step(row["cost"])), (f"test/acc_out{i}", row["accuracy"], 0), (f"test/mmacs_out{i}", row["cost"] / 1e6, 0)]
    if ev.budgeted is not None:
        points += [(f"budgeted_{r['mode']}/test_accuracy", r["test_accuracy"], cost_step(r["test_cost"])) for _, r in ev.budgeted.sort_values("test_cost").iterrows()]
    handle.log_points(points)

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        tables.heldout.to_parquet(out / "heldout.parquet", index=False)
        tables.test.to_parquet(out / "test.parquet", index=False)
        (out / "heldout_indices.json").write_text(json.dumps(tables.heldout_indices))
        ev.anytime.to_parquet(out / "anytime.parquet", index=False)
        ev.anytime.to_csv(out / "anytime.csv", index=False)
        if ev.budgeted is not None:
            evaluation.save_thresholds(ev.budgeted[["mode", "q", "requested_budget", "thresholds"]], out / "thresholds.json")
            ev.budgeted.to_parquet(out / "budgeted.parquet", index=False)
            scalar_columns(ev.budgeted).to_csv(out / "budgeted.csv", index=False)
        test_preds, test_labels = evaluation.frame_to_predictions(tables.test, "test")
        if isinstance(test_preds, GatedPredictions) and test_preds.gates is not None:  # execution rates, cost distribution
            mapping, names = gate_categories(cfg, test_preds.logits.shape[1])
            gating.write_report(out / "gated", test_preds.gates, test_preds.subblocks, test_labels, test_preds.costs, full=test_preds.full_cost, class_categories=mapping, names=names)
            for f in sorted((out / "gated").iterdir()):
                handle.log_artifact(f, "evaluation/gated")
        fig = plots.plot_evaluation(ev.anytime, ev.budgeted, out / "curves.png", title=f"{cfg.method} on {cfg.backbone} / {cfg.data.name}")
        for name in ("heldout.parquet", "test.parquet"):
            handle.log_artifact(out / name, "predictions")
        handle.log_artifact(out / "heldout_indices.json", "data")
        for name in ("anytime.parquet", "anytime.csv", "budgeted.parquet", "budgeted.csv", "thresholds.json"):
            if (out / name).exists():
                handle.log_artifact(out / name, "evaluation")
        handle.log_artifact(fig, "evaluation")
        if checkpoint_dir:
            for name in (training.BEST_FILE, "config.yaml"):
                if (Path(checkpoint_dir) / name).exists():
                    handle.log_artifact(Path(checkpoint_dir) / name, "checkpoint")
    from dynlab import tracking

    def count(frame: pd.DataFrame) -> int:
        return int(frame["sample"].nunique()) if len(frame) else 0

    tracking.log_dataset_inputs(handle, cfg.data, tables.heldout_indices, count(tables.heldout), count(tables.test))  # the UI's Dataset column
    if checkpoint_dir and cfg.run.log_model:  # the selected model, loadable and servable without our code installed
        from dynlab import served

        served.log_model(handle, cfg, checkpoint_dir, data_mod.dataset_info(cfg.data), tables, ev)
    return Path(handle.artifact_uri().removeprefix("file://")) / "evaluation" / Path(fig).name
