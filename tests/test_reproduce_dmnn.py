"""The DMNN reproduction: the paper's numbers as data, its settings per scale, the claim kinds a
dynamic network needs (matches the dense network at a lower cost; gates that route by category),
and (slow) the whole smoke-scale DAG with its report."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml

import methods  # noqa: F401  (fills the registries)
from dynlab import comparison, config, reproduce, steps
from dynlab.predictions import GatedPredictions
from dynlab.reproduce import Claim
from pipelines import reproduce_dmnn as rd
from tests.reports import reproduction_folder

PUBLISHED = yaml.safe_load(rd.PUBLISHED.read_text())


@pytest.mark.parametrize(
    "name, printed_ratios",
    [  # the "FLOPs Ratio (%)" column of Table 1, and Table 3's "with only 78.7% FLOPs" (its t = 0.7 row)
        ("table1-imagenet-resnet50", {"DMNN t=0.4": 52.3, "DMNN t=0.5": 57.6, "DMNN t=0.6": 63.6, "DMNN t=0.7": 78.8}),
        ("table1-imagenet-resnet101", {"DMNN t=0.3": 32.3, "DMNN t=0.5": 54.9, "DMNN t=0.7": 72.6}),
        ("table3-cifar100", {"DMNN t=0.7": 78.7}),
    ],
)
def test_the_copied_costs_give_the_ratios_the_paper_prints(name, printed_ratios):
    points = PUBLISHED["tables"][name]["points"]
    for label, ratio in printed_ratios.items():  # costs are printed to 2-3 digits: ratios agree to 0.3 points
        assert 100 * points[label]["cost"] / points["dense"]["cost"] == pytest.approx(ratio, abs=0.3), label


def test_paper_claims_come_from_the_papers_errors():
    table3 = {"tables": {"table3": PUBLISHED["tables"]["table3-cifar100"]}}
    # section 4.2: "DMNN-50 ... can even outperform ResNet-50 by 1.4% ... with only 78.7% FLOPs":
    # top-1 error 27.55 -> 26.15 is accuracy 72.45 -> 73.85, at 0.26 / 0.33 GFLOPs
    c = Claim("m", "table3", "DMNN t=0.7", "dense", kind="matches")
    assert reproduce.paper_claim(c, table3) == "Table 3: +1.40 at 0.79x the cost"
    assert reproduce.paper_claim(Claim("r", "table3", "DMNN t=0.7", "", kind="routes"), table3) == "no values printed (a plot)"
    ge = Claim("g", "table3", "DMNN t=0.7", "DMNN t=0.5")
    assert reproduce.paper_claim(ge, table3) == "Table 3: +2.09"  # 28.24 - 26.15


def _table(rows: list[tuple[str, float, float, float | None]], n_test: int = 10_000) -> pd.DataFrame:
    """A comparison table of gated trials: (label, accuracy %, MMACs, category spread or None)."""
    out = []
    for i, (label, acc, mmacs, spread) in enumerate(rows):
        row = {"trial": f"t{i}", "label": label, "status": "ok", "n_test": n_test, "acc_gated": acc, "acc_gated_se": comparison.binomial_se(acc, n_test), "mmacs_gated": mmacs}
        if spread is not None:
            row["spread_gated"] = spread
        out.append(row)
    return pd.DataFrame(out)


def _se(acc: float, n: int = 10_000) -> float:
    return math.sqrt(acc * (100 - acc) / n)  # percent: sqrt(p (1 - p) / n) x 100


def test_matches_holds_within_noise_at_a_lower_cost_and_fails_on_cost_or_accuracy():
    """The noise of a difference of two one-seed rows is the binomial SEs added in quadrature; a
    row matches when it is not below by more than 2 of them and costs less."""
    noise = math.sqrt(_se(70.0) ** 2 + _se(71.0) ** 2)  # about 0.64 points
    summary = comparison.summarize(_table([("dense", 71.0, 10.0, None), ("cheap", 70.0, 6.0, 0.3), ("dear", 70.5, 10.5, 0.3), ("worse", 71.0 - 2.5 * noise, 6.0, 0.3)]))
    verdict = lambda better: reproduce.claim_verdict(Claim("c", "e", better, "dense", kind="matches"), summary)  # noqa: E731
    assert verdict("cheap")["verdict"] == "holds" and "0.60x the cost" in verdict("cheap")["ours"]
    assert verdict("dear")["verdict"] == "reversed" and "1.05x the cost" in verdict("dear")["ours"]  # accurate enough, but costlier
    assert verdict("worse")["verdict"] == "reversed"  # cheaper, but below beyond noise
    assert reproduce.claim_verdict(Claim("c", "e", "cheap", "dense"), summary)["verdict"] == "within noise"  # as ">=": 1 point below is 1.6 SE


def test_routes_needs_every_seed_at_the_threshold():
    seeds = [("static", 70.0, 6.0, 0.45), ("static", 70.0, 6.0, 0.05), ("routes", 70.0, 6.0, 0.45), ("routes", 70.0, 6.0, 0.25)]
    summary = comparison.summarize(_table(seeds))
    verdict = lambda label: reproduce.claim_verdict(Claim("r", "e", label, "", kind="routes", threshold=0.2), summary)  # noqa: E731
    assert verdict("static")["verdict"] == "reversed"  # mean 0.25, but one seed's gates are nearly static
    assert verdict("routes")["verdict"] == "holds" and "0.35 (mean), 0.25 (lowest seed)" in verdict("routes")["ours"]
    # a routes claim needs only its own row; a comparison claim both
    e = reproduce.Experiment("e", "", {}, [reproduce.Row("routes", {})])
    assert [c.name for c in reproduce.claims_of([Claim("r", "e", "routes", "", kind="routes"), Claim("m", "e", "routes", "dense", kind="matches")], [e])] == ["r"]


def test_gate_spread_is_the_widest_gap_of_one_gates_rate_across_categories():
    """Two categories (digits' built-in grouping maps 0 -> closed loops, 1 -> straight strokes) and
    two gates: gate 0 open for every image; gate 1 open for 3 of 4 images of class 0 and 1 of 4 of
    class 1: rates 0.75 and 0.25, spread 0.5."""
    cfg = config.resolve({"method": "dmnn", "preset": "dmnn-resnet-small"})
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    gates = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [1, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.float32)
    preds = GatedPredictions(torch.zeros(8, 10), torch.ones(8), gates, subblocks=2, full_cost=1.0)
    assert steps.gate_spread(cfg, preds, labels) == pytest.approx(0.5)
    static = GatedPredictions(torch.zeros(8, 10), torch.ones(8), torch.ones(8, 2), subblocks=2, full_cost=1.0)
    assert steps.gate_spread(cfg, static, labels) == 0.0


def test_paper_scale_carries_the_papers_settings_and_table4_shares_table1s_trainings():
    base = config.resolve(reproduce.defaults_of(rd.SCALES["paper"]))
    trials = reproduce.make_trials(base, rd.SCALES["paper"], {})
    cfgs = {t.id: t.cfg() for t in trials}
    for tid, c in cfgs.items():
        assert (c.method, c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.run.use_gpu) == ("dmnn", 0.1, 0.9, 1e-4, True), tid
        if tid.startswith("table3"):  # section 4.1: 200 epochs, /10 at 100 and 150, batch 256, one GPU
            assert (c.data.name, c.preset, c.run.epochs, c.data.batch_size * c.run.num_workers, c.optim.nesterov, c.optim.schedule) == ("cifar100", "dmnn-resnet50", 200, 256, False, "multistep")
            assert [round(m * 200) for m in c.optim.milestones] == [100, 150]
        else:  # 120 epochs, Nesterov, cosine, 256 images a step
            assert (c.data.name, c.run.epochs, c.data.batch_size * c.run.num_workers, c.optim.nesterov, c.optim.schedule) == ("imagefolder", 120, 256, True, "cosine"), tid
    ablation = {t.id.split("controller-")[1]: t.cfg() for t in trials if "controller" in t.id}
    assert (ablation["neither"].backbone_cfg.controller_prev, ablation["neither"].method_cfg.categories) == (False, "none")
    assert (ablation["PREV"].backbone_cfg.controller_prev, ablation["PREV"].method_cfg.categories) == (True, "none")
    assert (ablation["CAT"].backbone_cfg.controller_prev, ablation["CAT"].method_cfg.categories) == (False, "auto")
    keys = {t.id: t.train_key for t in trials}  # the same trainings: trained once (sweeps.run)
    assert keys["table4-imagenet-controller-PREV+CAT"] == keys["table1-imagenet-resnet50-DMNNt=0.7"]
    assert keys["table4-imagenet-controller-dense"] == keys["table1-imagenet-resnet50-dense"]
    dense = cfgs["table3-cifar100-dense"]
    assert (dense.backbone_cfg.gated, dense.backbone_cfg.subblocks) == (False, 1)


def test_plan_runs_without_ray_or_the_data(capsys):
    assert rd.main(["scale=paper", "--plan", "repro.only=[table3-cifar100]", "repro.throughput=1e12"]) == 0
    out = capsys.readouterr().out
    assert "sweep (4 trials" in out and "table3-cifar100-DMNNt=0.7" in out and "GPU-hours at 1e+12" in out


@pytest.mark.slow
def test_smoke_scale_runs_the_whole_dag_and_reports_every_claim(in_tmp, ray_local, capsys):
    from mlflow import MlflowClient

    from dynlab import tracking

    assert rd.main(["scale=smoke"]) == 0
    out = capsys.readouterr().out
    assert "4 of 5 trials to train (0 cached, 1 sharing another trial's training)" in out  # PREV+CAT is t=0.7
    folder = reproduction_folder(rd.EXPERIMENT, "smoke", in_tmp / "artifacts")
    claims = pd.read_csv(f"{folder}/claims.csv")
    assert len(claims) == 6 and set(claims["verdict"]) <= {"holds", "within noise", "reversed"}
    paper = dict(zip(claims["claim"], claims["paper"]))
    assert paper["DMNN t=0.7 matches dense at lower cost (digits-resnet)"] == "Table 3: +1.40 at 0.79x the cost"
    assert paper["PREV+CAT >= neither (digits-controller)"] == "Table 4: +0.68"
    t = pd.read_csv(f"{folder}/experiments/digits-resnet.csv")
    assert list(t["row"]) == ["dense", "DMNN t=0.5", "DMNN t=0.7"]
    assert t["category spread (mean, lowest seed)"].iloc[0] == "- (no gates)" and t["x dense cost"].iloc[0] == 1.0
    md = open(f"{folder}/reproduction.md").read()
    assert "| DMNN t=0.6 | 0.22 | 72.66 | 0.667 |" in md  # the paper's Table 3 beneath ours
    assert "Table 4's check marks are lost" in md

    # a gated trial's run has the gates' report, by the categories DMNN trained with
    client = MlflowClient(tracking.tracking_uri())
    (child,) = client.search_runs(client.get_experiment_by_name(rd.EXPERIMENT).experiment_id, filter_string="tags.`dynlab.trial` = 'digits-resnet-DMNNt=0.5'")
    logged = {f.path for f in client.list_artifacts(child.info.run_id, "evaluation/gated")}
    expected = ["execution_rates.csv", "execution_rates.txt", "rates_by_category.csv", "rates_by_category.png", "rates_by_class.csv", "cost_distribution.csv", "cost_distribution.png"]
    assert {f"evaluation/gated/{n}" for n in expected} <= logged
    rates = pd.read_csv(client.download_artifacts(child.info.run_id, "evaluation/gated/rates_by_category.csv", str(in_tmp)))
    assert sorted(set(rates["category"])) == [0, 1, 2]  # digits: the 3 built-in groups DMNN trained with


def test_plan_counts_a_shared_training_once():
    scale = rd.SCALES["smoke"]
    base = config.resolve(reproduce.defaults_of(scale))
    plan = reproduce.plan_frame(base, reproduce.make_trials(base, scale, {})).set_index("trial")
    both, t07 = plan.loc["digits-controller-PREV+CAT"], plan.loc["digits-resnet-DMNNt=0.7"]
    assert both["settings"].startswith("(trained by)=digits-resnet-DMNNt=0.7")
    # the shared trial costs only its predictions (one forward pass over the 100 held-out images; the
    # plan counts no digits test images); the other trains too: 3 x 320 images x 2 epochs, plus the
    # held-out split each epoch and once more, 2,220 forward passes against 100
    assert both["training PMACs"] / t07["training PMACs"] == pytest.approx(100 / 2220, rel=1e-3)
    out = reproduce.plan_text(base, scale, reproduce.make_trials(base, scale, {}), {}, "plan")
    assert "1 trial(s) share another trial's training (the same config): trained once, 4 trainings in all." in out
