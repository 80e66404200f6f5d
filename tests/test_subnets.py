"""dynlab.subnets: Pareto front, best sub-network per budget, latency per sub-network (hand-made data)."""

import math

import pandas as pd
import pytest

from dynlab import subnets


def test_pareto_front_keeps_only_the_non_dominated_points_by_increasing_cost():
    #        0    1    2    3    4    5
    costs = [4.0, 1.0, 2.0, 3.0, 2.0, 5.0]
    acc = [90., 70., 80., 75., 80., 90.]
    # 1 (cheapest); 2 beats it; 4 ties 2 (dropped, later index); 3 is worse than 2; 0 best; 5 ties 0 at higher cost
    assert subnets.pareto_front(costs, acc) == [1, 2, 0]
    assert subnets.pareto_front([], []) == []
    with pytest.raises(ValueError):
        subnets.pareto_front([1.0], [])


def test_best_under_each_budget_is_the_most_accurate_that_fits():
    costs = [4.0, 1.0, 2.0, 3.0]
    acc = [90., 70., 80., 85.]
    assert subnets.best_under_budgets(costs, acc, [0.5, 1.0, 2.5, 3.0, 10.0]) == [None, 1, 2, 3, 0]
    assert subnets.best_under_budgets([1.0, 2.0], [80., 80.], [5.0]) == [0]  # tie: the cheaper


def test_frames_follow_the_anytime_columns():
    anytime = pd.DataFrame({"name": ["TT", "TF", "FT", "FF"], "cost": [1.0, 2.0, 2.5, 3.0], "accuracy": [60., 70., 65., 80.]})
    assert list(subnets.front_frame(anytime)["name"]) == ["TT", "TF", "FF"]
    table = subnets.budget_frame(anytime, [0.5, 2.6])
    assert table["name"].tolist() == ["", "TF"] and math.isnan(table["accuracy"][0]) and table["cost"][1] == 2.0


def test_latency_is_the_median_per_sub_network_after_warmup():
    now = [0.0]
    durations = {"A": iter([100, 1, 3, 2]), "B": iter([100, 10, 30, 20])}  # the first call of each is warm-up
    calls = []

    def run(name):
        calls.append(name)
        now[0] += next(durations[name])

    out = subnets.latency(run, ["A", "B"], repeats=3, warmup=1, clock=lambda: now[0])
    assert calls == ["A", "B", "A", "B", "A", "B", "A", "B"]  # interleaved rounds
    assert out["latency_s"].tolist() == [2, 20] and out["min_s"].tolist() == [1, 10]
