"""Figures of evaluation results: PNG drawn on an explicit Agg canvas.

No pyplot and no global backend switch, so it is headless, thread-safe and leaves a notebook's
backend alone.

Inputs are the frames of :mod:`dynlab.evaluation`: ``anytime()`` (columns ``mmacs``,
``accuracy``; ``pareto`` for sub-networks; a single row for gated networks) and ``budgeted()``
(columns ``mode``, ``test_cost``, ``test_accuracy``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_evaluation", "plot_overlay"]

_MODE_LABELS = {"budget": "budgets", "pgrid": "p-grid"}


def _new_figure(ncols: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(6.0 * ncols, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _draw_anytime(ax: Axes, anytime_df: pd.DataFrame, label: str, color=None) -> None:
    df = anytime_df.sort_values("mmacs", kind="stable")
    if len(df) == 1:  # gated: one operating point (mean cost), cost range as an error bar
        row = df.iloc[0]
        xerr = None
        if {"cost_min", "cost_max"} <= set(df.columns):
            xerr = [[(row["cost"] - row["cost_min"]) / 1e6], [(row["cost_max"] - row["cost"]) / 1e6]]
        ax.errorbar([row["mmacs"]], [row["accuracy"]], xerr=xerr, fmt="o", capsize=3, label=label, color=color)
        return
    if "pareto" in df.columns:  # sub-networks: all as dots, the front as a line
        (dots,) = ax.plot(df["mmacs"], df["accuracy"], "o", alpha=0.45, color=color)
        front = df[df["pareto"].astype(bool)]
        ax.plot(front["mmacs"], front["accuracy"], "-o", color=dots.get_color(), label=f"{label} (Pareto front)")
        return
    ax.plot(df["mmacs"], df["accuracy"], "-o", label=label, color=color)


def _draw_budgeted(ax: Axes, budgeted_df: pd.DataFrame, label: str, color=None) -> None:
    for mode, group in budgeted_df.groupby("mode", sort=False):
        group = group.sort_values("test_cost", kind="stable")
        style = "-" if mode == "pgrid" else "s"
        suffix = _MODE_LABELS.get(mode, str(mode))
        line = ax.plot(group["test_cost"] / 1e6, group["test_accuracy"], style, label=f"{label} ({suffix})", color=color, markersize=5)
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


def plot_overlay(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame | None]], path, title: str) -> Path:
    """Several runs on shared axes (anytime, and budgeted batch where any run has it) -> PNG."""
    if not runs:
        raise ValueError("plot_overlay: runs is empty; expected {name: (anytime_df, budgeted_df or None)}")
    has_budget = any(b is not None and len(b) > 0 for _, b in runs.values())
    fig, axes = _new_figure(2 if has_budget else 1)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    for i, (name, (anytime_df, budgeted_df)) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        _draw_anytime(axes[0], anytime_df, name, color=color)
        if has_budget and budgeted_df is not None and len(budgeted_df) > 0:
            _draw_budgeted(axes[1], budgeted_df, name, color=color)
    _finish(axes[0], "anytime")
    if has_budget:
        _finish(axes[1], "budgeted batch")
    fig.suptitle(title)
    return _save(fig, path)
