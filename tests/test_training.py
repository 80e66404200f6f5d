import pytest
import torch

from dynlab import config, evaluation, steps, training
from dynlab.predictions import GatedPredictions, SubnetPredictions
from tests.stand_ins import StandInSubnets  # noqa: F401  (registers the stand-in methods)

SMALL = ["dataset=synthetic", "data.synthetic_train=96", "data.synthetic_test=48", "data.synthetic_classes=3", "data.batch_size=16", "workers=0", "optim.lr=0.05"]


def test_lr_schedules():
    cfg = config.cli_config(["epochs=8", "optim.milestones=[0.5,0.75]"])
    assert [training.lr_factor(e, cfg) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = config.cli_config(["epochs=4", "optim.schedule=cosine"])
    assert [training.lr_factor(e, cos) for e in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    warm = config.cli_config(["epochs=4", "optim.schedule=constant", "optim.warmup_epochs=1"])
    assert [training.lr_factor(e, warm) for e in range(4)] == pytest.approx([0.5, 1, 1, 1])


@pytest.mark.parametrize(
    "epochs, factors",
    [
        (1, [1]),  # the only epoch at the full rate (was 0.1: round(0.5 * 1) = 0)
        (2, [1, 0.1]),  # one slot after epoch 0: the first milestone takes it
        (3, [1, 0.1, 0.01]),  # both milestones fell on epoch 2 (round(1.5) = round(2.25) = 2)
        (4, [1, 1, 0.1, 0.01]),
    ],
)
def test_lr_milestones_skip_epoch_zero_and_stay_distinct(epochs, factors):
    cfg = config.cli_config([f"epochs={epochs}", "optim.milestones=[0.5,0.75]"])
    assert [training.lr_factor(e, cfg) for e in range(epochs)] == pytest.approx(factors)


def test_milestone_epochs_rule():
    assert training.milestone_epochs([0.5, 0.75], 300) == [150, 225]  # the papers' schedule is unchanged
    assert training.milestone_epochs([0.1, 0.2, 0.3], 3) == [1, 2, 3]  # not enough epochs: the last never fires
    assert training.milestone_epochs([0.01], 10) == [1]


@pytest.mark.parametrize("method, kind", [("standin_subnets", SubnetPredictions), ("standin_gated", GatedPredictions)])
def test_loop_trains_and_evaluation_handles_every_prediction_shape(in_tmp, method, kind):
    StandInSubnets.backward_calls.clear()
    cfg = config.cli_config([f"method={method}", "epochs=2", *SMALL])
    result = training.fit(cfg, f"t-{method}")
    ckpt = in_tmp / "dynlab_runs" / f"t-{method}"
    assert sorted(p.name for p in ckpt.glob("epoch_*")) == ["epoch_0000", "epoch_0001"]
    assert result.metrics["epoch"] == 1 and 0 <= result.metrics["heldout/acc_mean"] <= 100
    if method == "standin_subnets":
        assert StandInSubnets.backward_calls and set(StandInSubnets.backward_calls) == {2}

    tables = steps.predict(cfg, result.checkpoint_dir, plugins=["tests.stand_ins"])
    ev = steps.evaluate(cfg, tables)
    preds, labels = evaluation.frame_to_predictions(tables.test, "test")
    assert isinstance(preds, kind) and len(labels) == 48
    assert ev.budgeted is None  # budgeted batch is for exits only
    if kind is SubnetPredictions:
        assert list(ev.anytime["name"]) == ["T", "F"]
        assert ev.anytime["cost"].iloc[0] < ev.anytime["cost"].iloc[1]
        for i, row in ev.anytime.iterrows():
            assert row["accuracy"] == pytest.approx((preds.logits[i].argmax(1) == labels).double().mean().item() * 100)
    else:
        assert len(ev.anytime) == 1
        assert ev.anytime["accuracy"].iloc[0] == pytest.approx((preds.logits.argmax(1) == labels).double().mean().item() * 100)
        assert ev.anytime["cost"].iloc[0] == pytest.approx(preds.costs.mean().item())


def test_in_process_run_resumes_from_its_last_checkpoint(in_tmp, capfd):
    cfg = config.cli_config(["method=joint", "msdnet.n_blocks=2", "epochs=1", *SMALL])
    first = training.fit(cfg, "resume-me")
    assert torch.load(f"{first.checkpoint_dir}/state.pt", weights_only=True)["epoch"] == 0
    capfd.readouterr()
    second = training.fit(cfg.with_overrides(["epochs=3"]), "resume-me")
    out = capfd.readouterr().out
    assert "resumed from checkpoint after epoch 1 of 3" in out
    assert "epoch 1/3" not in out and "epoch 2/3" in out and "epoch 3/3" in out  # epoch 1 not retrained
    state = torch.load(f"{second.checkpoint_dir}/state.pt", weights_only=True)
    assert state["epoch"] == 2
    assert sorted(p.name for p in (in_tmp / "dynlab_runs" / "resume-me").glob("epoch_*")) == ["epoch_0001", "epoch_0002"]


def test_best_checkpoint_uses_heldout_not_test(in_tmp):
    cfg = config.cli_config(["method=joint", "msdnet.n_blocks=2", "epochs=3", *SMALL])
    result = training.fit(cfg, "select")
    state = torch.load(f"{result.checkpoint_dir}/state.pt", weights_only=True)
    best = torch.load(f"{result.checkpoint_dir}/best.pt", weights_only=True)
    assert 0 <= state["best_epoch"] <= 2
    if state["best_epoch"] == 2:
        for k in best:
            torch.testing.assert_close(best[k], state["model"][k])
    assert result.metrics["best_score"] == pytest.approx(max(result.metrics["best_score"], result.metrics["heldout/acc_mean"]))


def test_long_epochs_print_progress_within_the_epoch(in_tmp, capfd, monkeypatch):
    monkeypatch.setattr(training, "PROGRESS_SECONDS", 0.0)
    cfg = config.cli_config(["method=joint", "msdnet.n_blocks=2", "epochs=1", *SMALL])
    training.fit(cfg, "progress")
    out = capfd.readouterr().out
    assert "epoch 1/1  step 1/" in out and "img/s" in out
