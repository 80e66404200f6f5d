"""Evaluation engine: anytime tables, budgeted-batch thresholds, prediction tables.

Everything dispatches on the prediction type of :mod:`dynlab.predictions`, never on the method.
All per-sample work is vectorised in torch; Python loops run only over exits, budgets or rows.

Budgeted batch (REFERENCE.md section 2) in four steps:

1. :func:`confidence` - max softmax probability and argmax per exit.
2. :func:`geometric_distribution` - exit distribution P_k proportional to q^(k+1).
3. :func:`calibrate` / :func:`calibrate_many` - thresholds on the held-out split, the reference rule.
4. :func:`exit_indices` / :func:`budget_point` - apply the thresholds to any split.

:func:`solve_q` turns a requested average cost into q (BoostNet Eq. 9), :func:`budgeted` runs the
whole protocol (requested budgets and/or the reference p-grid) and returns one row per point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dynlab.errors import ConfigError
from dynlab.predictions import ExitPredictions, GatedPredictions, Predictions, SubnetPredictions

__all__ = [
    "confidence",
    "anytime",
    "geometric_distribution",
    "geometric_expected_cost",
    "calibrate",
    "calibrate_many",
    "DECISION_DTYPE",
    "exits_here",
    "exit_indices",
    "budget_point",
    "solve_q",
    "budgeted",
    "reference_q_grid",
    "predictions_frame",
    "frame_to_predictions",
]

# Bracket for log q in the bisections: q in [e^-30, e^30] covers every useful distribution.
_LOG_Q_RANGE = (-30.0, 30.0)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_labels(labels, n: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    labels = labels.reshape(-1).to(device=device, dtype=torch.long)
    if labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries for {n} predicted samples")
    return labels


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    # Half precision softmax is too coarse for thresholds; float64 stays float64.
    return logits if logits.dtype == torch.float64 else logits.float()


# Exit decisions (confidence >= threshold) are made in float64, in the simulated exits
# (exit_indices) and in the real engine (dynlab.early_exit) alike: every float32 or bfloat16
# confidence and every Python-float threshold is exact in float64, so no threshold is rounded to
# the confidences' precision and both paths decide every sample the same way.
DECISION_DTYPE = torch.float64


def _as_thresholds(thresholds, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(thresholds, dtype=DECISION_DTYPE, device=device)


def exits_here(conf: torch.Tensor, threshold) -> torch.Tensor:
    """``conf >= threshold`` compared in :data:`DECISION_DTYPE`: the one exit rule of both paths."""
    return conf.to(DECISION_DTYPE) >= _as_thresholds(threshold, conf.device)


def _type_name(preds) -> str:
    return type(preds).__name__


# --------------------------------------------------------------------------------------------
# confidence and anytime
# --------------------------------------------------------------------------------------------


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and argmax over the last (class) axis.

    ``logits`` [E, N, C] (any leading shape) -> ``(conf [E, N], pred [E, N])``.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"confidence needs logits with a non-empty class axis, got {tuple(logits.shape)}")
    probs = torch.softmax(_float_logits(logits), dim=-1)
    conf, pred = probs.max(dim=-1)
    return conf, pred


def _stacked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy (%) of every output of [S, N, C] logits -> [S] float64."""
    pred = logits.argmax(dim=-1)
    return (pred == labels.unsqueeze(0)).double().mean(dim=-1) * 100.0


def _pareto_mask(costs: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """True where no other point has cost <= and accuracy >= with at least one strict."""
    c_le = costs.unsqueeze(0) <= costs.unsqueeze(1)  # [i, j]: cost_j <= cost_i
    a_ge = acc.unsqueeze(0) >= acc.unsqueeze(1)
    strict = (costs.unsqueeze(0) < costs.unsqueeze(1)) | (acc.unsqueeze(0) > acc.unsqueeze(1))
    dominated = (c_le & a_ge & strict).any(dim=1)
    return ~dominated


def anytime(preds: Predictions, labels) -> pd.DataFrame:
    """Accuracy and cost of every exit / sub-network (or of the gated network as a whole).

    Columns: ``index, name, cost`` (MACs), ``mmacs``, ``accuracy`` (%), ``n_samples`` (how many
    samples the accuracy is measured on: its binomial standard error depends on it).
    SubnetPredictions add ``pareto`` (on the accuracy-vs-cost front). GatedPredictions give one row
    whose cost is the mean executed cost, plus ``cost_min, cost_p50, cost_max`` (MACs).
    """
    if isinstance(preds, (ExitPredictions, SubnetPredictions)):
        logits = preds.logits
        labels_t = _as_labels(labels, logits.shape[1], logits.device)
        acc = _stacked_accuracy(logits, labels_t).cpu()
        costs = preds.costs.detach().cpu().double()
        if isinstance(preds, ExitPredictions):
            names = [f"exit{k}" for k in range(preds.num_outputs)]
        else:
            names = list(preds.names)
        frame = pd.DataFrame(
            {
                "index": np.arange(preds.num_outputs, dtype=np.int64),
                "name": names,
                "cost": costs.numpy(),
                "mmacs": costs.numpy() / 1e6,
                "accuracy": acc.numpy(),
                "n_samples": np.full(preds.num_outputs, logits.shape[1], dtype=np.int64),
            }
        )
        if isinstance(preds, SubnetPredictions):
            frame["pareto"] = _pareto_mask(costs, acc).numpy()
        return frame
    if isinstance(preds, GatedPredictions):
        logits = preds.logits
        labels_t = _as_labels(labels, logits.shape[0], logits.device)
        acc = float((logits.argmax(dim=-1) == labels_t).double().mean() * 100.0)
        costs = preds.costs.detach().cpu().double()
        qs = torch.quantile(costs, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
        mean_cost = float(costs.mean())
        return pd.DataFrame(
            {
                "index": [0],
                "name": ["gated"],
                "cost": [mean_cost],
                "mmacs": [mean_cost / 1e6],
                "accuracy": [acc],
                "n_samples": [int(logits.shape[0])],
                "cost_min": [float(qs[0])],
                "cost_p50": [float(qs[1])],
                "cost_max": [float(qs[2])],
            }
        )
    raise TypeError(f"anytime: unsupported prediction type {_type_name(preds)}; expected ExitPredictions, SubnetPredictions or GatedPredictions")


# --------------------------------------------------------------------------------------------
# budgeted batch: distributions, thresholds, operating points
# --------------------------------------------------------------------------------------------


def geometric_distribution(q, num_exits: int) -> torch.Tensor:
    """Exit distribution P_k proportional to q^(k+1), k = 0..E-1, in float64.

    ``q`` a float or 0-d tensor -> [E]; a 1-d tensor/sequence of Q values -> [Q, E].
    Computed in log space (softmax of (k+1) log q), so very small or large q are stable.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    q_t = torch.as_tensor(q, dtype=torch.float64)
    if q_t.dim() > 1:
        raise ValueError(f"q must be a scalar or a 1-d tensor, got shape {tuple(q_t.shape)}")
    if not bool((q_t > 0).all()) or not bool(torch.isfinite(q_t).all()):
        raise ValueError(f"q must be finite and > 0, got {q_t.tolist()}")
    k1 = torch.arange(1, num_exits + 1, dtype=torch.float64, device=q_t.device)
    log_p = torch.log(q_t).unsqueeze(-1) * k1
    return torch.softmax(log_p, dim=-1)


def geometric_expected_cost(q, costs: torch.Tensor) -> torch.Tensor:
    """Analytic expected cost sum_k P_k cost_k of the geometric distribution (increasing in q)."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    return geometric_distribution(q, costs.numel()) @ costs.cpu()


def sorted_confidence(conf_heldout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-exit descending sort of the held-out confidence: ``(values, order)``, each [E, N].
    Computed once, it can be passed to many :func:`calibrate_many` calls on the same confidence."""
    return torch.sort(conf_heldout, dim=1, descending=True, stable=True)


def calibrate_many(conf_heldout: torch.Tensor, P: torch.Tensor, *, presorted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Thresholds for Q exit distributions at once: ``conf [E, N]``, ``P [Q, E]`` -> ``[Q, E]``.
    ``presorted``: :func:`sorted_confidence` of ``conf_heldout``, when a caller calibrates the same
    confidence many times (solving for budgets).

    The reference rule (REFERENCE.md section 2, step 3): for exits 0..E-2 in order,
    n_k = floor(N * P_k); among the samples not yet exited, sorted by confidence at exit k
    (descending), the n_k-th one's confidence is T_k, and every remaining sample with confidence
    >= T_k exits at k (ties can make that more than n_k). n_k = 0, or fewer than n_k samples left,
    gives T_k = +inf (nobody exits). The last threshold is -inf (everything left exits).

    Vectorised over samples and distributions: one sort per exit, then a cumulative count of the
    samples still alive in sorted order finds the n_k-th of them for every distribution.
    """
    if conf_heldout.dim() != 2:
        raise ValueError(f"conf_heldout must be [exits, samples], got {tuple(conf_heldout.shape)}")
    E, N = conf_heldout.shape
    if N == 0:
        raise ValueError("conf_heldout has no samples")
    P = torch.as_tensor(P, dtype=torch.float64).to(conf_heldout.device)
    if P.dim() != 2 or P.shape[1] != E:
        raise ValueError(f"P must be [distributions, exits={E}], got {tuple(P.shape)}")
    Q = P.shape[0]
    sorted_conf, order = sorted_confidence(conf_heldout) if presorted is None else presorted
    # floor(N * P_k) in float64: the same numbers as Python's math.floor(N * float(P_k))
    n_out = torch.floor(N * P).to(torch.long)  # [Q, E]
    thresholds = torch.full((Q, E), math.inf, dtype=conf_heldout.dtype, device=conf_heldout.device)
    thresholds[:, E - 1] = -math.inf
    alive = torch.ones((Q, N), dtype=torch.bool, device=conf_heldout.device)
    for k in range(E - 1):
        alive_count = torch.cumsum(alive[:, order[k]], dim=1)  # [Q, N], non-decreasing per row
        n_k = n_out[:, k].contiguous()
        # position of the n_k-th alive sample in sorted order = first index with count >= n_k
        pos = torch.searchsorted(alive_count, n_k.unsqueeze(1)).squeeze(1).clamp(max=N - 1)
        valid = (n_k >= 1) & (n_k <= alive_count[:, -1])
        t_k = torch.where(valid, sorted_conf[k][pos], math.inf)
        thresholds[:, k] = t_k
        alive &= conf_heldout[k].unsqueeze(0) < t_k.unsqueeze(1)
    return thresholds


def calibrate(conf_heldout: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Thresholds [E] for one exit distribution ``P [E]`` (see :func:`calibrate_many`)."""
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.dim() != 1:
        raise ValueError(f"P must be [exits], got {tuple(P.shape)}; use calibrate_many for several")
    return calibrate_many(conf_heldout, P.unsqueeze(0))[0]


def exit_indices(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """First exit k with ``conf[k] >= thresholds[k]`` (the last exit always accepts).

    ``conf [E, N]``, ``thresholds [E]`` -> ``[N]``; ``thresholds [Q, E]`` -> ``[Q, N]``.
    """
    if conf.dim() != 2:
        raise ValueError(f"conf must be [exits, samples], got {tuple(conf.shape)}")
    E = conf.shape[0]
    thresholds = _as_thresholds(thresholds, conf.device)
    if thresholds.dim() < 1 or thresholds.shape[-1] != E:
        raise ValueError(f"thresholds must end in exits={E}, got {tuple(thresholds.shape)}")
    # walk the exits backwards: the last accepting exit written is the first one
    idx = torch.full(thresholds.shape[:-1] + (conf.shape[1],), E - 1, dtype=torch.long, device=conf.device)
    for k in range(E - 2, -1, -1):
        idx = torch.where(exits_here(conf[k], thresholds[..., k : k + 1]), k, idx)
    return idx


def _exit_fractions(idx: torch.Tensor, num_exits: int) -> torch.Tensor:
    """Fraction of samples at each exit: idx [..., N] -> [..., E] float64."""
    counts = torch.zeros(idx.shape[:-1] + (num_exits,), dtype=torch.float64, device=idx.device)
    counts.scatter_add_(-1, idx, torch.ones(idx.shape, dtype=torch.float64, device=idx.device))
    return counts / idx.shape[-1]


def budget_point(conf: torch.Tensor, pred: torch.Tensor, labels, costs: torch.Tensor, thresholds: torch.Tensor):
    """Accuracy (%), expected cost and exit fractions [E] of one set of thresholds.

    ``thresholds [E]`` -> ``(float, float, tensor [E])``; ``thresholds [Q, E]`` ->
    ``(tensor [Q], tensor [Q], tensor [Q, E])``. Expected cost = sum_k fraction_k * cost_k.
    """
    E, N = conf.shape
    labels_t = _as_labels(labels, N, conf.device)
    costs = torch.as_tensor(costs, dtype=torch.float64, device=conf.device)
    if costs.shape != (E,):
        raise ValueError(f"costs must be [exits={E}], got {tuple(costs.shape)}")
    thresholds = _as_thresholds(thresholds, conf.device)
    idx = exit_indices(conf, thresholds)  # [..., N]
    chosen = pred[idx, torch.arange(N, device=conf.device)]  # [..., N]
    acc = (chosen == labels_t).double().mean(dim=-1) * 100.0
    fractions = _exit_fractions(idx, E)  # [..., E]
    cost = fractions @ costs
    if thresholds.dim() == 1:
        return float(acc), float(cost), fractions.cpu()
    return acc.cpu(), cost.cpu(), fractions.cpu()


def _check_budgets(budgets: torch.Tensor, costs: torch.Tensor) -> None:
    lo, hi = float(costs[0]), float(costs[-1])
    for b in budgets.tolist():
        if not (lo <= b <= hi):
            raise ConfigError("budgets", b, f"an average cost within [{lo:g}, {hi:g}] MACs (cost of the first to the last exit)")


def solve_q(conf_heldout: torch.Tensor, costs: torch.Tensor, budget, *, refine: bool = True, iterations: int = 40):
    """Find q > 0 whose calibrated held-out expected cost equals ``budget``, and its thresholds.

    First BoostNet's Eq. 9 idea: the analytic expected cost sum_k P_k(q) cost_k is increasing in
    q, so bisection on log q solves it (vectorised over budgets). The calibrated cost on held-out
    differs slightly (floor(N P_k), ties), so with ``refine`` a second bisection on log q runs on
    the calibrated held-out cost itself (all budgets at once via :func:`calibrate_many`), and the
    q whose calibrated cost is nearest the budget is kept (the analytic q included).

    ``budget`` a float -> ``(q float, thresholds [E])``; a sequence/1-d tensor of Q budgets ->
    ``(q [Q], thresholds [Q, E])``. Budgets outside [cost_0, cost_{E-1}] raise ConfigError
    (a ValueError) naming ``budgets``.
    """
    E, N = conf_heldout.shape
    costs = torch.as_tensor(costs, dtype=torch.float64).detach().cpu().reshape(-1)
    if costs.numel() != E:
        raise ValueError(f"costs has {costs.numel()} entries for {E} exits")
    scalar = not isinstance(budget, (Sequence, torch.Tensor, np.ndarray)) or (
        isinstance(budget, (torch.Tensor, np.ndarray)) and np.ndim(budget) == 0
    )
    b = torch.as_tensor(budget, dtype=torch.float64).reshape(-1).cpu()
    if b.numel() == 0:
        raise ConfigError("budgets", list(b.tolist()), "at least one budget")
    _check_budgets(b, costs)

    # 1) analytic bisection on log q (vectorised over budgets)
    lo = torch.full_like(b, _LOG_Q_RANGE[0])
    hi = torch.full_like(b, _LOG_Q_RANGE[1])
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        below = geometric_expected_cost(torch.exp(mid), costs) < b
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    log_q = 0.5 * (lo + hi)

    sorted_conf = sorted_confidence(conf_heldout)

    def calibrated_cost(lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = calibrate_many(conf_heldout, geometric_distribution(torch.exp(lq), E), presorted=sorted_conf)
        frac = _exit_fractions(exit_indices(conf_heldout, T), E).cpu()
        return frac @ costs, T

    best_cost, best_T = calibrated_cost(log_q)
    if refine:
        # 2) bisection on the calibrated held-out cost; keep the nearest of all points visited
        lo = torch.full_like(b, _LOG_Q_RANGE[0])
        hi = torch.full_like(b, _LOG_Q_RANGE[1])
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            cost_mid, T_mid = calibrated_cost(mid)
            better = (cost_mid - b).abs() < (best_cost - b).abs()
            log_q = torch.where(better, mid, log_q)
            best_cost = torch.where(better, cost_mid, best_cost)
            best_T = torch.where(better.to(best_T.device).unsqueeze(1), T_mid, best_T)
            below = cost_mid < b
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
    q = torch.exp(log_q)
    if scalar:
        return float(q[0]), best_T[0]
    return q, best_T


def reference_q_grid() -> torch.Tensor:
    """The references' grid: p = 1..39, q = p / 20 (float64)."""
    return torch.arange(1, 40, dtype=torch.float64) / 20.0


def _flatten_curve(frame: pd.DataFrame) -> None:
    """BoostNet's flat curve, in place, per mode: rows in order of held-out cost; where held-out
    accuracy does not strictly improve on the best so far, report the test accuracy of that best
    row again (at the new cost). The raw value stays in ``test_accuracy_raw``."""
    frame["test_accuracy_raw"] = frame["test_accuracy"].astype(float)
    flat = frame["test_accuracy"].to_numpy(dtype=float).copy()
    for _, group in frame.groupby("mode", sort=False):
        order = group.sort_values("heldout_cost", kind="stable").index
        best_held, best_test = -math.inf, math.nan
        for i in order:
            held = frame.at[i, "heldout_accuracy"]
            if held > best_held:
                best_held, best_test = held, frame.at[i, "test_accuracy_raw"]
            flat[frame.index.get_loc(i)] = best_test
    frame["test_accuracy"] = flat


def _check_exits(heldout: ExitPredictions, test: ExitPredictions | None = None) -> torch.Tensor:
    """The exits' costs [E] (float64), after checking both splits are early-exit predictions of
    one network."""
    for name, value in (("heldout", heldout), ("test", test)):
        if value is not None and not isinstance(value, ExitPredictions):
            raise TypeError(
                f"budgeted: {name} is {_type_name(value)}; budgeted-batch evaluation needs ExitPredictions "
                "(early exits). Use anytime() for SubnetPredictions and GatedPredictions."
            )
    E = heldout.num_outputs
    costs = heldout.costs.detach().cpu().double()
    if test is not None:
        if test.num_outputs != E:
            raise ValueError(f"budgeted: heldout has {E} exits but test has {test.num_outputs}")
        if not torch.allclose(costs, test.costs.detach().cpu().double()):
            raise ValueError(f"budgeted: heldout costs {costs.tolist()} differ from test costs {test.costs.tolist()}")
    if bool((costs[1:] < costs[:-1]).any()):
        raise ValueError(f"budgeted: exit costs must be non-decreasing, got {costs.tolist()}")
    return costs


def calibrate_budgets(heldout: ExitPredictions, budgets: list[float] | None = None, p_grid: bool = True) -> pd.DataFrame:
    """Thresholds from the held-out split alone, one row per operating point: ``mode`` ("budget"
    for each requested budget, solved by :func:`solve_q`; "pgrid" for the reference grid p = 1..39,
    q = p/20), ``q``, ``requested_budget`` (NaN for the grid), ``thresholds`` (list [E]; +inf: nobody
    exits there, the last is -inf: everyone left exits). What :func:`apply_thresholds` and the real
    early-exit engine consume (saved by :func:`save_thresholds`)."""
    costs = _check_exits(heldout)
    if budgets is None and not p_grid:
        raise ConfigError("budgets", budgets, "a list of budgets, or p_grid=True")
    conf_h, _ = confidence(heldout.logits)
    E = heldout.num_outputs
    rows = []
    blocks = []
    if budgets is not None and len(budgets):
        b = torch.as_tensor(list(budgets), dtype=torch.float64)
        q, T = solve_q(conf_h, costs, b)
        blocks.append(("budget", q, b, T))
    if p_grid:
        q = reference_q_grid()
        blocks.append(("pgrid", q, torch.full_like(q, math.nan), calibrate_many(conf_h, geometric_distribution(q, E))))
    for mode, q, requested, T in blocks:
        T = T.detach().cpu().double()
        rows += [{"mode": mode, "q": float(q[i]), "requested_budget": float(requested[i]), "thresholds": T[i].tolist()} for i in range(q.numel())]
    return pd.DataFrame(rows, columns=["mode", "q", "requested_budget", "thresholds"])


def apply_thresholds(calibration: pd.DataFrame, heldout: ExitPredictions, heldout_labels, test: ExitPredictions, test_labels, flat_curve: bool = False) -> pd.DataFrame:
    """Every operating point of ``calibration`` (:func:`calibrate_budgets`) on both splits: the budgeted
    table of :func:`budgeted`."""
    costs = _check_exits(heldout, test)
    conf_h, pred_h = confidence(heldout.logits)
    conf_t, pred_t = confidence(test.logits)
    labels_h = _as_labels(heldout_labels, conf_h.shape[1], conf_h.device)
    labels_t = _as_labels(test_labels, conf_t.shape[1], conf_t.device)
    rows = []
    if len(calibration):
        T = torch.tensor(np.stack(calibration["thresholds"].map(np.asarray).to_list()), dtype=torch.float64)
        acc_h, cost_h, frac_h = budget_point(conf_h, pred_h, labels_h, costs, T.to(conf_h.device))
        acc_t, cost_t, frac_t = budget_point(conf_t, pred_t, labels_t, costs, T.to(conf_t.device))
        for i, c in enumerate(calibration.itertuples(index=False)):
            rows.append(
                {
                    "mode": c.mode,
                    "q": float(c.q),
                    "requested_budget": float(c.requested_budget),
                    "heldout_accuracy": float(acc_h[i]),
                    "heldout_cost": float(cost_h[i]),
                    "test_accuracy": float(acc_t[i]),
                    "test_cost": float(cost_t[i]),
                    "thresholds": T[i].tolist(),
                    "exit_fraction": frac_t[i].tolist(),
                    "heldout_exit_fraction": frac_h[i].tolist(),
                    "n_heldout": int(labels_h.numel()),
                    "n_test": int(labels_t.numel()),
                }
            )
    frame = pd.DataFrame(rows)
    if flat_curve and len(frame):
        _flatten_curve(frame)
    return frame


def budgeted(
    heldout: ExitPredictions,
    heldout_labels,
    test: ExitPredictions,
    test_labels,
    budgets: list[float] | None = None,
    p_grid: bool = True,
    flat_curve: bool = False,
) -> pd.DataFrame:
    """Budgeted-batch evaluation: thresholds calibrated on held-out (:func:`calibrate_budgets`), applied to
    both splits (:func:`apply_thresholds`).

    One row per operating point: ``mode``, ``q``, ``requested_budget`` (NaN for the grid),
    ``heldout_accuracy``, ``heldout_cost``, ``test_accuracy``, ``test_cost``, ``thresholds`` (list),
    ``exit_fraction`` (test, list), ``heldout_exit_fraction`` (list), ``n_heldout`` and ``n_test``
    (sample counts, for standard errors). ``flat_curve`` applies BoostNet's rule to
    ``test_accuracy`` and keeps the raw value in ``test_accuracy_raw``.
    """
    _check_exits(heldout, test)
    return apply_thresholds(calibrate_budgets(heldout, budgets, p_grid), heldout, heldout_labels, test, test_labels, flat_curve)


def save_thresholds(calibration: pd.DataFrame, path) -> Path:
    """The calibration as JSON, one object per operating point; infinite thresholds as the strings
    "inf" / "-inf" (JSON has no infinity)."""
    rows = [{**r, "requested_budget": None if math.isnan(r["requested_budget"]) else r["requested_budget"], "thresholds": [t if math.isfinite(t) else ("inf" if t > 0 else "-inf") for t in r["thresholds"]]} for r in calibration.to_dict("records")]
    path = Path(path)
    path.write_text(json.dumps(rows, indent=1))
    return path


def load_thresholds(path) -> pd.DataFrame:
    """:func:`save_thresholds` output back as a calibration table (thresholds float64 lists)."""
    rows = json.loads(Path(path).read_text())
    for r in rows:
        r["requested_budget"] = math.nan if r["requested_budget"] is None else float(r["requested_budget"])
        r["thresholds"] = [float(t) for t in r["thresholds"]]
    return pd.DataFrame(rows, columns=["mode", "q", "requested_budget", "thresholds"])


# --------------------------------------------------------------------------------------------
# prediction tables (long format, Parquet friendly)
# --------------------------------------------------------------------------------------------

_KINDS = {ExitPredictions: "exit", SubnetPredictions: "subnet", GatedPredictions: "gated"}


def _list_column(values: np.ndarray) -> pd.Series:
    """[R, C] -> an object column of float32 row arrays; Parquet stores it as list<float32>.

    (An Arrow-backed list column would avoid the row objects, but pandas cannot read its own
    Parquet metadata for that dtype back, so the plain object column is the portable choice.)
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    column = np.empty(values.shape[0], dtype=object)
    column[:] = list(values)  # row views into one buffer
    return pd.Series(column, dtype=object)


def _list_to_matrix(column: pd.Series) -> np.ndarray:
    """A list<float> column (Arrow-backed or object of arrays, as read back) -> [R, C] float32."""
    arr = pa.array(column, type=pa.list_(pa.float32()), from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise ValueError(f"logits rows have different lengths ({lengths.min()}..{lengths.max()})")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), int(lengths[0]))


def predictions_frame(preds: Predictions, labels, split: str, indices=None) -> pd.DataFrame:
    """Long table of predictions: one row per sample per exit / sub-network (gated: per sample).

    Columns: ``split, kind`` ("exit" | "subnet" | "gated"), ``sample`` (``indices`` or 0..N-1),
    ``label``, ``output`` (exit index; sub-network name; 0 for gated), ``pred``, ``confidence``,
    ``cost`` (MACs, float64), ``logits`` (list<float32>). Rows are output-major. Logits are stored
    as float32, so the round trip through :func:`frame_to_predictions` is exact for float32 logits.
    """
    kind = _KINDS.get(type(preds))
    if kind is None:
        raise TypeError(f"predictions_frame: unsupported prediction type {_type_name(preds)}")
    logits = preds.logits.detach().cpu()
    if kind == "gated":
        logits = logits.unsqueeze(0)  # [1, N, C]
        cost = preds.costs.detach().cpu().double().unsqueeze(0)  # [1, N]
        outputs = np.zeros(1, dtype=np.int64)
    else:
        cost = preds.costs.detach().cpu().double().unsqueeze(1).expand(-1, logits.shape[1])
        outputs = np.arange(logits.shape[0], dtype=np.int64) if kind == "exit" else np.asarray(preds.names, dtype=object)
    S, N, C = logits.shape
    labels_t = _as_labels(labels, N, torch.device("cpu"))
    samples = np.arange(N, dtype=np.int64) if indices is None else np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
    if samples.shape[0] != N:
        raise ValueError(f"indices has {samples.shape[0]} entries for {N} predicted samples")
    conf, pred = confidence(logits)
    frame = pd.DataFrame(
        {
            "split": split,
            "kind": kind,
            "sample": np.tile(samples, S),
            "label": np.tile(labels_t.numpy(), S),
            "output": np.repeat(outputs, N),
            "pred": pred.reshape(-1).numpy().astype(np.int64),
            "confidence": conf.reshape(-1).double().numpy(),
            "cost": cost.reshape(-1).numpy(),
            "logits": _list_column(logits.float().reshape(S * N, C).numpy()),
        }
    )
    if kind == "gated" and preds.gates is not None:  # gate states, for the execution-rate analyses
        frame["gates"] = _list_column(preds.gates.detach().cpu().float().numpy())
        frame["subblocks"] = int(preds.subblocks)
        frame["full_cost"] = float("nan") if preds.full_cost is None else float(preds.full_cost)
    return frame


def frame_to_predictions(df: pd.DataFrame, split: str) -> tuple[Predictions, torch.Tensor]:
    """Rebuild ``(predictions, labels)`` of one split from :func:`predictions_frame` rows.

    Samples come back in the order of the first output's rows and every output is aligned to it by
    ``sample``; outputs in order of first appearance (exits sorted by index). Logits are float32,
    costs float64, labels int64.
    """
    sub = df[df["split"] == split]
    if sub.empty:
        raise ValueError(f"frame_to_predictions: no rows for split {split!r}; splits present: {sorted(df['split'].unique().tolist())}")
    kinds = sub["kind"].unique().tolist()
    if len(kinds) != 1 or kinds[0] not in ("exit", "subnet", "gated"):
        raise ValueError(f"frame_to_predictions: split {split!r} has kinds {kinds}; expected exactly one of exit, subnet, gated")
    kind = kinds[0]
    outputs = pd.unique(sub["output"])
    if kind == "exit":
        outputs = np.sort(outputs.astype(np.int64))
    out_pos = pd.Index(outputs).get_indexer(sub["output"].to_numpy(dtype=object if kind == "subnet" else np.int64))
    first = sub[out_pos == 0]
    samples = first["sample"].to_numpy(dtype=np.int64)
    if len(np.unique(samples)) != len(samples):
        raise ValueError(f"frame_to_predictions: split {split!r} has duplicate sample ids")
    sample_pos = pd.Index(samples).get_indexer(sub["sample"].to_numpy(dtype=np.int64))
    S, N = len(outputs), len(samples)
    if (sample_pos < 0).any() or len(sub) != S * N:
        raise ValueError(f"frame_to_predictions: split {split!r} does not have every sample at every output ({len(sub)} rows for {S} outputs x {N} samples)")
    matrix = _list_to_matrix(sub["logits"])
    C = matrix.shape[1]
    logits = np.zeros((S, N, C), dtype=np.float32)
    logits[out_pos, sample_pos] = matrix
    costs = np.zeros((S, N), dtype=np.float64)
    costs[out_pos, sample_pos] = sub["cost"].to_numpy(dtype=np.float64)
    labels = torch.from_numpy(first["label"].to_numpy(dtype=np.int64).copy())
    logits_t = torch.from_numpy(logits)
    if kind == "gated":
        if "gates" not in sub or sub["gates"].isna().any():
            return GatedPredictions(logits_t[0], torch.from_numpy(costs[0].copy())), labels
        gates = torch.from_numpy(_list_to_matrix(first["gates"]).copy())
        full = float(first["full_cost"].iloc[0])
        return GatedPredictions(logits_t[0], torch.from_numpy(costs[0].copy()), gates, int(first["subblocks"].iloc[0]), None if np.isnan(full) else full), labels
    out_costs = torch.from_numpy(costs[:, 0].copy())
    if kind == "exit":
        return ExitPredictions(logits_t, out_costs), labels
    return SubnetPredictions(logits_t, out_costs, [str(o) for o in outputs]), labels
