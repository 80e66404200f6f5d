"""pipelines.compare_methods: every method's row, once per seed, with the keys that make it; the
early-exit rows share their budgets; IMTA's phase II starts from its own seed's phase I. (The whole
run is measured by hand: README "Comparing the methods".)"""

from __future__ import annotations

import methods  # noqa: F401  (fills the registries)
from dynlab import config, sweeps
from pipelines import compare_methods as cm


def test_every_method_once_per_seed_with_shared_budgets_and_imta_in_two_stages():
    argv, given = cm.split_args(cm.with_defaults(["boostnet.temperature=0.25", "imta.alpha=0.7", "adn_resnet.width=8", "method=dmnn"]))
    assert argv == [f"run.epochs={cm.DEFAULT_EPOCHS}", f"sweep.repeats={cm.DEFAULT_REPEATS}"]  # the rows' own keys go to the rows
    cfg = config.cli_config(argv)
    every = cm.trials(cfg, given)
    by = {t.id: t.cfg() for t in every}
    assert set(by) == {f"{label}{s}" for label in ("BoostNet", "joint", "DMNN", "ADN", "IMTA-phase1", "IMTA") for s in ("-seed0", "-seed1")}
    assert [by[f"{m}-seed0"].method for m in ("BoostNet", "joint", "DMNN", "ADN", "IMTA")] == ["boostnet", "joint", "dmnn", "adn", "imta"]
    assert by["BoostNet-seed0"].method_cfg.temperature == 0.25 and by["IMTA-seed1"].method_cfg.alpha == 0.7  # a method's own keys reach its row
    assert by["ADN-seed0"].backbone_cfg.width == 8 and by["joint-seed0"].backbone == "msdnet"
    assert by["DMNN-seed1"].run.seed == 1 and by["DMNN-seed0"].run.epochs == cm.DMNN_DEFAULT_EPOCHS and by["ADN-seed0"].run.epochs == cm.DEFAULT_EPOCHS
    budgets = {tuple(by[f"{m}-seed0"].eval.budgets) for m in ("BoostNet", "joint", "IMTA")}
    assert len(budgets) == 1 and len(next(iter(budgets))) == cfg.eval.num_budgets  # one set of budget columns
    assert by["DMNN-seed0"].eval.budgets == [] and by["ADN-seed0"].eval.budgets == []
    phase1 = {t.id: t for t in every}
    for s in ("-seed0", "-seed1"):
        assert by[f"IMTA{s}"].run.init_from.endswith(phase1[f"IMTA-phase1{s}"].train_key) and by[f"IMTA{s}"].method_cfg.phase == 2
        assert (by[f"IMTA{s}"].method_cfg.isc, by[f"IMTA{s}"].method_cfg.ofa) == (True, True) and by[f"IMTA-phase1{s}"].method_cfg.gradient_equilibrium
    stages = cm.stages(every)
    assert [(s.name, len(s.trials), s.compare, s.after) for s in stages] == [("methods", 8, True, None), ("imta-phase1", 2, False, None), ("imta-phase2", 2, True, "imta-phase1")]
    assert len({t.train_key for t in every}) == len(every)  # no two rows are the same training
    assert all(isinstance(t, sweeps.Trial) for t in every)
