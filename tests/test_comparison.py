"""Comparisons that show their noise: standard errors by hand, the within-noise marks, seeds kept
apart and aggregated (no Ray, no MLflow: the report's pure parts)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from dynlab import comparison
from dynlab.evaluation import anytime, budgeted
from dynlab.pipeline import collect_results
from dynlab.predictions import ExitPredictions

# by hand: SE = 100 * sqrt(p (1 - p) / n)
SE_498_OF_500 = 100 * math.sqrt(0.996 * 0.004 / 500)  # 0.2823
SE_495_OF_500 = 100 * math.sqrt(0.990 * 0.010 / 500)  # 0.4450
SE_95_ON_500 = 100 * math.sqrt(0.95 * 0.05 / 500)  # 0.9747
SE_60_ON_500 = 100 * math.sqrt(0.60 * 0.40 / 500)  # 2.1909


def test_binomial_se_by_hand():
    assert SE_498_OF_500 == pytest.approx(0.28227, abs=1e-5) and SE_495_OF_500 == pytest.approx(0.44497, abs=1e-5)
    assert comparison.binomial_se(99.6, 500) == pytest.approx(SE_498_OF_500)
    assert comparison.binomial_se([99.0, 100.0, 0.0], 500) == pytest.approx([SE_495_OF_500, 0.0, 0.0])
    assert math.isnan(comparison.binomial_se(90.0, 0)) and math.isnan(comparison.binomial_se(90.0, float("nan")))


def trial(label: str, acc: dict[str, float], n: int = 500, seed=None, status: str = "ok") -> dict:
    row = {"trial": label if seed is None else f"{label}-seed{seed}", "label": label, "status": status, "n_test": n}
    for col, a in acc.items():
        row[col], row[f"{col}_se"] = a, comparison.binomial_se(a, n)
    return row


def test_within_noise_498_vs_495_but_not_95_vs_60():
    # 99.6 - 99.0 = 0.6 < 2 * sqrt(0.2823^2 + 0.4450^2) = 1.054: noise
    acc = pd.Series([99.6, 99.0]), pd.Series([SE_498_OF_500, SE_495_OF_500])
    assert comparison.within_noise(*acc).tolist() == [False, True]
    # 95 - 60 = 35 >> 2 * sqrt(0.9747^2 + 2.1909^2) = 4.80: a real difference
    acc = pd.Series([60.0, 95.0]), pd.Series([SE_60_ON_500, SE_95_ON_500])
    assert comparison.within_noise(*acc).tolist() == [False, False]
    # the boundary: 1.0 apart with SE 0.3 each needs < 2 * 0.4243 = 0.849 -> not noise; 0.8 is
    acc = pd.Series([90.0, 89.0, 89.2]), pd.Series([0.3, 0.3, 0.3])
    assert comparison.within_noise(*acc).tolist() == [False, False, True]


def test_format_table_shows_errors_and_marks_noise():
    table = pd.DataFrame(
        [
            trial("joint", {"acc_exit0": 99.6, "acc_exit1": 95.0}),
            trial("boostnet", {"acc_exit0": 99.0, "acc_exit1": 60.0}),
            trial("broken", {}, status="failed"),
        ]
    )
    text = comparison.format_table(table)
    lines = text.splitlines()
    assert lines[0].split() == ["label", "seeds", "exit0", "exit1"]
    assert lines[1].split() == ["joint", "1", "99.60", "±", "0.28", "95.00", "±", "0.97"]
    assert lines[2].split() == ["boostnet", "1", "99.00", "±", "0.44*", "60.00", "±", "2.19"]
    assert lines[3].split() == ["broken", "0", "-", "-"]
    assert "500 test images" in lines[4] and "binomial standard error" in lines[4]
    assert lines[5].startswith("* = within noise of the best") and "2 standard errors" in lines[5]


def test_summarize_aggregates_seeds_mean_std_and_noise():
    table = pd.DataFrame(
        [
            trial("t=0.5", {"acc_exit0": 80.0}, seed=0),
            trial("t=0.5", {"acc_exit0": 84.0}, seed=1),
            trial("t=0", {"acc_exit0": 70.0}, seed=0),
            trial("t=0", {"acc_exit0": 70.2}, seed=1),
            trial("t=0", {"acc_exit0": 99.0}, seed=2, status="failed"),  # a failed seed is not averaged
        ]
    )
    s = comparison.summarize(table).set_index("label")
    assert s.loc["t=0.5", "n_seeds"] == 2 and s.loc["t=0", "n_seeds"] == 2
    assert s.loc["t=0.5", "acc_exit0"] == pytest.approx(82.0)
    assert s.loc["t=0.5", "acc_exit0_std"] == pytest.approx(math.sqrt(8.0))  # (2^2 + 2^2) / (2 - 1)
    assert s.loc["t=0.5", "acc_exit0_se"] == pytest.approx(2.0)  # std / sqrt(2) > binomial SE 1.72
    # seeds that agree closely: the noise is floored at the binomial SE of the shared test set
    assert s.loc["t=0", "acc_exit0"] == pytest.approx(70.1)
    assert s.loc["t=0", "acc_exit0_se"] == pytest.approx(100 * math.sqrt(0.701 * 0.299 / 500))
    assert s.loc["t=0.5", "trials"] == "t=0.5-seed0,t=0.5-seed1"
    text = comparison.format_table(table)
    assert "82.00 ± 2.83" in text and "70.10 ± 0.14" in text and "2 " in text.splitlines()[1]
    assert "standard error of their mean" in text.splitlines()[-1]


def exit_preds(seed: int, N: int, strength: float) -> tuple[ExitPredictions, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (N,), generator=g)
    logits = torch.randn(3, N, 5, generator=g)
    logits[:, torch.arange(N), labels] += torch.tensor([0.5, 1.5, 3.0])[:, None] * strength
    return ExitPredictions(logits, torch.tensor([1e6, 2e6, 3e6], dtype=torch.float64)), labels


def test_trial_columns_carry_the_test_set_size():
    held, held_labels = exit_preds(0, 300, 1.0)
    test, test_labels = exit_preds(1, 200, 1.0)
    a = anytime(test, test_labels)
    b = budgeted(held, held_labels, test, test_labels, budgets=[2e6], p_grid=False)
    row = comparison.trial_columns(a, b)
    assert row["n_test"] == 200
    for k in range(3):
        acc = float(a["accuracy"][k])
        assert row[f"acc_exit{k}"] == acc and row[f"acc_exit{k}_se"] == pytest.approx(100 * math.sqrt(acc / 100 * (1 - acc / 100) / 200))
    acc = float(b["test_accuracy"][0])
    assert row["acc@2.00MMACs"] == acc and row["acc@2.00MMACs_se"] == pytest.approx(100 * math.sqrt(acc / 100 * (1 - acc / 100) / 200))


def test_collect_results_keeps_every_seed(tmp_path):
    """sweep.repeats=2: two trials share a label; both rows stay, both curves are drawn."""
    sweep, evaluations, trials = {}, {}, {}
    for i, (tid, strength) in enumerate([("t=0.5-seed0", 0.5), ("t=0.5-seed1", 2.0), ("t=0-seed0", 1.0)]):
        preds, labels = exit_preds(i, 100, strength)
        path = tmp_path / f"{tid}.parquet"
        anytime(preds, labels).to_parquet(path)
        sweep[tid] = {"label": tid.rsplit("-seed", 1)[0], "status": "ok", "error": "", "run_id": f"r{i}"}
        evaluations[f"e{i}"] = {"status": "ok", "anytime": str(path)}
        trials[tid] = f"e{i}"
    table, curves = collect_results(trials, sweep, evaluations)
    assert table["trial"].tolist() == ["t=0.5-seed0", "t=0.5-seed1", "t=0-seed0"]
    assert table["seed"].tolist() == [0, 1, 0]
    assert [len(v) for v in curves.values()] == [2, 1]
    seed0, seed1 = (a["accuracy"].tolist() for a, _ in curves["t=0.5"])
    assert seed0 != seed1  # the second seed did not overwrite the first
    assert table["acc_exit2"].tolist()[:2] == [seed0[2], seed1[2]]
    s = comparison.summarize(table).set_index("label")
    assert s.loc["t=0.5", "acc_exit2"] == pytest.approx((seed0[2] + seed1[2]) / 2)


def test_mean_curve_matches_points_by_key_and_position():
    a = pd.DataFrame({"mode": ["budget", "pgrid", "pgrid"], "test_accuracy": [50.0, 60.0, 70.0], "test_cost": [1.0, 2.0, 3.0]})
    b = pd.DataFrame({"mode": ["budget", "pgrid", "pgrid"], "test_accuracy": [54.0, 62.0, 80.0], "test_cost": [1.0, 2.0, 5.0]})
    m = comparison.mean_curve([a, b], ["mode"], ["test_accuracy", "test_cost"])
    assert m["mode"].tolist() == ["budget", "pgrid", "pgrid"]
    assert m["test_accuracy"].tolist() == [52.0, 61.0, 75.0] and m["test_cost"].tolist() == [1.0, 2.0, 4.0]
    assert m["test_accuracy_std"].tolist() == pytest.approx([math.sqrt(8), math.sqrt(2), math.sqrt(50)])


def test_a_cost_that_differs_between_rows_is_printed_beside_its_accuracy():
    # gated networks: each trial runs at its own mean executed cost, which the table must show
    table = pd.DataFrame(
        {
            "trial": ["a", "b"], "label": ["rate=0.3", "rate=0.7"], "status": ["ok", "ok"], "n_test": [500, 500],
            "acc_gated": [60.0, 90.0], "acc_gated_se": [2.19, 1.34], "mmacs_gated": [4.35, 10.4],
        }
    )  # fmt: skip
    text = comparison.format_table(table)
    header = text.splitlines()[0]
    assert "gated MMACs" in header
    assert "4.35" in text.splitlines()[1] and "10.40" in text.splitlines()[2]
    same = table.assign(mmacs_gated=[5.0, 5.0])
    assert "MMACs" not in comparison.format_table(same).splitlines()[0]
