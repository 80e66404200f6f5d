"""DMNN around the platform: the sweep's trials, the cost listing, the benchmark (no Ray), and one
gated trial plus the dense baseline through the whole sweep pipeline (Ray)."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from benchmarks import gated
from dynlab import config, pipeline, tracking
from dynlab.errors import ConfigError
from pipelines import costs as costs_pipeline
from pipelines import sweep_dmnn_flops as sweep


def test_sweep_trials_cover_targets_lambdas_and_the_dense_baseline():
    assert sweep.with_defaults([])[0] == ["method=dmnn", "preset=dmnn-resnet-small", "epochs=12"]
    args, lambdas = sweep.with_defaults(["run.epochs=1", "lambdas=[0.5,2]"])
    assert args == ["method=dmnn", "preset=dmnn-resnet-small", "run.epochs=1"] and lambdas == [0.5, 2.0]
    base = config.cli_config(args)
    trials = sweep.make_trials(lambdas)(base)
    assert [t.label for t in trials] == [
        f"target_rate={t}, resource_weight={w}" for t in (0.3, 0.5, 0.7) for w in (0.5, 2.0)
    ] + ["gated=False, subblocks=1"]
    dense = trials[-1].cfg()
    assert (dense.backbone_cfg.gated, dense.backbone_cfg.subblocks) == (False, 1)
    assert len({t.train_key for t in trials}) == len(trials)
    only_targets = sweep.make_trials(None)(base.with_overrides(["sweep.values=[0.2,0.9]", "sweep.baseline=false"]))
    assert [t.label for t in only_targets] == ["target_rate=0.2", "target_rate=0.9"]
    with pytest.raises(ConfigError, match="lambdas"):
        sweep.with_defaults(["lambdas=[1,-2]"])
    assert sweep.with_defaults(["backbone=dmnn_resnet"])[0][0] == "method=dmnn"  # no preset forced on a backbone
    mobilenet = sweep.make_trials(None)(config.cli_config(["method=dmnn", "backbone=dmnn_mobilenetv2"]))[-1].cfg()
    assert (mobilenet.backbone_cfg.gated, mobilenet.backbone_cfg.subblocks) == (False, 1)  # its own baseline


def test_costs_pipeline_lists_fixed_part_subblocks_controllers_and_dense_total(capsys):
    assert costs_pipeline.main(["preset=dmnn-resnet50", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rep["exits"]]
    assert names[0] == "fixed" and names[-1] == "dense total"
    assert sum(n.endswith(".controller") for n in names) == 16  # 3+4+6+3 blocks
    assert sum(".sub" in n for n in names) == 64  # N = 4
    macs = {r["name"]: r["macs"] for r in rep["exits"]}
    assert macs["dense total"] == pytest.approx(macs["fixed"] + sum(m for n, m in macs.items() if ".sub" in n))
    controllers = sum(m for n, m in macs.items() if n.endswith(".controller"))
    # the paper: 16 controllers ~ 0.02% of ImageNet ResNet-50; here at 32x32, with their global
    # average pooling counted (C*H*W ops each), 2.28 M of 1.35 G MACs = 0.17%
    assert controllers / macs["dense total"] < 0.005
    # CIFAR ResNet-50 (3x3 stem, no max-pool) at 32x32 is about 1.3 GMACs; the split keeps it close
    assert 1.1e9 < macs["dense total"] < 1.5e9


def test_gated_benchmark_reports_macs_and_time_ratios(capsys):
    rows = gated.main(["--preset", "dmnn-resnet-small", "--batch", "16", "--repeats", "1", "--rates", "0.25,1.0"])
    out = capsys.readouterr().out
    assert "agree: True" in out
    assert rows[0]["rate"] == pytest.approx(0.25, abs=0.1) and rows[1]["rate"] == 1.0
    assert rows[0]["macs"] < rows[1]["macs"] <= 1.0 + 1e-9


@pytest.mark.slow
def test_one_dmnn_trial_end_to_end(in_tmp, ray_local):
    args, lambdas = sweep.with_defaults(["run.epochs=1", "sweep.values=[0.5]", "data.heldout=100"])
    base = config.cli_config(args)
    trials = sweep.make_trials(lambdas)(base)  # t = 0.5 and the dense baseline
    parent = tracking.open_run("dmnn-test", "one")
    out = pipeline.run(base, trials, parent, "dmnn-test", sweep.title(base))
    parent.end()
    table = out["comparison"].set_index("label")
    assert list(table.index) == ["target_rate=0.5", "gated=False, subblocks=1"]
    assert (table["status"] == "ok").all(), table["error"].tolist()
    gated_row, dense_row = table.loc["target_rate=0.5"], table.loc["gated=False, subblocks=1"]
    assert 0 <= gated_row["acc_gated"] <= 100 and 0 <= dense_row["acc_gated"] <= 100
    # executed MACs (controllers included) against the unmodified network's
    assert gated_row["mmacs_gated"] <= dense_row["mmacs_gated"], (gated_row["mmacs_gated"], dense_row["mmacs_gated"])

    client = MlflowClient(tracking.tracking_uri())
    child = client.get_run(gated_row["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    logged = {f.path for f in client.list_artifacts(child.info.run_id, "evaluation/gated")}
    expected = ["execution_rates.csv", "execution_rates.txt", "rates_by_category.csv", "rates_by_category.png", "rates_by_class.csv", "cost_distribution.csv", "cost_distribution.png"]
    assert {f"evaluation/gated/{n}" for n in expected} <= logged
    rates = pd.read_csv(client.download_artifacts(child.info.run_id, "evaluation/gated/rates_by_category.csv", str(in_tmp)))
    assert sorted(set(rates["category"])) == [0, 1, 2]  # digits: the 3 built-in groups DMNN trained with
