"""What the two ADN pipelines share: their default method/backbone, and the sub-network report
added after the sweep pipeline (Pareto front and best sub-network under each budget per trial)."""

from __future__ import annotations

import sys
from typing import Callable

import pandas as pd

from dynlab import cli, pipeline, subnets

DEFAULTS = ["method=adn", "backbone=adn_resnet"]  # the user's own keys come after and win
# unless the command line or a config file sets the epochs: on digits, ADN's 16 sub-networks need
# about 15 epochs to separate (at the platform's 4, intermediate sub-networks are near chance and
# the ablation's ordering is noise); 20 epochs give base-net 97.8% and super-net 98.6%
DEFAULT_EPOCHS = 15


def with_defaults(argv: list[str]) -> list[str]:
    """``DEFAULTS``, the default epochs unless ``epochs``, ``run.epochs`` or ``config`` is given,
    then the user's arguments."""
    keys = {a.split("=", 1)[0] for a in argv if "=" in a}
    epochs = [] if keys & {"epochs", "run.epochs", "config"} else [f"run.epochs={DEFAULT_EPOCHS}"]
    return [*DEFAULTS, *epochs, *argv]


def subnet_report(out: dict, budgets_mmacs: list[float], num_budgets: int = 4) -> pd.DataFrame:
    """One row per (trial, budget): the best sub-network whose cost fits, plus each trial's Pareto
    front as rows with budget NaN. Budgets: the requested ones (MMACs), else ``num_budgets``
    evenly spaced inside the range of all sub-network costs."""
    frames = {}
    for _, row in out["comparison"].iterrows():
        ev = out["dag"][f"evaluate[{row['trial']}]"]
        if row["status"] == "ok" and "anytime" in ev:
            frames[row["trial"]] = pd.read_parquet(ev["anytime"])
    if not frames:
        return pd.DataFrame()
    costs = pd.concat(frames.values())["mmacs"]
    lo, hi = float(costs.min()), float(costs.max())
    budgets = list(budgets_mmacs) or [lo + (hi - lo) * (i + 1) / (num_budgets + 1) for i in range(num_budgets)]
    rows = []
    for trial, any_df in frames.items():
        df = any_df.assign(cost=any_df["mmacs"])  # budgets are in MMACs
        for _, r in subnets.front_frame(df).iterrows():
            rows.append({"trial": trial, "kind": "pareto", "budget_mmacs": float("nan"), "name": r["name"], "mmacs": r["mmacs"], "accuracy": r["accuracy"]})
        for _, r in subnets.budget_frame(df, budgets).iterrows():
            rows.append({"trial": trial, "kind": "budget", "budget_mmacs": r["budget"], "name": r["name"], "mmacs": r["cost"], "accuracy": r["accuracy"]})
    return pd.DataFrame(rows)


def with_latency(report: pd.DataFrame, trials: list, repeats: int = 5) -> pd.DataFrame:
    """``report`` with ``latency_ms`` per sub-network: the median of ``repeats`` interleaved rounds
    at batch 1 on this machine's CPU, measured once per architecture (it does not depend on the
    trained weights), beside the measured MACs."""
    import torch

    from dynlab import data, registry
    from methods.adn import subnet_latency

    by_arch: dict[str, dict[str, float]] = {}
    latency_of = {}
    for t in trials:
        cfg = t.cfg()
        arch = f"{cfg.backbone} {cfg.backbone_cfg} {cfg.method_cfg.skip_aware_norms}"
        if arch not in by_arch:
            with torch.no_grad():
                model = registry.get_method(cfg.method).cls(cfg).build_model(data.dataset_info(cfg.data))
                every = model.cost_table.names
                wanted = set(cfg.method_cfg.subnets or every) | {every[0], every[-1]}  # the individual baselines' too
                frame = subnet_latency(model, [n for n in every if n in wanted], repeats=repeats)
            by_arch[arch] = dict(zip(frame["name"], frame["latency_s"] * 1e3))
        latency_of[t.id] = by_arch[arch]
    ms = [latency_of.get(trial, {}).get(name, float("nan")) for trial, name in zip(report["trial"], report["name"])]
    return report.assign(latency_ms=ms)


def main(doc: str, experiment: str, trials: Callable, title: Callable, argv: list[str] | None = None) -> int:
    """pipeline.main with ADN defaults, printing and logging the sub-network report."""
    argv = with_defaults(list(sys.argv[1:] if argv is None else argv))

    def body(cfg, handle, name):
        out = pipeline.run(cfg, trials(cfg), handle, experiment, title(cfg))
        report = subnet_report(out, cfg.eval.budgets, cfg.eval.num_budgets or 4)
        if not report.empty:
            report = with_latency(report, trials(cfg))
            handle.log_frame(report, "subnets", "report", csv=True)
            budgeted = report[report["kind"] == "budget"].assign(budget_mmacs=lambda d: d["budget_mmacs"].round(2))
            best = budgeted.pivot(index="trial", columns="budget_mmacs", values="name").replace("", "-")
            print("\nBest sub-network under each budget (MMACs per image; test accuracy and latency_ms in report/subnets.csv):\n" + best.to_string())
        return out

    def plan(cfg):
        return [t.cfg() for t in trials(cfg)]

    return cli.main(doc, argv, body, default_experiment=experiment, plan=plan)
