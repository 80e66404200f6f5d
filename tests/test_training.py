import dataclasses

import pytest
import torch

from dynlab import config, evaluation, steps, training
from dynlab.predictions import GatedPredictions, SubnetPredictions
from dynlab.registry import register_method
from tests.stand_ins import StandInSubnets, TwoDepthConfig  # noqa: F401  (registers the stand-in methods)

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


def test_a_full_disk_while_checkpointing_names_the_path_and_leaves_no_partial_checkpoint(in_tmp, monkeypatch):
    """Fault 5 for checkpoints: ENOSPC while epoch 2's checkpoint is written. The error names the
    folder; nothing half-written is left for a resume to read; the same command, once there is
    space, resumes after epoch 1 and finishes."""
    import errno
    import os

    from dynlab.errors import StorageError

    cfg = config.cli_config(["method=joint", "msdnet.n_blocks=2", "epochs=2", *SMALL])
    real_save, writes = torch.save, []

    def full_at_epoch_two(obj, f, *a, **kw):
        writes.append(str(f))
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            real_save(obj, f, *a, **kw)  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_at_epoch_two)
    root = in_tmp / "dynlab_runs" / "full-disk"
    with pytest.raises(StorageError, match=r"checkpoint of epoch 2 into .*full-disk/\.partial_epoch_0001: No space left on device"):
        training.fit(cfg, "full-disk")
    left = sorted(p.name for p in root.iterdir() if p.name.startswith((".partial", "epoch_")))
    assert left == ["epoch_0000"]

    monkeypatch.setattr(torch, "save", real_save)
    again = training.fit(cfg, "full-disk")
    assert torch.load(f"{again.checkpoint_dir}/state.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".partial", "epoch_"))) == ["epoch_0000", "epoch_0001"]
    print(f"[faults] full disk while checkpointing: 1 injected write failure, partial checkpoints left {len(left) - 1}, resumed after epoch 1, 2/2 epochs")


HELDOUT_CLASS, TEST_CLASS = 1, 2
SCRIPT = [0, HELDOUT_CLASS, TEST_CLASS]  # the class every image is given in epoch 0, 1, 2


class EpochScripted(torch.nn.Module):
    """Gives every image the class SCRIPT[epoch]: which epoch scores best on which split is known."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("epochs_started", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        if mode:  # the loop calls model.train() once at the start of every epoch
            self.epochs_started += 1
        return super().train(mode)


@register_method("standin_scripted", TwoDepthConfig)
class StandInScripted:
    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self, info):
        return EpochScripted()

    def train_step(self, model, batch, backward):
        loss = (model.w**2).sum() + 1.0
        backward(loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, model, images):
        cls = SCRIPT[int(model.epochs_started) - 1]
        logits = torch.nn.functional.one_hot(torch.full((len(images),), cls), 3).float()
        return GatedPredictions(logits, torch.ones(len(images), dtype=torch.float64))


class Relabelled(torch.utils.data.Dataset):
    def __init__(self, dataset, label: int):
        self.dataset, self.label = dataset, label

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], self.label


def test_best_checkpoint_uses_heldout_not_test(in_tmp, monkeypatch):
    """Held-out favours epoch 1, test favours epoch 2 (also the last): only selection on held-out
    picks epoch 1."""
    from dynlab import data as data_mod
    from dynlab import tracking

    build = data_mod.build_datasets
    monkeypatch.setattr(data_mod, "build_datasets", lambda cfg, seed: dataclasses.replace(b := build(cfg, seed), heldout=Relabelled(b.heldout, HELDOUT_CLASS), test=Relabelled(b.test, TEST_CLASS)))
    cfg = config.cli_config(["method=standin_scripted", "epochs=3", *SMALL])
    handle = tracking.open_run("select-test", "select")
    result = training.fit(cfg, "select", tracking=handle.as_payload())
    history = tracking.client().get_metric_history(handle.run_id, "heldout/acc_mean")
    heldout_curve = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert heldout_curve == [0.0, 100.0, 0.0]
    state = torch.load(f"{result.checkpoint_dir}/state.pt", weights_only=True)
    assert state["best_epoch"] == max(range(3), key=heldout_curve.__getitem__) == 1
    test_acc = {}
    for which in ("best.pt", "state.pt"):
        method, model = training.load_trained(cfg, result.checkpoint_dir, data_mod.build_datasets(cfg.data, 0).info, which)
        preds, labels = training.predict_dataset(method, model, data_mod.build_datasets(cfg.data, 0).test, 64, torch.device("cpu"))
        test_acc[which] = (preds.logits.argmax(1) == labels).double().mean().item()
    assert test_acc == {"best.pt": 0.0, "state.pt": 1.0}  # the test set would have picked the last epoch


def test_long_epochs_print_progress_within_the_epoch(in_tmp, capfd, monkeypatch):
    monkeypatch.setattr(training, "PROGRESS_SECONDS", 0.0)
    cfg = config.cli_config(["method=joint", "msdnet.n_blocks=2", "epochs=1", *SMALL])
    training.fit(cfg, "progress")
    out = capfd.readouterr().out
    assert "epoch 1/1  step 1/" in out and "img/s" in out
