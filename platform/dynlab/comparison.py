"""Comparison tables that say how much of a difference is noise.

A test accuracy measured on n images carries a binomial standard error,
``SE = 100 * sqrt(p (1 - p) / n)`` in accuracy-%: on 500 images, 99.6 % and 99.0 % differ by 3
images, well within noise. Every accuracy of a comparison therefore travels with its SE (a ``_se``
column beside each ``acc_*`` / ``acc@*`` column), and :func:`format_table` marks the entries that
are within noise of the best of their column.

With several seeds per label (``sweep.repeats`` > 1), :func:`summarize` gives one row per label: the
mean over seeds, the standard deviation (``_std``) and the noise used by the rule (``_se``): the
standard error of the mean, std / sqrt(seeds), but never less than the binomial SE of the mean
accuracy, since every seed is scored on the same test images and averaging seeds does not average
that sampling error away.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["NOISE_RULE", "binomial_se", "trial_columns", "accuracy_columns", "summarize", "within_noise", "mean_curve", "format_table"]

NOISE_FACTOR = 2.0  # a difference smaller than this many standard errors of the difference is noise
NOISE_RULE = f"* = within noise of the best in its column (difference < {NOISE_FACTOR:g} standard errors)"


def binomial_se(accuracy, n):
    """Standard error (accuracy-%) of an accuracy (%) measured on ``n`` samples; NaN where n is
    missing or not positive. Scalars or arrays (element-wise)."""
    p = np.clip(np.asarray(accuracy, dtype=float) / 100.0, 0.0, 1.0)
    n = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(n > 0, 100.0 * np.sqrt(p * (1.0 - p) / n), np.nan)
    return float(se) if se.ndim == 0 else se


def _budget_column(requested_budget: float) -> str:
    return f"acc@{requested_budget / 1e6:.2f}MMACs"


def trial_columns(anytime: pd.DataFrame, budgeted: pd.DataFrame | None) -> dict[str, float]:
    """One trial's comparison columns: test accuracy per exit / sub-network and per requested
    budget, each with its binomial SE (``_se``), the exits' MMACs and ``n_test``."""
    n = int(anytime["n_samples"].iloc[0]) if "n_samples" in anytime and len(anytime) else math.nan
    row: dict[str, float] = {"n_test": n}
    for _, a in anytime.iterrows():
        row[f"acc_{a['name']}"] = float(a["accuracy"])
        row[f"acc_{a['name']}_se"] = binomial_se(a["accuracy"], n)
        row[f"mmacs_{a['name']}"] = float(a["mmacs"])
        if "category_spread" in a and pd.notna(a["category_spread"]):  # gated networks
            row[f"spread_{a['name']}"] = float(a["category_spread"])
    if budgeted is not None:
        for _, b in budgeted[budgeted["mode"] == "budget"].iterrows():
            col = _budget_column(b["requested_budget"])
            row[col] = float(b["test_accuracy"])
            row[f"{col}_se"] = binomial_se(b["test_accuracy"], b.get("n_test", n))
    return row


def accuracy_columns(table: pd.DataFrame) -> list[str]:
    """The accuracy columns of a comparison table, in order (not their ``_se`` / ``_std``)."""
    return [c for c in table.columns if (c.startswith("acc_") or c.startswith("acc@")) and not c.endswith(("_se", "_std"))]


def _ok(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"] == "ok"] if "status" in table else table


def _seed_stats(values: pd.Series, single_se: float, n_test: float) -> tuple[float, float, float]:
    """(mean, std over seeds, noise for the rule) of one accuracy over a label's seeds."""
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) == 1:
        return mean, math.nan, single_se if np.isfinite(single_se) else binomial_se(mean, n_test)
    std = float(values.std(ddof=1))
    # the seeds share one test set: averaging them does not shrink its sampling error
    return mean, std, float(np.fmax(std / math.sqrt(len(values)), binomial_se(mean, n_test)))


def _label_row(label: str, trials: pd.DataFrame, acc_cols: list[str], mmacs_cols: list[str]) -> dict:
    n_test = float(trials["n_test"].max()) if "n_test" in trials and len(trials) else math.nan
    ids = trials["trial"] if "trial" in trials else pd.Series(dtype=str)
    row: dict = {"label": label, "n_seeds": len(trials), "trials": ",".join(map(str, ids)), "n_test": n_test}
    for c in acc_cols:
        values = trials[c].dropna() if c in trials else pd.Series(dtype=float)
        single_se = float(trials[f"{c}_se"].dropna().iloc[0]) if f"{c}_se" in trials and trials[f"{c}_se"].notna().any() else math.nan
        row[c], row[f"{c}_std"], row[f"{c}_se"] = _seed_stats(values, single_se, n_test)
    for c in mmacs_cols:  # also the gates' category spread (spread_*), a mean over seeds
        row[c] = float(trials[c].mean()) if len(trials) else math.nan
        if c.startswith("spread_"):
            row[f"{c}_min"] = float(trials[c].min()) if len(trials) else math.nan
    return row


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per label over its successful trials (seeds): ``label, n_seeds, trials, n_test``,
    per accuracy column the mean, ``_std`` (over seeds; NaN for one seed) and ``_se`` (the noise
    for the rule; see the module doc), per ``mmacs_*`` and ``spread_*`` column the mean (``spread_*_min``: the lowest seed). Labels keep their order;
    a label whose trials all failed has n_seeds 0 and NaN accuracies."""
    label_col = "label" if "label" in table else "trial"
    acc_cols = accuracy_columns(table)
    mmacs_cols = [c for c in table.columns if c.startswith(("mmacs_", "spread_"))]
    ok = _ok(table)
    rows = [_label_row(str(label), ok[ok[label_col] == label], acc_cols, mmacs_cols) for label in pd.unique(table[label_col])]
    return pd.DataFrame(rows)


def within_noise(acc: pd.Series, se: pd.Series) -> pd.Series:
    """True for the entries (other than the best) whose shortfall from the column's best is less
    than NOISE_FACTOR standard errors of the difference, sqrt(se^2 + se_best^2)."""
    acc, se = acc.astype(float), se.astype(float)
    out = pd.Series(False, index=acc.index)
    if acc.notna().sum() < 2:
        return out
    best = acc.idxmax()
    gap = acc[best] - acc
    noise = NOISE_FACTOR * np.sqrt(se**2 + se[best] ** 2)
    out[(gap < noise) & acc.notna() & (acc.index != best)] = True
    return out


def mean_curve(frames: list[pd.DataFrame], keys: list[str], values: list[str]) -> pd.DataFrame:
    """Curves of several seeds averaged point by point: rows matched by ``keys`` (plus their
    position within each key group when ``keys`` is empty), ``values`` averaged, with
    ``<value>_std`` over seeds; other columns are taken from the first seed."""
    tagged = []
    for f in frames:
        f = f.reset_index(drop=True).copy()
        f["_point"] = f.groupby(keys, sort=False).cumcount() if keys else np.arange(len(f))
        tagged.append(f)
    both = pd.concat(tagged, ignore_index=True)
    by = [*keys, "_point"]
    grouped = both.groupby(by, sort=False)
    out = grouped.first()
    for v in values:
        out[v] = grouped[v].mean()
        out[f"{v}_std"] = grouped[v].std(ddof=1)
    return out.reset_index().drop(columns="_point")


def _cell(acc: float, err: float, marked: bool) -> str:
    if not np.isfinite(acc):
        return "-"
    text = f"{acc:.2f}" if not np.isfinite(err) else f"{acc:.2f} ± {err:.2f}"
    return text + ("*" if marked else " ")  # unmarked cells padded so that the numbers line up


def _header(col: str) -> str:
    return col[len("acc_"):] if col.startswith("acc_") else col[len("acc"):]


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def _column_cells(summary: pd.DataFrame, col: str) -> list[str]:
    """One accuracy column as text: shown error = binomial SE for one seed, std for several."""
    marks = within_noise(summary[col], summary[f"{col}_se"])
    shown = summary[f"{col}_std"].where(summary["n_seeds"] > 1, summary[f"{col}_se"])
    return [_cell(a, e, m) for a, e, m in zip(summary[col], shown, marks)]


def format_table(table: pd.DataFrame) -> str:
    """The printed comparison of a per-trial table (as ``pipeline.run`` returns it): one row per
    label (its seeds aggregated by :func:`summarize`), one column per exit / budget with
    ``accuracy ± error`` (binomial SE for one seed, std over seeds for several), ``*`` on the
    entries within noise of the column's best, and two footer lines that say so."""
    summary = summarize(table)
    headers, columns = [], []
    for c in accuracy_columns(summary):
        headers.append(_header(c))
        columns.append(_column_cells(summary, c))
        cost = summary.get(f"mmacs_{c[len('acc_'):]}") if c.startswith("acc_") else None
        if cost is not None and cost.nunique(dropna=True) > 1:  # the cost differs between rows (gated networks): show it
            headers.append(f"{_header(c)} MMACs")
            columns.append([f"{v:.2f}" if np.isfinite(v) else "-" for v in cost])
    body = [[str(label), str(int(k)), *cells] for label, k, *cells in zip(summary["label"], summary["n_seeds"], *columns)]
    lines = _align([["label", "seeds", *headers], *body])
    n = summary["n_test"].dropna()
    size = f"{int(n.max())} test images" if len(n) else "an unknown number of test images"
    lines.append(f"test accuracy % on {size}: ± binomial standard error (1 seed), ± std over seeds (several seeds)")
    several = bool((summary["n_seeds"] > 1).any())
    lines.append(NOISE_RULE + ("; for several seeds, the standard error of their mean" if several else ""))
    notes = table[table["note"].fillna("") != ""] if "note" in table else table.iloc[0:0]
    lines += [f"note: {r['trial']}: {r['note']}" for _, r in notes.iterrows()]  # e.g. trials ASHA stopped early
    return "\n".join(lines)
