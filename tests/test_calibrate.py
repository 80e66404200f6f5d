"""Calibration as its own artifact: the thresholds file a calibrate step writes, fed to the real
early-exit engine, gives the exits (and costs) that the evaluation reports."""

import math

import pandas as pd
import pytest
import torch

from dynlab import config, evaluation, steps
from dynlab.early_exit import early_exit
from dynlab.registry import get_method
from tests.test_early_exit import build_tiny


@pytest.mark.parametrize("backbone", ["msdnet", "ranet"])
def test_thresholds_file_drives_the_real_engine_to_the_evaluated_exits(tmp_path, backbone):
    model = build_tiny("boostnet", backbone, dtype=torch.float32)
    method = get_method("boostnet").cls(config.cli_config(["method=boostnet", *(["backbone=ranet"] if backbone == "ranet" else [])]))
    g = torch.Generator().manual_seed(1)
    x_held, x_test = torch.randn(64, 3, 32, 32, generator=g), torch.randn(48, 3, 32, 32, generator=g)
    y_held, y_test = torch.randint(0, 10, (64,), generator=g), torch.randint(0, 10, (48,), generator=g)
    with torch.no_grad():
        held, test = method.predict(model, x_held), method.predict(model, x_test)
    costs = held.costs.double()
    budgets = [float(costs[0] + (costs[-1] - costs[0]) * f) for f in (0.2, 0.5, 0.8)]

    path = evaluation.save_thresholds(evaluation.calibrate_budgets(held, budgets, p_grid=True), tmp_path / "thresholds.json")
    calibration = evaluation.load_thresholds(path)
    assert list(calibration["mode"]).count("budget") == 3 and list(calibration["mode"]).count("pgrid") == 39
    assert all(math.isinf(row[-1]) and row[-1] < 0 for row in calibration["thresholds"])  # the last exit takes all
    table = evaluation.apply_thresholds(calibration, held, y_held, test, y_test)

    conf_t, _ = evaluation.confidence(test.logits)
    for row, result in zip(calibration.itertuples(), table.itertuples()):
        T = torch.tensor(row.thresholds, dtype=torch.float64)
        with torch.no_grad():
            real = early_exit(model, x_test, T)
        assert torch.equal(real.exit, evaluation.exit_indices(conf_t, T))
        assert float(costs[real.exit].mean()) == pytest.approx(result.test_cost, rel=1e-9)
        assert 100.0 * float((real.pred == y_test).double().mean()) == pytest.approx(result.test_accuracy, rel=1e-9)


def test_evaluation_from_a_saved_calibration_equals_calibrating_in_place(tmp_path):
    g = torch.Generator().manual_seed(2)
    held = evaluation.ExitPredictions(torch.randn(3, 80, 5, generator=g), torch.tensor([1e6, 2e6, 3e6]))
    test = evaluation.ExitPredictions(torch.randn(3, 60, 5, generator=g), torch.tensor([1e6, 2e6, 3e6]))
    yh, yt = torch.randint(0, 5, (80,), generator=g), torch.randint(0, 5, (60,), generator=g)
    tables = steps.PredictionTables(evaluation.predictions_frame(held, yh, "heldout"), evaluation.predictions_frame(test, yt, "test"), [])
    cfg = config.cli_config(["eval.num_budgets=3"])
    direct = steps.evaluate(cfg, tables).budgeted
    saved = evaluation.load_thresholds(evaluation.save_thresholds(steps.calibrate(cfg, tables), tmp_path / "t.json"))
    via_file = steps.evaluate(cfg, tables, saved).budgeted
    pd.testing.assert_frame_equal(direct, via_file)
    assert steps.calibrate(config.cli_config(["eval.num_budgets=0", "eval.p_grid=false"]), tables) is None


def test_imta_phase2_isc_thresholds_file_drives_the_real_engine_to_the_evaluated_exits(tmp_path):
    """The pipeline's path for an IMTA phase-II model with ISC (the engine carries exit k-1's logits):
    predictions (through Parquet, as predict_step writes them) -> steps.calibrate -> thresholds.json
    (calibrate_step) -> load_thresholds -> steps.evaluate (evaluate_step); the real early-exit engine
    fed each row of that file exits where the evaluation says, with its accuracy and cost."""
    from dynlab import training
    from tests.test_imta import build

    torch.manual_seed(0)
    _, _, p1 = build()  # a phase-I tiny MSDNet (4 exits), saved as the phase-II run's init_from
    (tmp_path / "phase1").mkdir()
    torch.save(p1.state_dict(), tmp_path / "phase1" / "best.pt")
    cfg, method, model = build("imta.phase=2", "imta.isc=true", f"run.init_from={tmp_path / 'phase1'}", "eval.num_budgets=4")
    method.load_init(model, training.read_weights(str(tmp_path / "phase1")), str(tmp_path / "phase1"))
    model.eval()
    for m in model.modules():  # random BN statistics (ISC's BN1d too), so that confidences spread over exits
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x_held, x_test = torch.randn(64, 3, 32, 32, generator=g), torch.randn(48, 3, 32, 32, generator=g)
    y_held, y_test = torch.randint(0, 10, (64,), generator=g), torch.randint(0, 10, (48,), generator=g)
    with torch.no_grad():
        held, test = method.predict(model, x_held), method.predict(model, x_test)
    assert torch.equal(test.costs.double(), torch.tensor(model.cost_table.macs, dtype=torch.float64))  # ISC counted
    for split, preds, labels in (("heldout", held, y_held), ("test", test, y_test)):
        evaluation.predictions_frame(preds, labels, split).to_parquet(tmp_path / f"{split}.parquet", index=False)
    tables = steps.PredictionTables(pd.read_parquet(tmp_path / "heldout.parquet"), pd.read_parquet(tmp_path / "test.parquet"), list(range(64)))

    path = evaluation.save_thresholds(steps.calibrate(cfg, tables), tmp_path / "thresholds.json")  # calibrate_step
    thresholds = evaluation.load_thresholds(path)  # evaluate_step
    budgeted = steps.evaluate(cfg, tables, thresholds).budgeted
    assert list(thresholds["mode"]).count("budget") == 4 and len(budgeted) == len(thresholds) == 4 + 39

    costs = test.costs.double()
    spread = 0
    for row, result in zip(thresholds.itertuples(), budgeted.itertuples()):
        assert result.thresholds == row.thresholds
        with torch.no_grad():
            real = early_exit(model, x_test, torch.tensor(row.thresholds, dtype=torch.float64))
        counts = torch.bincount(real.exit, minlength=4).double()
        assert (counts / len(y_test)).tolist() == pytest.approx(result.exit_fraction, abs=1e-12)
        assert float(costs[real.exit].mean()) == pytest.approx(result.test_cost, rel=1e-9)
        assert 100.0 * float((real.pred == y_test).double().mean()) == pytest.approx(result.test_accuracy, rel=1e-9)
        spread = max(spread, int((counts > 0).sum()))
    assert spread >= 3  # some operating point sends the test samples to three exits or more
