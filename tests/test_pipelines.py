"""Each pipeline module's search space, checked without training (the sweep machinery itself is
exercised end to end in test_pipeline_sweep.py and test_job_submit.py)."""

import importlib

import pytest

from dynlab import config


@pytest.mark.parametrize(
    "module, args, expected",
    [
        ("ablation_temperature", [], {"temperature=0.0", "temperature=0.25", "temperature=0.5", "temperature=0.75", "temperature=1.0", "method=joint"}),
        ("ablation_temperature", ["sweep.values=[0.1]", "sweep.baseline=false"], {"temperature=0.1"}),
        ("ablation_batch_size", [], {"batch_size=32", "batch_size=64", "batch_size=128"}),
        ("ablation_batch_size", ["sweep.values=[16]"], {"batch_size=16"}),
        ("ablation_boostnet_gradients", [], {f"gradient_rescale={g}-trainable_prev={t}" for g in (True, False) for t in (False, True)}),
    ],
)
def test_search_spaces(module, args, expected):
    mod = importlib.import_module(f"pipelines.{module}")
    base = config.cli_config(args)
    trials = mod.trials(base)
    assert {t.id for t in trials} == expected
    assert len({t.train_key for t in trials}) == len(trials)  # every trial trains something different
    assert mod.title(base)


def test_trials_set_the_values_they_name():
    from pipelines import ablation_batch_size, ablation_boostnet_gradients

    for t in ablation_batch_size.trials(config.cli_config([])):
        assert f"batch_size={t.cfg().data.batch_size}" == t.id
    for t in ablation_boostnet_gradients.trials(config.cli_config([])):
        m = t.cfg().method_cfg
        assert t.id == f"gradient_rescale={m.gradient_rescale}-trainable_prev={m.trainable_prev}"


@pytest.mark.parametrize("module", ["train", "ablation_temperature", "ablation_batch_size", "ablation_boostnet_gradients", "reproduce_boostnet", "reproduce_dmnn", "reproduce_imta"])
def test_help_lists_the_config_keys(module, capsys):
    mod = importlib.import_module(f"pipelines.{module}")
    assert mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m pipelines." in out and "run.epochs" in out and "sweep.values" in out
