"""End to end through the real stack: a local Ray, Ray Train workers, MLflow on SQLite."""

import pytest
import torch
from mlflow import MlflowClient

from dynlab import tracking
from pipelines import train

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "data.batch_size=64", "eval.num_budgets=3"]


def only_run(name):
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name("dynlab-train")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TRAIN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
def test_two_worker_ddp_run_trains_evaluates_and_logs(in_tmp, ray_local):
    assert train.main(["workers=2", "run.cpus_per_worker=0.5", "epochs=2", "run.name=ddp", *TINY]) == 0
    client, run = only_run("ddp")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dynlab.world_size"] == "2"
    assert run.data.params["boostnet.temperature"] == "0.5" and run.data.params["run.num_workers"] == "2"
    for key in ("heldout/acc_out0", "heldout/acc_out1", "train/acc_exit1", "train/loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
    curve = client.get_metric_history(run.info.run_id, "anytime/test_accuracy")
    assert len(curve) == 2 and curve[0].step < curve[1].step  # step = cumulative cost (kMACs) per exit
    assert len(client.get_metric_history(run.info.run_id, "budgeted_budget/test_accuracy")) == 3
    artifacts = {f.path for d in ("", "predictions", "evaluation", "checkpoint", "data") for f in client.list_artifacts(run.info.run_id, d or None)}
    for path in ("config.yaml", "predictions/heldout.parquet", "predictions/test.parquet", "evaluation/curves.png", "evaluation/anytime.parquet", "evaluation/budgeted.parquet", "checkpoint/best.pt", "data/heldout_indices.json"):
        assert path in artifacts
    local = client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(in_tmp))
    state = torch.load(local, weights_only=True)
    assert any(k.startswith("backbone.") for k in state)


@pytest.mark.slow
def test_worker_killed_after_an_epoch_is_retried_from_its_checkpoint(in_tmp, ray_local, capfd):
    """run.max_failures (default 3): the killed worker group restarts from its last checkpoint and
    the run simply finishes, every epoch logged once. The kill fires once (not again on the retry)."""
    assert train.main(["epochs=2", "run.name=killed", "run.kill_after_epoch=0", *TINY]) == 0
    client, run = only_run("killed")
    assert run.info.status == "FINISHED"
    assert run.data.tags["dynlab.resumed_at_epoch"] == "1"  # epoch 0 was not trained again
    assert [m.step for m in client.get_metric_history(run.info.run_id, "heldout/acc_mean")] == [0, 1]
    assert "resumed from checkpoint after epoch 1 of 2" in capfd.readouterr().out
