"""Figures are written as real, non-empty PNG files."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

from dynlab.evaluation import anytime, budgeted
from dynlab.plots import overlay_figure, plot_evaluation, plot_overlay
from dynlab.predictions import ExitPredictions, GatedPredictions, SubnetPredictions



PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def exit_preds(seed: int, N: int = 300, E: int = 4, C: int = 5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(E, N, C, generator=g)
    logits[torch.arange(E)[:, None], torch.arange(N)[None], labels[None]] += torch.linspace(0.5, 2.5, E)[:, None]
    return ExitPredictions(logits, torch.tensor([1e6, 2e6, 3.5e6, 5e6][:E], dtype=torch.float64)), labels


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_evaluation_writes_png(tmp_path):
    preds, labels = exit_preds(0)
    a = anytime(preds, labels)
    b = budgeted(preds, labels, preds, labels, budgets=[2.5e6])
    out = plot_evaluation(a, b, tmp_path / "figs" / "eval.png", "exits")
    assert out == tmp_path / "figs" / "eval.png"
    assert_png(out)
    assert_png(plot_evaluation(a, None, tmp_path / "anytime_only.png", "no budgeted"))


def test_plot_overlay_writes_png(tmp_path):
    p0, l0 = exit_preds(0)
    p1, l1 = exit_preds(1)
    g = torch.Generator().manual_seed(2)
    subnet = SubnetPredictions(torch.randn(4, 50, 5, generator=g), torch.tensor([1e6, 2e6, 3e6, 4e6]), ["FF", "FT", "TF", "TT"])
    gated = GatedPredictions(torch.randn(50, 5, generator=g), torch.rand(50, generator=g) * 4e6)
    lab = torch.randint(0, 5, (50,), generator=g)
    runs = {
        "run-a": (anytime(p0, l0), budgeted(p0, l0, p0, l0)),
        "run-b": (anytime(p1, l1), budgeted(p1, l1, p1, l1, budgets=[3e6], p_grid=False)),
        "adn": (anytime(subnet, lab), None),
        "dmnn": (anytime(gated, lab), None),
    }
    out = plot_overlay(runs, tmp_path / "overlay.png", "sweep")
    assert_png(out)


def y_errors(ax) -> list[list[float]]:
    """Half-lengths of the vertical error bars of every error-bar series on ``ax``."""
    out = []
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer) and c.has_yerr:
            out.append([(seg[1][1] - seg[0][1]) / 2 for seg in c.lines[2][0].get_segments()])
    return out


def test_overlay_error_bars_are_the_binomial_standard_error():
    preds, labels = exit_preds(0, N=300)
    a = anytime(preds, labels)
    fig = overlay_figure({"run": (a, None)}, "one run")
    expected = [100 * math.sqrt(p / 100 * (1 - p / 100) / 300) for p in a.sort_values("mmacs")["accuracy"]]
    assert y_errors(fig.axes[0]) == [pytest.approx(expected)]


def test_overlay_draws_every_seed_and_their_mean_with_the_spread():
    (p0, l0), (p1, l1) = exit_preds(0), exit_preds(1)
    a0, a1 = anytime(p0, l0), anytime(p1, l1)
    b0, b1 = budgeted(p0, l0, p0, l0, budgets=[3e6]), budgeted(p1, l1, p1, l1, budgets=[3e6])
    fig = overlay_figure({"t=0.5": [(a0, b0), (a1, b1)]}, "two seeds")
    ax_any, ax_budget = fig.axes[0], fig.axes[1]
    drawn = [list(line.get_ydata()) for line in ax_any.lines]
    for seed in (a0, a1):  # both seeds are drawn: neither overwrote the other
        assert list(seed["accuracy"]) in drawn
    mean = ((a0["accuracy"] + a1["accuracy"]) / 2).tolist()
    assert mean in drawn
    spread = (a0["accuracy"] - a1["accuracy"]).abs() / math.sqrt(2)  # std of two values, ddof=1
    assert y_errors(ax_any) == [pytest.approx(spread.tolist())]
    assert [t.get_text() for t in ax_any.get_legend().get_texts()] == ["t=0.5 (mean ± std of 2 seeds)"]
    assert any(t.get_text() == "t=0.5 (mean ± std of 2 seeds) (budgets)" for t in ax_budget.get_legend().get_texts())
    assert any(isinstance(c, PolyCollection) for c in ax_budget.collections)  # the p-grid's spread as a band
