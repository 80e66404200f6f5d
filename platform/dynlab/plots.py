"""Figures of evaluation results: PNG drawn on an explicit Agg canvas.

No pyplot and no global backend switch, so it is headless, thread-safe and leaves a notebook's
backend alone.

Inputs are the frames of :mod:`dynlab.evaluation`: ``anytime()`` (columns ``mmacs``,
``accuracy``; ``pareto`` for sub-networks; a single row for gated networks) and ``budgeted()``
(columns ``mode``, ``test_cost``, ``test_accuracy``).

Every accuracy is drawn with its noise: error bars of the binomial standard error given the
number of test samples (``n_samples`` / ``n_test`` columns) for one run, or of the standard
deviation over seeds for several seeds of one label (each seed thin, their mean bold).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dynlab.comparison import binomial_se, mean_curve

__all__ = ["plot_evaluation", "plot_overlay"]

_MODE_LABELS = {"budget": "budgets", "pgrid": "p-grid"}


def _new_figure(ncols: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(6.0 * ncols, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _accuracy_error(df: pd.DataFrame, acc: str, n: str):
    """Per-point error bar: the std over seeds where the frame is a mean of several, else the
    binomial SE given the sample count; None when neither is known."""
    if f"{acc}_std" in df.columns:
        return df[f"{acc}_std"].to_numpy(dtype=float)
    if n in df.columns:
        return binomial_se(df[acc].to_numpy(dtype=float), df[n].to_numpy(dtype=float))
    return None


def _draw_anytime(ax: Axes, anytime_df: pd.DataFrame, label: str | None, color=None, thin: bool = False) -> None:
    df = anytime_df.sort_values("mmacs", kind="stable")
    yerr = None if thin else _accuracy_error(df, "accuracy", "n_samples")
    style = {"alpha": 0.3, "linewidth": 0.8, "markersize": 2} if thin else {"capsize": 2}
    if len(df) == 1:  # gated: one operating point (mean cost), cost range as an x error bar
        row = df.iloc[0]
        xerr = None
        if {"cost_min", "cost_max"} <= set(df.columns):
            xerr = [[(row["cost"] - row["cost_min"]) / 1e6], [(row["cost_max"] - row["cost"]) / 1e6]]
        ax.errorbar([row["mmacs"]], [row["accuracy"]], xerr=xerr, yerr=yerr, fmt="o", label=label, color=color, **style)
        return
    if "pareto" in df.columns:  # sub-networks: all as dots, the front as a line
        (dots,) = ax.plot(df["mmacs"], df["accuracy"], "o", alpha=0.45 if not thin else 0.2, color=color)
        front = df[df["pareto"].astype(bool)]
        front_err = None if yerr is None else yerr[df["pareto"].astype(bool).to_numpy()]
        ax.errorbar(front["mmacs"], front["accuracy"], yerr=front_err, fmt="-o", color=dots.get_color(), label=label and f"{label} (Pareto front)", **style)
        return
    ax.errorbar(df["mmacs"], df["accuracy"], yerr=yerr, fmt="-o", label=label, color=color, **style)


def _draw_budgeted(ax: Axes, budgeted_df: pd.DataFrame, label: str | None, color=None, thin: bool = False) -> None:
    for mode, group in budgeted_df.groupby("mode", sort=False):
        group = group.sort_values("test_cost", kind="stable")
        x, y = group["test_cost"].to_numpy(dtype=float) / 1e6, group["test_accuracy"].to_numpy(dtype=float)
        name = label and f"{label} ({_MODE_LABELS.get(mode, str(mode))})"
        if thin:
            line = ax.plot(x, y, "-" if mode == "pgrid" else "s", color=color, alpha=0.3, linewidth=0.8, markersize=2)
        elif mode == "pgrid":  # a dense curve: its noise as a band
            line = ax.plot(x, y, "-", label=name, color=color)
            err = _accuracy_error(group, "test_accuracy", "n_test")
            if err is not None:
                ax.fill_between(x, y - err, y + err, color=line[0].get_color(), alpha=0.15, linewidth=0)
        else:
            bars = ax.errorbar(x, y, yerr=_accuracy_error(group, "test_accuracy", "n_test"), fmt="s", label=name, color=color, markersize=5, capsize=2)
            line = bars.lines
        color = line[0].get_color()  # keep one colour per run across modes


def _finish(ax: Axes, title: str) -> None:
    ax.set_xlabel("MMACs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def plot_evaluation(anytime_df: pd.DataFrame, budgeted_df: pd.DataFrame | None, path, title: str) -> Path:
    """Anytime accuracy vs MMACs and, when given, budgeted-batch test accuracy vs MMACs -> PNG."""
    has_budget = budgeted_df is not None and len(budgeted_df) > 0
    fig, axes = _new_figure(2 if has_budget else 1)
    _draw_anytime(axes[0], anytime_df, "anytime")
    _finish(axes[0], "anytime")
    if has_budget:
        _draw_budgeted(axes[1], budgeted_df, "test")
        _finish(axes[1], "budgeted batch")
    fig.suptitle(title)
    return _save(fig, path)


Run = tuple[pd.DataFrame, "pd.DataFrame | None"]  # (anytime_df, budgeted_df or None)


def _seeds(value) -> list[Run]:
    return list(value) if isinstance(value, list) else [value]


def _mean_run(seeds: list[Run]) -> Run:
    """The point-by-point mean (with ``_std`` columns) of several seeds' curves."""
    anytime_df = mean_curve([a for a, _ in seeds], ["index"], ["accuracy", "mmacs", "cost"])
    budgets = [b for _, b in seeds if b is not None and len(b) > 0]
    return anytime_df, (mean_curve(budgets, ["mode"], ["test_accuracy", "test_cost"]) if len(budgets) == len(seeds) else None)


def _draw_label(axes: list[Axes], name: str, seeds: list[Run], color, has_budget: bool) -> None:
    """One label: its single run with binomial error bars, or every seed thin and their mean with
    the spread over seeds as error bars."""
    if len(seeds) > 1:
        for anytime_df, budgeted_df in seeds:
            _draw_anytime(axes[0], anytime_df, None, color=color, thin=True)
            if has_budget and budgeted_df is not None and len(budgeted_df) > 0:
                _draw_budgeted(axes[1], budgeted_df, None, color=color, thin=True)
        name = f"{name} (mean ± std of {len(seeds)} seeds)"
    anytime_df, budgeted_df = _mean_run(seeds) if len(seeds) > 1 else seeds[0]
    _draw_anytime(axes[0], anytime_df, name, color=color)
    if has_budget and budgeted_df is not None and len(budgeted_df) > 0:
        _draw_budgeted(axes[1], budgeted_df, name, color=color)


def overlay_figure(runs: dict[str, Run | list[Run]], title: str) -> Figure:
    """Several labels on shared axes (anytime, and budgeted batch where any run has it). A value
    is one run's ``(anytime_df, budgeted_df or None)``, or a list of them: the seeds of one label."""
    if not runs:
        raise ValueError("plot_overlay: runs is empty; expected {name: (anytime_df, budgeted_df or None), or a list of them per seed}")
    groups = {name: _seeds(v) for name, v in runs.items()}
    has_budget = any(b is not None and len(b) > 0 for seeds in groups.values() for _, b in seeds)
    fig, axes = _new_figure(2 if has_budget else 1)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    for i, (name, seeds) in enumerate(groups.items()):
        _draw_label(axes, name, seeds, colors[i % len(colors)], has_budget)
    _finish(axes[0], "anytime")
    if has_budget:
        _finish(axes[1], "budgeted batch")
    # short enough for a one-panel figure (6 inches): the long form was cut at both edges
    fig.suptitle(f"{title}\nerror bars: binomial SE of test accuracy (one seed) or std over seeds", fontsize="medium")
    return fig


def plot_overlay(runs: dict[str, Run | list[Run]], path, title: str) -> Path:
    """:func:`overlay_figure` -> PNG."""
    return _save(overlay_figure(runs, title), path)
