"""Evaluation extras for gated networks (GatedPredictions): how often each sub-block runs (per
block, per sub-block, per category) and how executed cost is distributed over samples; tables,
text and figures. Pure functions of gate states, labels and costs (no model, no method).

Gate states are a [samples, blocks * subblocks] 0/1 matrix in block-major order (sub-block i of
block b is column ``b * subblocks + i``), as DMNN's ``gate_states`` returns them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["execution_rates", "rates_by_category", "category_spread", "rates_by_class", "cost_distribution", "format_rates", "plot_cost_distribution", "plot_rates", "write_report"]


def _gates(gates, subblocks: int) -> np.ndarray:
    g = gates.detach().cpu().double().numpy() if torch.is_tensor(gates) else np.asarray(gates, dtype=float)
    if g.ndim != 2 or g.shape[1] % subblocks:
        raise ValueError(f"gates must be [samples, blocks * {subblocks}], got {g.shape}")
    if not np.isin(g, (0.0, 1.0)).all():
        raise ValueError("gates must be 0 or 1")
    return g


def execution_rates(gates, subblocks: int) -> pd.DataFrame:
    """One row per sub-block: ``block, sub, rate`` (fraction of samples it ran on), plus one row
    per block with ``sub = -1`` holding the block's rate (mean over its sub-blocks)."""
    g = _gates(gates, subblocks)
    blocks = g.shape[1] // subblocks
    per_sub = g.mean(0).reshape(blocks, subblocks)
    rows = [{"block": b, "sub": i, "rate": float(per_sub[b, i])} for b in range(blocks) for i in range(subblocks)]
    rows += [{"block": b, "sub": -1, "rate": float(per_sub[b].mean())} for b in range(blocks)]
    return pd.DataFrame(rows).sort_values(["block", "sub"], kind="stable").reset_index(drop=True)


def rates_by_category(gates, subblocks: int, labels, class_categories: Sequence[int] | None = None, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Execution rate of every sub-block within each category: rows ``category, name, n, block,
    sub, rate``. ``class_categories`` maps labels to categories 0..K-1, and every one of the K
    categories has its rows (``n = 0`` and rate NaN for one without samples); None: the labels
    themselves, the ones present."""
    g = _gates(gates, subblocks)
    y = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if len(y) != len(g):
        raise ValueError(f"{len(y)} labels for {len(g)} gate rows")
    cats = np.asarray(class_categories)[y] if class_categories is not None else y
    every = np.arange(int(max(class_categories)) + 1) if class_categories is not None else np.unique(cats)
    if names is not None and len(every) and len(names) <= int(every.max()):
        raise ValueError(f"{len(names)} names for categories 0..{int(every.max())}")
    blocks = g.shape[1] // subblocks
    rows = []
    for c in every:
        sel = g[cats == c]
        rate = sel.mean(0).reshape(blocks, subblocks) if len(sel) else np.full((blocks, subblocks), np.nan)
        name = names[int(c)] if names is not None else str(int(c))
        rows += [{"category": int(c), "name": name, "n": len(sel), "block": b, "sub": i, "rate": float(rate[b, i])} for b in range(blocks) for i in range(subblocks)]
    return pd.DataFrame(rows)


def category_spread(by_category: pd.DataFrame) -> float:
    """The widest difference of one sub-block's execution rate across categories (over every
    sub-block; categories without samples left out), from a :func:`rates_by_category` table:
    0 for a static network (every gate the same for every category), up to 1."""
    present = by_category[by_category["n"] > 0]
    if present.empty:
        return 0.0
    per_gate = present.groupby(["block", "sub"])["rate"].agg(lambda r: r.max() - r.min())
    return float(per_gate.max())


def rates_by_class(gates, subblocks: int, labels, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Execution rate of every sub-block within each class: rows ``class, name, n, block, sub, rate``."""
    return rates_by_category(gates, subblocks, labels, None, names).rename(columns={"category": "class"})


def cost_distribution(costs, bins: int = 20, full: float | None = None) -> pd.DataFrame:
    """Histogram of executed cost per sample: ``lo, hi`` (MACs), ``count``, ``fraction``, and
    ``rate_lo, rate_hi`` (relative to ``full``, e.g. the dense network's MACs) when given."""
    c = costs.detach().cpu().double().numpy() if torch.is_tensor(costs) else np.asarray(costs, dtype=float)
    lo, hi = float(c.min()), float(c.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts, _ = np.histogram(c, edges)
    df = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts.astype(np.int64), "fraction": counts / max(len(c), 1)})
    if full:
        df["rate_lo"], df["rate_hi"] = df["lo"] / full, df["hi"] / full
    return df


def format_rates(rates: pd.DataFrame) -> str:
    """The per-block table of :func:`execution_rates` as text: one line per block, its rate and
    the rate of each sub-block."""
    lines = ["block  rate   sub-blocks"]
    for b, grp in rates.groupby("block", sort=True):
        block_rate = float(grp.loc[grp["sub"] == -1, "rate"].iloc[0])
        subs = "  ".join(f"{r:.2f}" for r in grp.loc[grp["sub"] >= 0].sort_values("sub")["rate"])
        lines.append(f"{b:>5}  {block_rate:.2f}   {subs}")
    return "\n".join(lines)


def _figure(width: float = 7.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_cost_distribution(costs, path: str | Path, full: float | None = None, title: str = "") -> Path:
    """Histogram of executed MMACs per sample (with the dense cost as a line when given)."""
    c = (costs.detach().cpu().double().numpy() if torch.is_tensor(costs) else np.asarray(costs, dtype=float)) / 1e6
    fig, ax = _figure()
    ax.hist(c, bins=20, color="tab:blue", alpha=0.8)
    if full:
        ax.axvline(full / 1e6, color="k", linestyle="--", label="dense network")
        ax.legend()
    ax.set_xlabel("executed MMACs per sample")
    ax.set_ylabel("samples")
    ax.set_title(title or f"executed cost (mean {c.mean():.3f} MMACs)")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_rates(by_category: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Heat map of execution rates: one row per category (or per class, for a :func:`rates_by_class`
    table), one column per sub-block (b.i)."""
    table = by_category.assign(col=by_category["block"].astype(str) + "." + by_category["sub"].astype(str))
    cols = list(dict.fromkeys(table.sort_values(["block", "sub"])["col"]))
    grid = table.pivot_table(index="name", columns="col", values="rate", sort=False)[cols]
    fig, ax = _figure(max(6.0, 0.35 * len(cols) + 2))
    fig.set_figheight(max(4.5, 0.22 * len(grid.index) + 1.5))  # one readable row per category / class
    im = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(grid.index)), list(grid.index), fontsize=7 if len(grid.index) > 20 else None)
    ax.set_xlabel("block.sub-block")
    ax.set_title(title or f"execution rate per {'class' if 'class' in by_category else 'category'}")
    fig.colorbar(im, ax=ax, label="execution rate")
    fig.savefig(path, dpi=120)
    return Path(path)


def write_report(out_dir: str | Path, gates, subblocks: int, labels, costs, full: float | None = None, class_categories: Sequence[int] | None = None, names: Sequence[str] | None = None) -> list[Path]:
    """Every gated-evaluation artefact into ``out_dir``: ``execution_rates.{csv,txt}``,
    ``cost_distribution.{csv,png}``, the per-class table ``rates_by_class.csv`` and, with a class ->
    category mapping (``class_categories``, category ``names``), ``rates_by_category.{csv,png}``
    (one row group per category); without one, ``rates_by_class.png`` is the heat map instead.
    Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rates = execution_rates(gates, subblocks)
    by_class = rates_by_class(gates, subblocks, labels)
    dist = cost_distribution(costs, full=full)
    rates.to_csv(out / "execution_rates.csv", index=False)
    (out / "execution_rates.txt").write_text(format_rates(rates) + "\n")
    by_class.to_csv(out / "rates_by_class.csv", index=False)
    dist.to_csv(out / "cost_distribution.csv", index=False)
    paths = [out / "execution_rates.csv", out / "execution_rates.txt", out / "rates_by_class.csv", out / "cost_distribution.csv"]
    if class_categories is not None:
        by_cat = rates_by_category(gates, subblocks, labels, class_categories, names)
        by_cat.to_csv(out / "rates_by_category.csv", index=False)
        paths += [out / "rates_by_category.csv", plot_rates(by_cat, out / "rates_by_category.png")]
    else:
        paths.append(plot_rates(by_class, out / "rates_by_class.png"))
    return [*paths, plot_cost_distribution(costs, out / "cost_distribution.png", full=full)]
