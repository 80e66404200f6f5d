"""pipelines.ablation_imta: the five rows, phase I shared and keyed apart from phase-II knobs; one
end-to-end run (slow) counting the trainings."""

from __future__ import annotations

from pathlib import Path

import pytest

import methods  # noqa: F401
from dynlab import config, sweeps
from dynlab.errors import ConfigError
from pipelines import ablation_imta


def base(*args: str):
    return config.cli_config(["method=imta", *args])


def test_rows_share_phase1_and_point_at_its_cache_entry():
    cfg = base("epochs=10")
    rows = {t.id: t for t in ablation_imta.trials(cfg)}
    assert list(rows) == ["none", "GE", "ISC", "OFA", "all", "control"]
    c = {k: t.cfg() for k, t in rows.items()}
    assert [c[k].method_cfg.phase for k in rows] == [1, 1, 2, 2, 2, 2]
    assert (c["none"].method_cfg.gradient_equilibrium, c["GE"].method_cfg.gradient_equilibrium) == (False, True)
    cache = sweeps.cache_root(cfg) / "train"
    assert c["ISC"].run.init_from == c["OFA"].run.init_from == c["control"].run.init_from == str(cache / rows["none"].train_key)
    assert c["all"].run.init_from == str(cache / rows["GE"].train_key)
    assert [(c[k].method_cfg.isc, c[k].method_cfg.ofa) for k in ("ISC", "OFA", "all", "control")] == [(True, False), (False, True), (True, True), (False, False)]
    # the control is the ISC and OFA rows' phase II without either: same epochs, schedule, classifiers
    same = ("run.epochs", "run.init_from", "optim.milestones", "optim.lr", "imta.classifier_init", "imta.freeze")
    assert all(c["control"].flat()[k] == c["ISC"].flat()[k] == c["OFA"].flat()[k] for k in same)
    assert c["ISC"].run.epochs == 6 and c["none"].run.epochs == 10  # phase II: 0.6 of the epochs
    assert rows["all"].label.startswith("GE+ISC+OFA") and len({t.train_key for t in rows.values()}) == 6
    assert rows["control"].label.startswith("control") and "(vs none, control)" in rows["ISC"].label  # what each row is for
    labels = {t.label for t in rows.values()}
    assert all(e.better in labels and e.worse in labels for e in ablation_imta.EFFECTS)
    assert {(e.better.split(" ")[0], e.worse.split(" ")[0]) for e in ablation_imta.EFFECTS} >= {("ISC", "none"), ("ISC", "control:"), ("OFA", "none"), ("OFA", "control:")}


def test_phase2_knobs_never_change_phase1():
    a = {t.id: t.train_key for t in ablation_imta.trials(base())}
    b = {t.id: t.train_key for t in ablation_imta.trials(base("imta.alpha=0.5", "imta.temperature=3", "imta.isc_detach=false"))}
    assert a["none"] == b["none"] and a["GE"] == b["GE"]  # phase I is not retrained
    assert all(a[k] != b[k] for k in ("ISC", "OFA", "all"))  # isc_detach reaches ISC, alpha and T the OFA rows
    seeds = ablation_imta.trials(base("sweep.repeats=2"))
    assert [t.id for t in seeds][:5] == ["none-seed0", "GE-seed0", "ISC-seed0", "OFA-seed0", "all-seed0"]
    assert seeds[8].id == "ISC-seed1" and Path(seeds[8].cfg().run.init_from).name == seeds[6].train_key  # seed 1's ISC on seed 1's phase I
    c = {t.id: t for t in ablation_imta.trials(base("imta.phase2_epochs=3"))}
    assert c["none"].train_key == a["none"] and c["GE"].train_key == a["GE"]  # phase II's own epochs: phase I unchanged
    assert c["ISC"].cfg().run.epochs == 3 and c["none"].cfg().run.epochs == base().run.epochs


def test_the_dag_chains_phase2_after_phase1():
    """Two declared stages: one sweep step each, phase II's after phase I's; every row predicted
    from the step that trained it; without compare_phase1, phase I is trained but not evaluated."""
    from dynlab import pipeline, tracking
    from pipelines import imta_common

    rows = ablation_imta.trials(base())
    parent = tracking.RunHandle("sqlite:///unused.db", "run", "0")
    steps = {s.name: s for s in pipeline.build(base(), imta_common.stages(rows), parent, "x", "t", ["methods"])}
    assert [n for n in steps if n.startswith("sweep")] == ["sweep[phase1]", "sweep[phase2]"]
    assert steps["sweep[phase2]"].inputs == {"upstream": "sweep[phase1]"} and steps["sweep[phase1]"].inputs == {}
    assert steps["predict[none]"].inputs["trained"] == ("sweep[phase1]", "none")
    assert steps["predict[all]"].inputs["trained"] == ("sweep[phase2]", "all")
    assert set(steps["report"].inputs) == {"s0", "s1", *(f"e{i}" for i in range(6))}
    only2 = {s.name for s in pipeline.build(base(), imta_common.stages(rows, compare_phase1=False), parent, "x", "t", ["methods"])}
    assert "sweep[phase1]" in only2 and "predict[none]" not in only2 and "predict[ISC]" in only2


def test_a_phase2_trial_whose_phase1_failed_is_not_started():
    from dynlab import pipeline

    rows = {t.id: t for t in ablation_imta.trials(base())}
    upstream = {
        "none": {"status": "failed", "train_key": rows["none"].train_key},
        "GE": {"status": "ok", "train_key": rows["GE"].train_key},
        "trained": ["GE"],
    }
    blocked = pipeline.blocked_trials([rows[k] for k in ("ISC", "OFA", "all")], upstream)
    assert blocked == {"ISC": "not started: the trial it starts from (none) failed", "OFA": "not started: the trial it starts from (none) failed"}
    with pytest.raises(ValueError, match="'after' must name an earlier stage"):
        pipeline.as_stages([pipeline.Stage("b", [], after="a"), pipeline.Stage("a", [])])


def test_bad_input_is_refused_before_anything_runs(in_tmp, capsys):
    with pytest.raises(ConfigError, match="imta"):
        ablation_imta.trials(config.cli_config(["method=joint"]))
    assert ablation_imta.main(["imta.alpha=2"]) == 2
    assert "imta.alpha" in capsys.readouterr().out
    assert ablation_imta.main(["--help"]) == 0
    from pipelines import sweep_imta_distillation

    assert sweep_imta_distillation.main(["imta.temperature=0"]) == 2
    assert "imta.temperature" in capsys.readouterr().out
    assert sweep_imta_distillation.main(["--help"]) == 0 and "sweep.num_samples" in capsys.readouterr().out


@pytest.mark.slow
def test_one_phase1_training_serves_two_phase2_trials(in_tmp, ray_local):
    """The ablation's none -> ISC, OFA lineage through the real sweeps (3 of its 6 rows, for time)."""
    from dynlab import tracking
    from pipelines import imta_common

    cfg = base("msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "epochs=1", "eval.num_budgets=2", "eval.p_grid=false", "sweep.max_concurrent=2")
    rows = [t for t in ablation_imta.trials(cfg) if t.id in ("none", "ISC", "OFA")]
    parent = tracking.open_run("imta-test", "first")
    out = imta_common.run(cfg, parent, "imta-test", rows, "test")
    parent.end()
    assert list(out["comparison"]["status"]) == ["ok"] * 3
    assert out["trained"] == ["ISC", "OFA", "none"]  # three trainings: phase I once for both phase-II rows
    assert len(list((sweeps.cache_root(cfg) / "train").iterdir())) == 3
    assert out["figure"] and list(out["summary"]["label"]) == [ablation_imta.ROWS[k][0] for k in ("none", "ISC", "OFA")]
    assert out["dag"]["sweep[phase1]"]["none"]["checkpoint_dir"] == str(Path(rows[1].cfg().run.init_from))
    assert out["dag"].record("sweep[phase2]").status == "ran"


def test_distillation_sweep_shares_one_phase1():
    from pipelines import sweep_imta_distillation as sweep

    rows = sweep.trials(base("epochs=5"))
    assert [t.id for t in rows][0] == "phase1" and len(rows) == 1 + 3 * 2  # alpha grid x T grid
    first, rest = rows[0], [t.cfg() for t in rows[1:]]
    assert {c.run.init_from for c in rest} == {str(sweeps.cache_root(base()) / "train" / first.train_key)}
    assert {(c.method_cfg.alpha, c.method_cfg.temperature) for c in rest} == {(a, t) for a in (0.1, 0.5, 0.9) for t in (1.0, 3.0)}
    assert all(c.method_cfg.isc and c.method_cfg.ofa and c.method_cfg.phase == 2 and c.run.epochs == 3 for c in rest)
    rnd = sweep.trials(base("sweep.num_samples=3", "sweep.repeats=2"))
    ids = [t.id for t in rnd]
    assert len(ids) == 2 * (1 + 3) and ids[0] == "phase1-seed0" and ids[4] == "phase1-seed1"
    pts0 = [(t.cfg().method_cfg.alpha, t.cfg().method_cfg.temperature) for t in rnd[1:4]]
    pts1 = [(t.cfg().method_cfg.alpha, t.cfg().method_cfg.temperature) for t in rnd[5:8]]
    assert pts0 == pts1 and all(0 <= a <= 1 and 0.5 <= T <= 8 for a, T in pts0)  # the same points for every seed
    assert Path(rnd[5].cfg().run.init_from).name == rnd[4].train_key
    with pytest.raises(ConfigError, match="imta.alpha"):
        sweep.trials(base("sweep.values=[0.5,1.5]"))


def test_rows_share_one_set_of_budgets_inside_every_rows_costs():
    from dynlab import registry
    from dynlab.data import static_info

    rows = ablation_imta.trials(base("eval.num_budgets=3"))
    budgets = {tuple(t.cfg().eval.budgets) for t in rows}
    assert len(budgets) == 1 and len(next(iter(budgets))) == 3  # one column per budget in the comparison
    p1 = registry.get_method("imta").cls(rows[0].cfg()).build_model(static_info("digits")).cost_table.mmacs
    lo, hi = p1[0], p1[-1]
    assert all(lo < b < hi for b in next(iter(budgets)))  # inside phase I's range, hence every row's
    assert [t.train_key for t in rows] == [t.train_key for t in ablation_imta.trials(base("eval.num_budgets=5"))]
