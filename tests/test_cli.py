"""The command-line entry end to end: what a run that finds bad input late leaves, the anytime-only
run on the full training set, unique run names, and errors that come back from Ray workers."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from dynlab import cli, config, tracking
from dynlab.errors import ConfigError, DataError, input_error
from pipelines import train

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "epochs=1"]


def runs_of(experiment: str):
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_worker_errors_are_found_inside_ray_train_wrappers():
    from ray.train.v2.api.exceptions import WorkerGroupError

    err = ConfigError("data.heldout", 5000, "fewer")
    wrapped = WorkerGroupError("rank 0 failed", {0: RuntimeError("x"), 1: err})
    assert input_error(wrapped) is err
    try:
        try:
            raise DataError("bad image")
        except DataError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert isinstance(input_error(outer), DataError)
    assert input_error(RuntimeError("a bug")) is None


def test_generated_run_names_are_unique_within_a_second():
    cfg = config.resolve()
    names = {cli.run_name(cfg, "dynlab-train") for _ in range(50)}
    assert len(names) == 50


@pytest.mark.slow
def test_full_training_set_with_anytime_evaluation_finishes(in_tmp, ray_local, capsys):
    # the reference anytime setup: no held-out split, the last epoch's weights, anytime evaluation only
    args = [*TINY, "data.heldout=0", "run.select=last", "eval.num_budgets=0", "eval.p_grid=false", "run.name=full"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "Anytime (test accuracy %" in out and "Budgeted batch" not in out
    (run,) = runs_of("dynlab-train")
    assert run.info.status == "FINISHED"
    client = MlflowClient(tracking.tracking_uri())
    assert len(client.get_metric_history(run.info.run_id, "anytime/test_accuracy")) == 2  # two exits
    assert client.get_metric_history(run.info.run_id, "budgeted_budget/test_accuracy") == []


@pytest.mark.slow
def test_corrupt_image_found_by_a_worker_is_one_line_and_a_failed_run(in_tmp, ray_local, capsys, monkeypatch):
    from PIL import Image

    from dynlab import data

    for split in ("train", "val"):
        for c in ("a", "b"):
            (in_tmp / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.effect_noise((8, 8), 64).convert("RGB").save(in_tmp / "data" / split / c / f"{i}.png")
    cut = in_tmp / "data" / "train" / "b" / "2.png"
    cut.write_bytes(cut.read_bytes()[:150])  # the header is whole (the index and the sizes are fine); the pixels are not
    monkeypatch.setattr(data, "DECODE_SAMPLE", 0)  # as in a large data set: the file lies beyond the driver's decoded sample
    args = [*TINY, "dataset=imagefolder", f"data.root={in_tmp / 'data'}", "data.heldout=2", "batch_size=2", "eval.num_budgets=1", "run.max_failures=0", "run.name=corrupt"]
    assert train.main(args) == 2
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2.png cannot be read" in errors[0] and "Traceback" not in out
    (run,) = runs_of("dynlab-train")
    assert run.info.status == "FAILED"
    assert "2.png cannot be read" in run.data.tags["dynlab.error"]


@pytest.mark.parametrize("heldout", [True, False])
def test_no_budgets_and_no_p_grid_means_anytime_only(heldout):
    import pandas as pd
    import torch

    from dynlab import evaluation, steps
    from dynlab.predictions import ExitPredictions

    g = torch.Generator().manual_seed(0)
    preds = ExitPredictions(torch.randn(3, 40, 5, generator=g), torch.tensor([1e6, 2e6, 3e6]))
    labels = torch.randint(0, 5, (40,), generator=g)
    frame = evaluation.predictions_frame(preds, labels, "test")
    tables = steps.PredictionTables(frame.assign(split="heldout") if heldout else pd.DataFrame(), frame, [])
    cfg = config.cli_config(["eval.num_budgets=0", "eval.p_grid=false"] + ([] if heldout else ["data.heldout=0"]))
    ev = steps.evaluate(cfg, tables)
    assert ev.budgeted is None
    assert list(ev.anytime["accuracy"]) == pytest.approx([100.0 * int((preds.logits[e].argmax(-1) == labels).sum()) / 40 for e in range(3)])


@pytest.mark.slow
def test_a_sweep_whose_trial_failed_exits_non_zero_and_names_it(in_tmp, ray_local, capsys):
    from pipelines import ablation_temperature

    args = [*TINY, "sweep.values=[0.5]", "sweep.baseline=false", "data.heldout=100", "eval.num_budgets=1", "run.kill_after_epoch=0", "run.max_failures=0"]
    assert ablation_temperature.main(args) == 1
    out = capsys.readouterr().out
    assert "error: 1 trial(s) did not finish:" in out and "temperature=0.5: error" in out
    assert "finished. MLflow run" not in out
    parents = [r for r in runs_of("ablation_temperature") if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"]
    assert "temperature=0.5" in parents[0].data.tags["dynlab.error"]
