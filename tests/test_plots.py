"""Figures are written as real, non-empty PNG files."""

from __future__ import annotations

import torch

from dynlab.evaluation import anytime, budgeted
from dynlab.plots import plot_evaluation, plot_overlay
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
