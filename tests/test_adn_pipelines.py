"""The ADN pipelines: their trials (no Ray), the sub-network report, and one trial end to end."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow import MlflowClient

from dynlab import config, pipeline, tracking
from pipelines import ablation_adn, adn_common, sweep_adn

BASE = [*adn_common.DEFAULTS, "adn_resnet.width=4"]


def test_ablation_has_the_four_rows_and_the_two_individual_baselines():
    trials = ablation_adn.trials(config.cli_config(BASE))
    got = {t.id: (t.cfg().method_cfg.distill, t.cfg().method_cfg.skip_aware_norms, t.cfg().method_cfg.individual) for t in trials}
    assert got == {
        "distill=True-skip_aware_norms=True": (True, True, ""),
        "distill=True-skip_aware_norms=False": (True, False, ""),
        "distill=False-skip_aware_norms=True": (False, True, ""),
        "distill=False-skip_aware_norms=False": (False, False, ""),
        "individual=super": (True, True, "super"),
        "individual=base": (True, True, "base"),
    }
    assert len({t.train_key for t in trials}) == 6  # six different trainings
    assert len(ablation_adn.trials(config.cli_config([*BASE, "sweep.baseline=false"]))) == 4


def test_pipelines_train_15_epochs_unless_told_otherwise():
    assert config.cli_config(adn_common.with_defaults([])).run.epochs == 15
    assert config.cli_config(adn_common.with_defaults(["epochs=2"])).run.epochs == 2
    assert config.cli_config(adn_common.with_defaults(["run.epochs=3"])).run.epochs == 3
    assert "run.epochs=15" not in adn_common.with_defaults(["config=run.yaml"])  # the file's epochs win


def test_sweep_is_the_grid_of_lambda_and_temperature():
    trials = sweep_adn.trials(config.cli_config([*BASE, "sweep.values=[0.5,2]"]))
    assert sorted((t.cfg().method_cfg.kd_lambda, t.cfg().method_cfg.temperature) for t in trials) == [(0.5, 1.0), (0.5, 4.0), (2.0, 1.0), (2.0, 4.0)]


def test_subnet_report_lists_each_front_and_the_best_sub_network_per_budget(tmp_path):
    a = pd.DataFrame({"name": ["TT", "TF", "FT", "FF"], "mmacs": [1.0, 2.0, 2.0, 3.0], "accuracy": [50.0, 60.0, 70.0, 65.0]})
    a.to_parquet(tmp_path / "a.parquet")
    out = {
        "comparison": pd.DataFrame({"trial": ["a", "b"], "status": ["ok", "error"]}),
        "dag": {"evaluate[a]": {"anytime": str(tmp_path / "a.parquet")}, "evaluate[b]": {"status": "error"}},
    }
    rep = adn_common.subnet_report(out, [0.5, 2.5, 3.0])
    front = rep[rep["kind"] == "pareto"]
    assert front["name"].tolist() == ["TT", "FT"]  # TF: same cost, less accurate; FF: costlier, less accurate
    budget = rep[rep["kind"] == "budget"]
    assert budget["name"].tolist() == ["", "FT", "FT"] and budget["accuracy"].iloc[1] == 70.0
    # default budgets: evenly inside [1, 3] MMACs
    assert adn_common.subnet_report(out, [], 1)["budget_mmacs"].dropna().tolist() == [2.0]


@pytest.mark.slow
def test_one_ablation_trial_end_to_end_logs_every_sub_network(in_tmp, ray_local):
    base = config.cli_config([*BASE, "epochs=1", "data.heldout=200", "adn.subnets=[TTTT,TFFT,FFFF]"])
    trials = ablation_adn.trials(base)[:1]
    parent = tracking.open_run("adn-test", "one")
    out = pipeline.run(base, trials, parent, "adn-test", "adn")
    parent.end()
    row = out["comparison"].iloc[0]
    assert row["status"] == "ok"
    assert {"acc_TTTT", "acc_TFFT", "acc_FFFF"} <= set(out["comparison"].columns)
    assert row["mmacs_TTTT"] < row["mmacs_TFFT"] < row["mmacs_FFFF"]
    rep = adn_common.subnet_report(out, [])
    assert set(rep["kind"]) == {"pareto", "budget"} and len(rep[rep["kind"] == "budget"]) == 4
    timed = adn_common.with_latency(rep, trials, repeats=2)  # measured per sub-network, beside its MACs
    named = timed[timed["name"] != ""]
    # every sub-network the report names (which ones depends on one epoch's accuracies) has its latency
    assert len(named) and (named["latency_ms"] > 0).all() and set(named["name"]) <= {"TTTT", "TFFT", "FFFF"}
    every = adn_common.with_latency(pd.DataFrame({"trial": [trials[0].id] * 3, "name": ["TTTT", "TFFT", "FFFF"]}), trials, repeats=1)
    assert (every["latency_ms"] > 0).all()  # measured for each requested sub-network
    client = MlflowClient(tracking.tracking_uri())
    (child,) = client.search_runs([parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert len(client.get_metric_history(child.info.run_id, "anytime/test_accuracy")) == 3  # one point per sub-network
    assert len(client.get_metric_history(child.info.run_id, "train/loss_base")) == 1


def test_latency_command_lists_the_requested_sub_networks_with_costs(capsys):
    import json

    from pipelines import adn_latency

    assert adn_latency.main(["backbone=adn_resnet", "adn_resnet.width=4", "subnets=TTTT,FFFF", "repeats=1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["name"] for r in rows] == ["TTTT", "FFFF"] and rows[0]["macs"] < rows[1]["macs"] and rows[0]["latency_s"] > 0
    assert adn_latency.main(["backbone=adn_resnet", "subnets=TTT"]) == 2
    assert "subnets" in capsys.readouterr().err
    assert adn_latency.main(["backbone=msdnet"]) == 2
