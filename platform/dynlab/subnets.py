"""Sub-network evaluation extras (networks with selectable sub-networks, e.g. ADN): the accuracy-vs-
cost Pareto front, the best sub-network under each budget, and measured latency per sub-network.

Pure functions over costs/accuracies (or the ``anytime`` frame of ``dynlab.evaluation``, columns
``name, cost, accuracy``); latency takes a callable that runs one sub-network, so it knows no model.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import pandas as pd


def pareto_front(costs: Sequence[float], accuracy: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, by increasing cost: no other point is at most as
    costly and at least as accurate with one of the two strict. Ties (same cost and accuracy)
    keep the first index only."""
    if len(costs) != len(accuracy):
        raise ValueError(f"pareto_front: {len(costs)} costs for {len(accuracy)} accuracies")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracy[i], i))
    front, best = [], float("-inf")
    for i in order:  # cheapest first: a point is on the front iff it beats every cheaper one
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def best_under_budgets(costs: Sequence[float], accuracy: Sequence[float], budgets: Sequence[float]) -> list[int | None]:
    """For each budget, the index of the most accurate point whose cost is <= budget (the cheaper
    one on ties), or None when nothing fits."""
    out: list[int | None] = []
    for b in budgets:
        fits = [i for i in range(len(costs)) if costs[i] <= b]
        out.append(min(fits, key=lambda i: (-accuracy[i], costs[i], i)) if fits else None)
    return out


def front_frame(anytime: pd.DataFrame) -> pd.DataFrame:
    """The rows of an anytime frame on the Pareto front, by increasing cost."""
    idx = pareto_front(list(anytime["cost"]), list(anytime["accuracy"]))
    return anytime.iloc[idx].reset_index(drop=True)


def budget_frame(anytime: pd.DataFrame, budgets: Sequence[float]) -> pd.DataFrame:
    """One row per budget (same unit as ``anytime.cost``): the chosen sub-network's name, cost and
    accuracy; name empty and accuracy NaN where no sub-network fits."""
    picks = best_under_budgets(list(anytime["cost"]), list(anytime["accuracy"]), budgets)
    rows = []
    for b, i in zip(budgets, picks):
        row = anytime.iloc[i] if i is not None else None
        rows.append({
            "budget": float(b),
            "name": "" if row is None else str(row["name"]),
            "cost": float("nan") if row is None else float(row["cost"]),
            "accuracy": float("nan") if row is None else float(row["accuracy"]),
        })
    return pd.DataFrame(rows, columns=["budget", "name", "cost", "accuracy"])


def latency(run: Callable[[str], object], names: Sequence[str], repeats: int = 5, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> pd.DataFrame:
    """Median wall time of ``run(name)`` per sub-network over ``repeats`` timed calls, after
    ``warmup`` untimed ones. Sub-networks are interleaved round by round, so a slow spell of the
    machine spreads over all of them instead of falling on one. Columns: name, latency_s, min_s."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency: repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for n in names:
            run(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t0 = clock()
            run(n)
            times[n].append(clock() - t0)
    return pd.DataFrame({"name": list(names), "latency_s": [statistics.median(times[n]) for n in names], "min_s": [min(times[n]) for n in names]})
