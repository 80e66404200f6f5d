"""A loss that becomes NaN or infinite stops training with one line naming the epoch, the step and
the keys to look at; the run ends FAILED and nothing of the diverged epoch is kept or selected."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from dynlab import config, training
from dynlab.errors import TrainingDiverged

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "eval.num_budgets=2", "eval.p_grid=false"]


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-each-step", "read-at-sync-points"])
def test_the_first_non_finite_loss_names_its_epoch_and_step(deferred):
    cfg = config.cli_config(["optim.lr=1e6"])
    watch = training.LossWatch(torch.device("cpu"), deferred=deferred)
    losses = [torch.tensor(2.3), torch.tensor(1e30), torch.tensor(float("nan")), torch.tensor(float("inf"))]

    def run():
        for step, loss in enumerate(losses):
            watch.step(loss, step, epoch=2, steps=len(losses), cfg=cfg)
        watch.check(epoch=2, steps=len(losses), cfg=cfg)

    with pytest.raises(TrainingDiverged) as info:
        run()
    line = str(info.value)
    assert "\n" not in line and "the loss is nan at epoch 3, step 3 of 4" in line  # the first bad step, 1-based
    for key in ("optim.lr (now 1e+06)", "run.amp (now none", "run.grad_clip (now 0, off)", "data.batch_size (now 64)"):
        assert key in line, line


def test_finite_losses_pass_and_plain_numbers_are_checked_too():
    cfg = config.cli_config([])
    watch = training.LossWatch(torch.device("cpu"), deferred=True)
    for step in range(3):
        watch.step(torch.tensor(1.0 / (step + 1)), step, 0, 3, cfg)
    watch.check(0, 3, cfg)
    watch.step(None, 0, 0, 3, cfg)  # a method without a loss metric
    with pytest.raises(TrainingDiverged, match="the loss is inf at epoch 1, step 2"):
        training.LossWatch(torch.device("cpu")).step(math.inf, 1, 0, 3, cfg)


@pytest.mark.slow  # in-process training still starts Ray (Ray Train's local mode)
def test_a_diverging_run_fails_with_one_line_and_keeps_nothing(in_tmp, capsys):
    """optim.lr=1e6 ended FINISHED with a checkpoint of NaN weights; now: exit 2, one error line,
    the MLflow run FAILED, no checkpoint (so no best.pt) of the diverged epoch."""
    from pipelines import train

    storage = in_tmp / "runs"
    rc = train.main([*TINY, "workers=0", "epochs=2", "optim.lr=1e6", "run.name=diverged", f"run.storage_path={storage}"])
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, out
    assert "training diverged: the loss is nan at epoch 1, step" in errors[0] and "optim.lr (now 1e+06)" in errors[0]
    assert "marked FAILED" in out
    assert not list(storage.rglob("epoch_*")) and not list(storage.rglob(training.BEST_FILE))
    c = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("dynlab-train").experiment_id])
    assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["dynlab.error"]


@pytest.mark.slow
def test_a_diverging_sweep_trial_is_failed_not_cached(in_tmp, capsys):
    """In a sweep the trial ends with its line (no Tune restart: it would diverge again) and
    publishes nothing: the next invocation trains it again rather than serve NaN weights."""
    from pipelines import ablation_temperature

    storage = in_tmp / "runs"
    rc = ablation_temperature.main([*TINY, "data.heldout=200", "epochs=1", "optim.lr=1e6", "sweep.values=[0.5]", "sweep.baseline=false", f"run.storage_path={storage}"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "1 trial(s) did not finish" in out and "training diverged: the loss is nan at epoch 1" in out
    assert not (storage / "cache" / "train").exists() or not any((storage / "cache" / "train").iterdir())
    c = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("ablation_temperature").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the parent and the trial's child run
