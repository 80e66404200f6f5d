"""The overhead benchmark on a tiny sweep (two trials of one epoch, a tiny MSDNet): its table is
consistent with what the pipeline ran. No timing is asserted."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import overhead

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "eval.num_budgets=2", "eval.p_grid=false"]


@pytest.mark.slow
def test_overhead_table_is_consistent(tmp_path, capsys):
    trials, epochs = 2, 1
    m = overhead.main(["--keep", str(tmp_path / "run"), "--csv", str(tmp_path / "overhead.csv"), *TINY, "sweep.values=[0.5]", f"epochs={epochs}"])
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "overhead.csv")
    pd.testing.assert_frame_equal(table, m.table, check_dtype=False)
    rows, total = table[table["trial"] != "total"], table[table["trial"] == "total"].iloc[0]
    assert sorted(rows["trial"]) == ["method=joint", "temperature=0.5"]  # one row per trial, then the total
    assert table["trial"].iloc[-1] == "total"
    assert int(total["epochs"]) == trials * epochs and list(rows["epochs"]) == [epochs] * trials  # each epoch logged once
    for col in ("epochs", "epoch_s", "predict_s", "calibrate_s", "evaluate_s", "steps_s", "train_span_s"):
        assert rows[col].sum() == pytest.approx(total[col]), col  # per-trial rows sum to the total
    assert table["steps_s"].to_numpy() == pytest.approx(table[["predict_s", "calibrate_s", "evaluate_s"]].sum(axis=1).to_numpy())
    assert (rows[["epoch_s", "predict_s", "evaluate_s"]] > 0).all().all()  # every trial trained, predicted and evaluated
    assert total["span_s"] == pytest.approx(m.wall)
    assert ((table["useful"] > 0) & (table["useful"] <= 1)).all()
    assert total["useful"] == pytest.approx((total["epoch_s"] + total["steps_s"]) / (total["span_s"] * total["slots"]))
    assert f"useful fraction {total['useful']:.2f}" in out and str(tmp_path / "overhead.csv") in out
    assert (tmp_path / "overhead.log").read_text().count("[dag] ran sweep") == 1  # the pipeline's log, timestamped, beside the table


def test_trials_are_sized_to_fit_the_cluster_and_too_many_are_warned_about(capsys):
    from dynlab import config, sweeps

    def at_once(args, nodes, n=6):
        base = config.cli_config([*TINY, *args])
        return sweeps.concurrency(base, sweeps.expand(base, grid={"boostnet.temperature": [i / 10 for i in range(n)]}), nodes)

    two_cores = [{"CPU": 2.0}]
    assert at_once([], two_cores) == 2  # in-process trials of 1 CPU: two at once on two cores
    assert at_once([], two_cores, n=1) == 1
    assert at_once(["sweep.max_concurrent=1"], two_cores) == 1
    assert capsys.readouterr().out == ""
    assert at_once(["sweep.max_concurrent=4"], two_cores) == 2
    assert "sweep.max_concurrent=4 does not fit" in capsys.readouterr().out
    # a worker group per trial: its driver's 0.05 CPU plus the worker's 1 leave room for one on two cores
    assert at_once(["sweep.in_process=false"], two_cores) == 1
    assert at_once(["sweep.in_process=false", "sweep.max_concurrent=2"], two_cores) == 1
    assert "sweep.max_concurrent=2 does not fit: each trial holds 1.05 CPU(s)" in capsys.readouterr().out
    assert at_once(["sweep.in_process=false", "run.cpus_per_worker=0.95", "sweep.max_concurrent=2"], two_cores) == 2
    assert at_once(["sweep.max_concurrent=4", "run.wait_for_resources=true"], two_cores) == 4  # an autoscaling cluster brings the rest
    assert capsys.readouterr().out == ""
    # in-process trials live on one node each; GPU trials are bounded by the GPUs
    assert at_once([], [{"CPU": 1.5}, {"CPU": 1.5}]) == 2
    assert at_once(["run.cpus_per_worker=2"], [{"CPU": 3.0}, {"CPU": 3.0}]) == 2
    assert at_once(["run.use_gpu=true"], [{"CPU": 16.0, "GPU": 2.0}]) == 2
    assert at_once(["run.use_gpu=true", "workers=2"], [{"CPU": 16.0, "GPU": 2.0}]) == 1


def test_preflight_sizes_an_in_process_trial_like_the_sweep_does():
    """On a 1-CPU machine the default sweep trial (in-process: the trial is its worker) fits; a
    trial with a worker group needs its Tune driver's CPUs on top and is refused, naming the key."""
    from dynlab import config, preflight
    from dynlab.errors import ConfigError

    one_cpu = [{"CPU": 1.0}]
    preflight.check_resources([config.cli_config([])], one_cpu, tune_trials=True)
    with pytest.raises(ConfigError, match="run.num_workers.*1.05 CPUs needed"):
        preflight.check_resources([config.cli_config(["sweep.in_process=false"])], one_cpu, tune_trials=True)
