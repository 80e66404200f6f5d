"""dynlab.gating: execution rates per block / sub-block / category and the executed-cost
distribution, against hand-counted values."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from dynlab import gating

# 4 samples, 2 blocks x 2 sub-blocks (columns b0.s0, b0.s1, b1.s0, b1.s1)
GATES = torch.tensor(
    [
        [1, 1, 0, 0],
        [1, 0, 0, 1],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
    ],
    dtype=torch.float32,
)


def test_execution_rates_per_subblock_and_block():
    df = gating.execution_rates(GATES, 2)
    got = {(r.block, r.sub): r.rate for r in df.itertuples()}
    assert got == {(0, -1): 0.75, (0, 0): 1.0, (0, 1): 0.5, (1, -1): 0.375, (1, 0): 0.25, (1, 1): 0.5}
    assert gating.format_rates(df).splitlines()[1:] == ["    0  0.75   1.00  0.50", "    1  0.38   0.25  0.50"]


def test_rates_by_category_use_the_class_mapping():
    labels = torch.tensor([0, 1, 2, 3])
    df = gating.rates_by_category(GATES, 2, labels, class_categories=[0, 0, 1, 1], names=["a", "b"])
    a = df[df["name"] == "a"].set_index(["block", "sub"])["rate"].to_dict()  # samples 0 and 1
    b = df[df["name"] == "b"].set_index(["block", "sub"])["rate"].to_dict()  # samples 2 and 3
    assert a == {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 0.0, (1, 1): 0.5}
    assert b == {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 0.5, (1, 1): 0.5}
    assert set(df["n"]) == {2}


def test_cost_distribution_counts_every_sample_once():
    costs = torch.tensor([10.0, 10.0, 20.0, 30.0, 30.0], dtype=torch.float64)
    df = gating.cost_distribution(costs, bins=2, full=40.0)
    assert df["count"].tolist() == [2, 3]  # [10, 20) and [20, 30]
    assert df["fraction"].tolist() == pytest.approx([0.4, 0.6])
    assert df["rate_hi"].iloc[-1] == pytest.approx(0.75)


def test_bad_gates_are_refused():
    with pytest.raises(ValueError, match="blocks \\* 3"):
        gating.execution_rates(GATES, 3)
    with pytest.raises(ValueError, match="0 or 1"):
        gating.execution_rates(GATES * 0.5, 2)


def test_figures_are_written(tmp_path):
    labels = torch.tensor([0, 1, 2, 3])
    by_cat = gating.rates_by_category(GATES, 2, labels, class_categories=[0, 0, 1, 1], names=["a", "b"])
    assert gating.plot_rates(by_cat, tmp_path / "rates.png").stat().st_size > 0
    assert gating.plot_cost_distribution(torch.tensor([1e6, 2e6, 2e6]), tmp_path / "cost.png", full=3e6).stat().st_size > 0
    assert isinstance(by_cat, pd.DataFrame)


def test_write_report_writes_every_table_and_figure(tmp_path):
    paths = gating.write_report(tmp_path / "gated", GATES, 2, torch.tensor([0, 1, 2, 3]), torch.tensor([5.0, 6.0, 8.0, 5.0]), full=8.0, class_categories=[0, 0, 1, 1])
    assert sorted(p.name for p in paths) == sorted(
        ["execution_rates.csv", "execution_rates.txt", "rates_by_class.csv", "rates_by_category.csv", "rates_by_category.png", "cost_distribution.csv", "cost_distribution.png"]
    )
    assert all(p.stat().st_size > 0 for p in paths)
    assert pd.read_csv(tmp_path / "gated" / "cost_distribution.csv")["count"].sum() == 4
    assert sorted(set(pd.read_csv(tmp_path / "gated" / "rates_by_category.csv")["category"])) == [0, 1]
    assert sorted(set(pd.read_csv(tmp_path / "gated" / "rates_by_class.csv")["class"])) == [0, 1, 2, 3]
    # no categories: the per-class table is the only one, and its heat map says "class" in its name
    names = {p.name for p in gating.write_report(tmp_path / "per_class", GATES, 2, torch.tensor([0, 1, 2, 3]), torch.tensor([5.0, 6.0, 8.0, 5.0]))}
    assert {"rates_by_class.csv", "rates_by_class.png"} <= names and not any("category" in n for n in names)


def test_every_category_has_rows_even_without_test_samples():
    df = gating.rates_by_category(GATES, 2, torch.tensor([0, 0, 1, 1]), class_categories=[0, 0, 2], names=["a", "b", "c"])
    assert sorted(set(df["category"])) == [0, 1, 2]
    empty = df[df["category"] == 1]
    assert (empty["n"] == 0).all() and empty["rate"].isna().all()
    with pytest.raises(ValueError, match="names"):
        gating.rates_by_category(GATES, 2, torch.tensor([0, 0, 1, 1]), class_categories=[0, 1], names=["a"])
    with pytest.raises(ValueError, match="labels"):
        gating.rates_by_category(GATES, 2, torch.tensor([0, 1]))


def test_category_spread_is_the_widest_difference_of_one_gate_across_categories():
    # samples 0, 1 in category 0, samples 2, 3 in category 1 (labels = categories):
    # b0.s0 1 | 1 -> 0; b0.s1 0.5 | 0.5 -> 0; b1.s0 0 | 0.5 -> 0.5; b1.s1 0.5 | 0.5 -> 0
    df = gating.rates_by_category(GATES, 2, torch.tensor([0, 0, 1, 1]))
    assert gating.category_spread(df) == 0.5
    static = torch.tensor([[1, 0, 1, 0]] * 4, dtype=torch.float32)  # every sample the same path
    assert gating.category_spread(gating.rates_by_category(static, 2, torch.tensor([0, 0, 1, 1]))) == 0.0
    # a category without samples (NaN rates) is left out, not a spread of NaN
    empty = gating.rates_by_category(GATES, 2, torch.tensor([0, 0, 1, 1]), class_categories=[0, 0, 2])  # labels 0, 1 -> category 0; category 1 empty
    assert gating.category_spread(empty) == 0.0


def test_gate_states_survive_the_predictions_table_and_are_logged_with_the_evaluation(in_tmp):
    from mlflow import MlflowClient

    from dynlab import config, evaluation, steps, tracking
    from dynlab.predictions import GatedPredictions, concat

    g = torch.Generator().manual_seed(0)
    gates = (torch.rand(12, 6, generator=g) > 0.5).float()  # 3 blocks x 2 sub-blocks
    costs = 100.0 + gates @ torch.tensor([10.0, 10.0, 20.0, 20.0, 30.0, 30.0])
    preds = concat([GatedPredictions(torch.randn(6, 4, generator=g), costs[:6], gates[:6], 2, 220.0), GatedPredictions(torch.randn(6, 4, generator=g), costs[6:], gates[6:], 2, 220.0)])
    labels = torch.randint(0, 4, (12,), generator=g)
    frame = evaluation.predictions_frame(preds, labels, "test")
    back, back_labels = evaluation.frame_to_predictions(frame, "test")
    assert torch.equal(back.gates, gates) and back.subblocks == 2 and back.full_cost == 220.0
    assert torch.equal(back.costs, costs.double()) and torch.equal(back_labels, labels)

    cfg = config.cli_config(["method=dmnn", "preset=dmnn-resnet-small"])
    tables = steps.PredictionTables(frame.iloc[0:0], frame, [])
    handle = tracking.open_run("gated-test", "r")
    steps.log_evaluation(handle, cfg, tables, steps.evaluate(cfg, tables))
    logged = {f.path for f in MlflowClient(handle.uri).list_artifacts(handle.run_id, "evaluation/gated")}
    assert {"evaluation/gated/execution_rates.csv", "evaluation/gated/cost_distribution.png"} <= logged


def _log_gated(n: int, classes: int, overrides: list[str]):
    """Random gates (3 blocks x 2 sub-blocks) of ``n`` test samples over ``classes`` classes, logged
    by steps.log_evaluation; returns (gates, labels, the run's evaluation/gated folder, its listing)."""
    from mlflow import MlflowClient

    from dynlab import config, evaluation, steps, tracking
    from dynlab.predictions import GatedPredictions

    g = torch.Generator().manual_seed(1)
    gates = (torch.rand(n, 6, generator=g) > 0.5).float()
    labels = torch.arange(n) % classes  # every class present
    costs = 100.0 + gates @ torch.tensor([10.0, 10.0, 20.0, 20.0, 30.0, 30.0])
    frame = evaluation.predictions_frame(GatedPredictions(torch.randn(n, classes, generator=g), costs, gates, 2, 220.0), labels, "test")
    cfg = config.cli_config(["method=dmnn", "preset=dmnn-resnet-small", *overrides])
    tables = steps.PredictionTables(frame.iloc[0:0], frame, [])
    handle = tracking.open_run("gated-test", "r")
    steps.log_evaluation(handle, cfg, tables, steps.evaluate(cfg, tables))
    logged = {f.path.rsplit("/", 1)[-1] for f in MlflowClient(handle.uri).list_artifacts(handle.run_id, "evaluation/gated")}
    return gates, labels, Path(handle.artifact_uri().removeprefix("file://")) / "evaluation" / "gated", logged


def test_logged_rates_by_category_are_per_training_category_and_equal_a_hand_count(in_tmp):
    from dynlab import data

    gates, labels, folder, logged = _log_gated(40, 10, [])  # digits, dmnn.categories=auto: 3 built-in groups
    assert {"rates_by_category.csv", "rates_by_category.png", "rates_by_class.csv"} <= logged
    df = pd.read_csv(folder / "rates_by_category.csv")
    groups = data.BUILTIN_CATEGORIES["digits"]
    assert sorted(set(df["category"])) == [0, 1, 2]  # K = 3 categories, not 10 classes
    assert list(dict.fromkeys(df["name"])) == ["closed loops", "straight strokes", "open curves"]
    cats = torch.tensor(groups)[labels]
    for k in range(3):
        expected = gates[cats == k].mean(0)  # the fraction of category k's samples with each gate open
        got = df[df["category"] == k].sort_values(["block", "sub"])
        assert got["rate"].tolist() == pytest.approx(expected.tolist())
        assert set(got["n"]) == {int((cats == k).sum())}
    by_class = pd.read_csv(folder / "rates_by_class.csv")
    assert sorted(set(by_class["class"])) == list(range(10))
    assert by_class[by_class["class"] == 3].sort_values(["block", "sub"])["rate"].tolist() == pytest.approx(gates[labels == 3].mean(0).tolist())


def test_without_categories_the_rates_are_per_class_only(in_tmp):
    _, _, folder, logged = _log_gated(20, 10, ["dmnn.categories=none"])
    assert {"rates_by_class.csv", "rates_by_class.png"} <= logged and not any("category" in n for n in logged)
    assert sorted(set(pd.read_csv(folder / "rates_by_class.csv")["class"])) == list(range(10))
