"""The sweep pipeline end to end: Ray Tune trials trained by Ray Train, the DAG cache, MLflow layout."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from dynlab import config, pipeline, sweeps, tracking

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "epochs=1", "eval.num_budgets=2", "sweep.max_concurrent=2", "eval.p_grid=false"]


def children(client, parent):
    return client.search_runs([parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")


def tune_failures(storage, trial_id: str) -> int:
    """How many times Tune restarted a trial (its newest experiment state)."""
    import json

    state = json.loads(sorted(storage.glob("*-sweep-*/experiment_state-*.json"), key=lambda p: p.stat().st_mtime)[-1].read_text())
    for trial, runtime in state["trial_data"]:
        if json.loads(trial)["config"]["trial"] == trial_id:
            return json.loads(runtime)["num_failures"]
    raise AssertionError(f"no trial {trial_id} in the experiment state")


@pytest.mark.slow
def test_sweep_pipeline_trains_caches_reruns_only_what_changed_and_reports_failures(in_tmp, ray_local):
    base = config.cli_config(TINY)
    # two good trials and one whose config fails inside its worker (3 temperatures for 2 exits)
    trials = sweeps.expand(base, grid={"boostnet.temperature": [0.0, 0.5]}, extra=[{"boostnet.temperatures": [1.0, 2.0, 3.0]}])
    assert [t.id for t in trials] == ["temperature=0.0", "temperature=0.5", "temperatures=[1.0-2.0-3.0]"]

    parent = tracking.open_run("sweep-test", "first")
    out = pipeline.run(base, trials, parent, "sweep-test", "test")
    parent.end()
    table = out["comparison"]
    assert list(table["trial"]) == [t.id for t in trials]  # one row per trial
    assert list(table["status"]) == ["ok", "ok", "error"]
    assert "boostnet.temperatures" in table["error"].iloc[2]
    assert table[["acc_exit0", "acc_exit1"]].iloc[:2].notna().all().all()
    assert sorted(out["trained"]) == ["temperature=0.0", "temperature=0.5"]

    client = MlflowClient(tracking.tracking_uri())
    kids = {r.data.tags["dynlab.trial"]: r for r in children(client, parent)}
    assert set(kids) == {t.id for t in trials}
    assert kids["temperatures=[1.0-2.0-3.0]"].info.status == "FAILED"
    assert "boostnet.temperatures" in kids["temperatures=[1.0-2.0-3.0]"].data.tags["dynlab.error"]
    assert tune_failures(in_tmp / "dynlab_runs", "temperatures=[1.0-2.0-3.0]") == 0  # bad input: not retried (run.max_failures=3)
    for tid in ("temperature=0.0", "temperature=0.5"):
        run = kids[tid]
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "heldout/acc_out1")) == 1  # training curve
        assert len(client.get_metric_history(run.info.run_id, "anytime/test_accuracy")) == 2  # evaluation
        paths = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/curves.png", "evaluation/budgeted.parquet", "evaluation/thresholds.json"} <= paths
    report = {f.path for f in client.list_artifacts(parent.run_id, "report")}
    assert {"report/comparison.png", "report/comparison.csv", "report/comparison.parquet"} <= report
    assert {f.path for f in client.list_artifacts(parent.run_id, "dag")} == {"dag/graph.txt", "dag/steps.json"}

    # the same pipeline again: served from cache, nothing trained, no prediction or evaluation rerun
    good = trials[:2]
    again = tracking.open_run("sweep-test", "second")
    out2 = pipeline.run(base, good, again, "sweep-test", "test")
    dag2 = out2["dag"]
    assert out2["trained"] == []
    assert sorted(dag2.cached) == sorted(f"{s}[{t.id}]" for s in ("predict", "calibrate", "evaluate") for t in good)
    assert children(client, again) == []  # no trial ran, so no new child runs
    pd.testing.assert_frame_equal(out2["comparison"], table.iloc[:2].drop(columns=["error"]).assign(error=""), check_like=True, check_dtype=False)

    # one evaluation knob changed: predictions stay cached, evaluations and the report rerun
    changed = base.with_overrides(["eval.num_budgets=3"])
    out3 = pipeline.run(changed, sweeps.expand(changed, grid={"boostnet.temperature": [0.0, 0.5]}), tracking.open_run("sweep-test", "third"), "sweep-test", "test")
    dag3 = out3["dag"]
    assert out3["trained"] == []
    assert sorted(dag3.cached) == ["predict[temperature=0.0]", "predict[temperature=0.5]"]
    assert sorted(n for n in dag3.ran if n.startswith(("calibrate", "evaluate"))) == [f"{s}[temperature={t}]" for s in ("calibrate", "evaluate") for t in ("0.0", "0.5")]
    assert sum(c.startswith("acc@") and not c.endswith("_se") for c in out3["comparison"].columns) == 3  # each with its _se column

    # a knob of evaluation only (BoostNet's flat-curve rule): the thresholds stay cached
    flat = changed.with_overrides(["eval.flat_curve=true"])
    dag4 = pipeline.run(flat, sweeps.expand(flat, grid={"boostnet.temperature": [0.0, 0.5]}), tracking.open_run("sweep-test", "fourth"), "sweep-test", "test")["dag"]
    assert sorted(n for n in dag4.cached if n.startswith("calibrate")) == ["calibrate[temperature=0.0]", "calibrate[temperature=0.5]"]
    assert sorted(n for n in dag4.ran if n.startswith("evaluate")) == ["evaluate[temperature=0.0]", "evaluate[temperature=0.5]"]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_its_trial_from_the_checkpoint(in_tmp, ray_local):
    base = config.cli_config([*TINY, "epochs=2", "run.max_failures=0"])  # no retries: the kill fails the trial
    trials = sweeps.expand(base, grid={"boostnet.temperature": [0.5]})
    killed = [sweeps.Trial(**{**t.__dict__, "config": t.cfg().with_overrides(["run.kill_after_epoch=0"]).to_dict()}) for t in trials]
    assert killed[0].train_key == trials[0].train_key  # fault injection does not change what is trained

    first_parent = tracking.open_run("resume-test", "first")
    first = sweeps.run(base, killed, first_parent, "resume-test")
    assert list(first.table["status"]) == ["error"] and first.trained == []

    parent = tracking.open_run("resume-test", "second")
    second = sweeps.run(base, trials, parent, "resume-test")
    assert list(second.table["status"]) == ["ok"] and second.trained == [trials[0].id]
    client = MlflowClient(tracking.tracking_uri())
    (child,) = children(client, parent)
    assert child.data.tags["dynlab.resumed_at_epoch"] == "1"  # epoch 1 was not trained again
    # one child run for the trial across both invocations: the failed one continued, re-pointed
    all_children = client.search_runs([parent.experiment_id], filter_string="tags.`dynlab.trial` = 'temperature=0.5'")
    assert [r.info.run_id for r in all_children] == [child.info.run_id]
    assert child.data.tags[tracking.PARENTS_TAG] == first_parent.run_id
    assert [m.step for m in client.get_metric_history(child.info.run_id, "best_score")] == [0, 1]
    assert second.table["best_epoch"].iloc[0] in (0, 1)


@pytest.mark.slow
def test_trials_asha_stops_early_are_results_not_failures(in_tmp, ray_local):
    """ASHA (sweep.asha): trials one at a time, the first a good one, so the weak two are stopped at
    the first rung. They are evaluated from their best checkpoint so far, noted in the table, their
    runs FINISHED; an unchanged re-run trains nothing; a re-run without ASHA trains them on."""
    from dynlab import cli, comparison

    base = config.cli_config([*TINY, "epochs=3", "sweep.asha=true", "sweep.max_concurrent=1"])
    trials = sweeps.expand(base, grid={"optim.lr": [0.1, 1e-6, 2e-6]})
    parent = tracking.open_run("asha", "first")
    out = pipeline.run(base, trials, parent, "asha", "test")
    parent.end()
    table = out["comparison"]
    assert list(table["status"]) == ["ok"] * 3 and cli.failed_trials(out) == []
    assert list(table["note"]) == ["", "stopped by ASHA after 1/3 epochs", "stopped by ASHA after 1/3 epochs"]
    assert table["acc_exit1"].notna().all()  # evaluated from their checkpoints
    assert "note: lr=1e-06: stopped by ASHA after 1/3 epochs" in comparison.format_table(table)
    client = MlflowClient(parent.uri)
    runs = children(client, parent)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert sorted(r.data.tags.get("dynlab.stopped_by_scheduler", "") for r in runs) == ["after the last epoch", "early, after epoch 1 of 3", "early, after epoch 1 of 3"]

    again = tracking.open_run("asha", "second")
    assert pipeline.run(base, trials, again, "asha", "test")["trained"] == []  # unchanged: served from the cache
    again.end()

    full = base.with_overrides(["sweep.asha=false"])
    third = tracking.open_run("asha", "third")
    out3 = pipeline.run(full, sweeps.expand(full, grid={"optim.lr": [0.1, 1e-6, 2e-6]}), third, "asha", "test")
    third.end()
    assert out3["trained"] == ["lr=1e-06", "lr=2e-06"]  # trained on to the configured epochs
    assert list(out3["comparison"]["note"]) == ["", "", ""]
    assert all(not sweeps.cached_training(sweeps.cache_root(full), t.train_key).get("stopped_early") for t in trials)
