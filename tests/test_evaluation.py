"""Evaluation engine: reference threshold rule, budgets, tables and round trips."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dynlab.evaluation import (
    anytime,
    budget_point,
    budgeted,
    calibrate,
    calibrate_many,
    confidence,
    exit_indices,
    frame_to_predictions,
    geometric_distribution,
    geometric_expected_cost,
    predictions_frame,
    solve_q,
)
from dynlab.predictions import ExitPredictions, GatedPredictions, SubnetPredictions



# ----------------------------------------------------------------------------------------------
# plain-Python reference, written straight from REFERENCE.md section 2, steps 3 and 4
# ----------------------------------------------------------------------------------------------


def loop_thresholds(conf: torch.Tensor, P) -> list[float]:
    conf = conf.tolist()
    E, N = len(conf), len(conf[0])
    exited = [False] * N
    thresholds = []
    for k in range(E - 1):
        n_k = math.floor(N * float(P[k]))
        remaining = [i for i in range(N) if not exited[i]]
        remaining.sort(key=lambda i: conf[k][i], reverse=True)
        if n_k == 0 or n_k > len(remaining):
            t = math.inf  # nobody exits here
        else:
            t = conf[k][remaining[n_k - 1]]
        for i in remaining:
            if conf[k][i] >= t:
                exited[i] = True
        thresholds.append(t)
    thresholds.append(-math.inf)  # the last exit takes everything left
    return thresholds


def loop_exits(conf: torch.Tensor, thresholds) -> list[int]:
    conf = conf.tolist()
    E, N = len(conf), len(conf[0])
    out = []
    for i in range(N):
        for k in range(E):
            if k == E - 1 or conf[k][i] >= thresholds[k]:
                out.append(k)
                break
    return out


def make_conf(kind: str, E: int, N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        logits = torch.randn(E, N, 10, generator=g) * 2
    elif kind == "ties":  # few distinct logit rows -> many equal confidences
        logits = torch.randint(0, 3, (E, N, 4), generator=g).float()
    elif kind == "saturated":  # confidence exactly 1.0 for many samples
        logits = torch.randn(E, N, 5, generator=g) * 200
    else:
        raise AssertionError(kind)
    return confidence(logits)[0]


def distributions(E: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    out = [geometric_distribution(q, E) for q in (0.05, 0.5, 1.0, 1.95, 8.0)]
    out.append(torch.distributions.Dirichlet(torch.ones(E)).sample())  # not geometric at all
    zeros = torch.rand(E, generator=g) * (torch.rand(E, generator=g) > 0.5)
    zeros[-1] += 0.1
    out.append((zeros / zeros.sum()).double())  # exact zeros -> n_k = 0
    return out


@pytest.mark.parametrize("kind", ["random", "ties", "saturated"])
@pytest.mark.parametrize("E,N", [(2, 50), (4, 7), (5, 333), (7, 1200)])
def test_calibrate_matches_reference_loop(kind, E, N):
    for seed in range(3):
        conf = make_conf(kind, E, N, seed)
        Ps = distributions(E, seed)
        many = calibrate_many(conf, torch.stack(Ps))
        for P, T_many in zip(Ps, many):
            expected = loop_thresholds(conf, P)
            T = calibrate(conf, P)
            assert T.tolist() == expected
            assert T_many.tolist() == expected
            assert exit_indices(conf, T).tolist() == loop_exits(conf, expected)
        # the batched exit assignment equals the single one, row by row
        batched = exit_indices(conf, many)
        for q in range(len(Ps)):
            assert torch.equal(batched[q], exit_indices(conf, many[q]))


def test_calibrate_edge_cases():
    # every sample ties at exit 0: all leave there, so exit 1 has too few left -> +inf
    conf = torch.tensor([[0.5] * 10, [0.9] * 10, [0.2] * 10])
    T = calibrate(conf, torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64))
    assert T.tolist() == [0.5, math.inf, -math.inf]
    assert exit_indices(conf, T).tolist() == [0] * 10
    # n_0 = floor(10 * 0.05) = 0 -> nobody exits at 0
    T = calibrate(conf, torch.tensor([0.05, 0.5, 0.45], dtype=torch.float64))
    assert T[0] == math.inf and T[1] == 0.9
    # the n_k-th sample in descending order sets T_k
    conf = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5]])
    T = calibrate(conf, torch.tensor([0.4, 0.6], dtype=torch.float64))  # n_0 = 2
    assert T.tolist() == [pytest.approx(0.8), -math.inf]
    assert exit_indices(conf, T).tolist() == [0, 1, 0, 1, 1]


def test_geometric_distribution():
    P = geometric_distribution(0.5, 4)
    expected = torch.tensor([0.5**k for k in range(1, 5)], dtype=torch.float64)
    assert torch.allclose(P, expected / expected.sum())
    many = geometric_distribution(torch.tensor([0.05, 1.0, 1.95]), 6)
    assert many.shape == (3, 6)
    assert torch.allclose(many.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(many[1], torch.full((6,), 1 / 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="q"):
        geometric_distribution(0.0, 3)
    costs = torch.tensor([1.0, 2.0, 4.0, 8.0, 9.0])
    ec = geometric_expected_cost(torch.logspace(-3, 3, 50), costs)
    assert bool((ec[1:] > ec[:-1]).all())


def make_exit_preds(E: int, N: int, seed: int, C: int = 10) -> tuple[ExitPredictions, torch.Tensor]:
    """Exits that get better with depth; logits float32."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(E, N, C, generator=g)
    strength = torch.linspace(0.3, 2.5, E)[:, None]
    logits[torch.arange(E)[:, None], torch.arange(N)[None, :], labels[None, :]] += strength
    costs = torch.tensor([1e6 * (k + 1) ** 1.5 for k in range(E)], dtype=torch.float64)
    return ExitPredictions(logits, costs), labels


def test_solve_q_hits_budgets():
    preds, labels = make_exit_preds(6, 5000, seed=0)
    conf, _ = confidence(preds.logits)
    costs = preds.costs
    lo, hi = float(costs[0]), float(costs[-1])
    budgets = [lo, lo + 0.05 * (hi - lo), lo + 0.3 * (hi - lo), lo + 0.6 * (hi - lo), lo + 0.9 * (hi - lo), hi]
    tol = 0.01 * (hi - lo)
    for refine in (False, True):
        q, T = solve_q(conf, costs, budgets, refine=refine)
        assert q.shape == (len(budgets),) and T.shape == (len(budgets), 6)
        assert bool((q > 0).all())
        for b, t in zip(budgets, T):
            _, held_cost, frac = budget_point(conf, conf.new_zeros(conf.shape, dtype=torch.long), labels, costs, t)
            assert abs(held_cost - b) <= tol, (refine, b, held_cost)
            assert abs(float(frac.sum()) - 1) < 1e-12
    q1, T1 = solve_q(conf, costs, budgets[2])  # scalar in, scalar out
    assert isinstance(q1, float) and T1.shape == (6,)
    for bad in (lo - 1.0, hi * 1.01):
        with pytest.raises(ValueError, match="budgets") as err:
            solve_q(conf, costs, [budgets[1], bad])
        assert str(bad)[:6] in str(err.value) and f"{lo:g}" in str(err.value)


def test_budget_point_consistent():
    preds, labels = make_exit_preds(4, 400, seed=3)
    conf, pred = confidence(preds.logits)
    T = calibrate(conf, geometric_distribution(1.0, 4))
    acc, cost, frac = budget_point(conf, pred, labels, preds.costs, T)
    idx = loop_exits(conf, T.tolist())
    hand_acc = 100.0 * sum(int(pred[k, i] == labels[i]) for i, k in enumerate(idx)) / len(idx)
    hand_frac = [idx.count(k) / len(idx) for k in range(4)]
    assert acc == pytest.approx(hand_acc)
    assert frac.tolist() == pytest.approx(hand_frac)
    assert cost == pytest.approx(sum(f * c for f, c in zip(hand_frac, preds.costs.tolist())))
    # batched form gives the same numbers
    accs, costs_b, fracs = budget_point(conf, pred, labels, preds.costs, torch.stack([T, T]))
    assert accs.tolist() == [acc, acc] and costs_b.tolist() == [cost, cost]


def test_budgeted_pgrid_and_budgets():
    held, held_labels = make_exit_preds(5, 1500, seed=1)
    test, test_labels = make_exit_preds(5, 1000, seed=2)
    df = budgeted(held, held_labels, test, test_labels)
    assert len(df) == 39 and set(df["mode"]) == {"pgrid"}
    assert df["q"].tolist() == pytest.approx([p / 20 for p in range(1, 40)])
    assert df["requested_budget"].isna().all()
    assert set(df["n_heldout"]) == {1500} and set(df["n_test"]) == {1000}
    for col in ("heldout_accuracy", "heldout_cost", "test_accuracy", "test_cost", "thresholds", "exit_fraction"):
        assert col in df.columns
    # the grid's thresholds are the reference rule with P_k ~ q^(k+1)
    conf_h, _ = confidence(held.logits)
    for row in df.iloc[[0, 10, 38]].itertuples():
        assert row.thresholds == loop_thresholds(conf_h, geometric_distribution(row.q, 5))
        assert sum(row.exit_fraction) == pytest.approx(1.0)
        assert row.test_cost == pytest.approx(sum(f * c for f, c in zip(row.exit_fraction, test.costs.tolist())))

    lo, hi = float(held.costs[0]), float(held.costs[-1])
    budgets = [lo + 0.2 * (hi - lo), lo + 0.7 * (hi - lo)]
    df = budgeted(held, held_labels, test, test_labels, budgets=budgets)
    assert len(df) == 41
    b = df[df["mode"] == "budget"]
    assert b["requested_budget"].tolist() == budgets
    assert (b["heldout_cost"] - b["requested_budget"]).abs().max() <= 0.02 * (hi - lo)  # N=1500: coarser
    only = budgeted(held, held_labels, test, test_labels, budgets=budgets, p_grid=False)
    assert len(only) == 2 and set(only["mode"]) == {"budget"}
    with pytest.raises(ValueError, match="budgets"):
        budgeted(held, held_labels, test, test_labels, budgets=[hi * 2])


def hand_flat_curve(raw: pd.DataFrame) -> dict[float, float]:
    """REFERENCE.md section 2, step 5, written as the references run it: walk the p-grid in its
    own order (p = 1..39, q ascending, cost rising with q); where held-out accuracy does not
    strictly improve on the best so far, report the previous reported test accuracy again."""
    out, best_held, reported = {}, -math.inf, math.nan
    for q, held, test in sorted(zip(raw["q"], raw["heldout_accuracy"], raw["test_accuracy"])):
        if held > best_held:
            best_held, reported = held, test
        out[q] = reported
    return out


def uneven_exit_preds(N: int, seed: int, C: int = 10) -> tuple[ExitPredictions, torch.Tensor]:
    """Exits that do not improve with depth (the second is the best): held-out accuracy then
    rises and falls along the p-grid, which is what the flat-curve rule is for."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(6, N, C, generator=g)
    strength = torch.tensor([0.5, 2.5, 1.0, 2.0, 0.8, 1.5])[:, None]
    logits[torch.arange(6)[:, None], torch.arange(N)[None, :], labels[None, :]] += strength
    return ExitPredictions(logits, torch.tensor([1e6 * (k + 1) for k in range(6)], dtype=torch.float64)), labels


def test_flat_curve():
    held, held_labels = uneven_exit_preds(800, seed=4)
    test, test_labels = uneven_exit_preds(800, seed=5)
    raw = budgeted(held, held_labels, test, test_labels)
    flat = budgeted(held, held_labels, test, test_labels, flat_curve=True)
    assert flat["test_accuracy_raw"].tolist() == raw["test_accuracy"].tolist()
    expected = hand_flat_curve(raw)
    assert {q: a for q, a in zip(flat["q"], flat["test_accuracy"])} == expected
    # the case is not trivial: the rule replaces some test accuracies, and not by the running max
    changed = (flat["test_accuracy"] != flat["test_accuracy_raw"]).sum()
    assert 0 < changed < len(flat)
    assert flat["test_accuracy"].tolist() != raw.sort_values("q")["test_accuracy"].cummax().tolist()

    # held-out == test: the flat curve is then the running best in p order
    same = budgeted(held, held_labels, held, held_labels, flat_curve=True).sort_values("q")
    assert same["test_accuracy"].tolist() == same["test_accuracy_raw"].cummax().tolist()


def test_budgeted_rejects_other_prediction_types():
    held, labels = make_exit_preds(3, 20, seed=0)
    subnet = SubnetPredictions(held.logits, held.costs, ["a", "b", "c"])
    gated = GatedPredictions(held.logits[0], torch.ones(20))
    with pytest.raises(TypeError, match="SubnetPredictions"):
        budgeted(subnet, labels, held, labels)
    with pytest.raises(TypeError, match="GatedPredictions"):
        budgeted(held, labels, gated, labels)
    with pytest.raises(TypeError):
        anytime(object(), labels)


def one_hot_logits(preds: list[list[int]], C: int) -> torch.Tensor:
    """Logits whose argmax is the given class (different confidences)."""
    t = torch.tensor(preds)
    logits = torch.zeros(*t.shape, C)
    logits.scatter_(-1, t.unsqueeze(-1), 3.0)
    return logits


def test_anytime_exits_hand_computed():
    labels = torch.tensor([0, 1, 1, 1])
    logits = one_hot_logits([[0, 1, 2, 0], [0, 1, 1, 1], [2, 2, 2, 2]], C=3)
    df = anytime(ExitPredictions(logits, torch.tensor([10e6, 25e6, 40e6])), labels)
    assert df["name"].tolist() == ["exit0", "exit1", "exit2"]
    assert df["index"].tolist() == [0, 1, 2]
    assert df["accuracy"].tolist() == [50.0, 100.0, 0.0]
    assert df["cost"].tolist() == [10e6, 25e6, 40e6]
    assert df["mmacs"].tolist() == pytest.approx([10.0, 25.0, 40.0])
    assert "pareto" not in df.columns
    assert df["n_samples"].tolist() == [4, 4, 4]  # what the accuracy's standard error depends on


def test_anytime_subnets_names_and_pareto():
    labels = torch.tensor([0, 1, 2, 3])
    right = [0, 1, 2, 3]

    def k_right(k):  # first k predictions right, the rest wrong
        return right[:k] + [(c + 1) % 4 for c in right[k:]]

    logits = one_hot_logits([k_right(1), k_right(3), k_right(2), k_right(4), k_right(3), k_right(3)], C=4)
    costs = torch.tensor([1e6, 2e6, 3e6, 4e6, 4e6, 2e6])
    names = ["TTT", "TTF", "TFT", "FFF", "FFF-b", "TTF-b"]
    df = anytime(SubnetPredictions(logits, costs, names), labels)
    assert df["name"].tolist() == names
    assert df["accuracy"].tolist() == [25.0, 75.0, 50.0, 100.0, 75.0, 75.0]
    # TFT is beaten by TTF (cheaper, better); FFF-b by FFF (same cost, better);
    # TTF and TTF-b tie exactly, so neither dominates the other
    assert df["pareto"].tolist() == [True, True, False, True, False, True]


def test_anytime_gated_hand_computed():
    labels = torch.tensor([0, 1, 2, 0, 1])
    logits = one_hot_logits([0, 1, 0, 0, 2], C=3)
    df = anytime(GatedPredictions(logits, torch.tensor([1e6, 2e6, 3e6, 4e6, 10e6])), labels)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["accuracy"] == pytest.approx(60.0)
    assert row["cost"] == pytest.approx(4e6) and row["mmacs"] == pytest.approx(4.0)
    assert (row["cost_min"], row["cost_p50"], row["cost_max"]) == (1e6, 3e6, 10e6)
    assert row["n_samples"] == 5


def test_predictions_frame_parquet_round_trip(tmp_path):
    g = torch.Generator().manual_seed(7)
    exits = ExitPredictions(torch.randn(3, 11, 5, generator=g), torch.tensor([1.5e6, 3e6, 4.25e6], dtype=torch.float64))
    exit_labels = torch.randint(0, 5, (11,), generator=g)
    subnet = SubnetPredictions(torch.randn(4, 6, 5, generator=g), torch.tensor([4e6, 1e6, 3e6, 2e6], dtype=torch.float64), ["TT", "FF", "TF", "FT"])
    subnet_labels = torch.randint(0, 5, (6,), generator=g)
    gated = GatedPredictions(torch.randn(9, 5, generator=g), torch.rand(9, generator=g, dtype=torch.float64) * 1e6)
    gated_labels = torch.randint(0, 5, (9,), generator=g)
    indices = torch.randperm(100, generator=g)[:11]  # dataset indices, not sorted

    frames = [
        predictions_frame(exits, exit_labels, "test", indices=indices),
        predictions_frame(exits, exit_labels, "heldout"),
    ]
    df = pd.concat(frames, ignore_index=True)
    assert len(df) == 2 * 3 * 11
    first = df[df["split"] == "test"]
    assert first["sample"].tolist()[:11] == indices.tolist() and first["output"].tolist()[::11] == [0, 1, 2]
    conf, pred = confidence(exits.logits)
    assert first["pred"].tolist() == pred.reshape(-1).tolist()
    assert first["confidence"].to_numpy() == pytest.approx(conf.reshape(-1).double().numpy())
    path = tmp_path / "exits.parquet"
    df.to_parquet(path)
    schema = pq.read_schema(path)
    assert str(schema.field("logits").type) in ("list<item: float>", "list<element: float>")
    back = pd.read_parquet(path)
    for split in ("test", "heldout"):
        p, lab = frame_to_predictions(back, split)
        assert isinstance(p, ExitPredictions)
        assert torch.equal(p.logits, exits.logits) and torch.equal(p.costs, exits.costs)
        assert torch.equal(lab, exit_labels)
    with pytest.raises(ValueError, match="split"):
        frame_to_predictions(back, "train")

    # shuffled rows still rebuild the same tensors (aligned by sample id)
    shuffled = back.sample(frac=1.0, random_state=0)
    p, lab = frame_to_predictions(shuffled, "heldout")
    order = torch.as_tensor(shuffled[(shuffled["split"] == "heldout") & (shuffled["output"] == 0)]["sample"].to_numpy().copy())
    assert torch.equal(p.logits, exits.logits[:, order]) and torch.equal(lab, exit_labels[order])

    subnet_df = predictions_frame(subnet, subnet_labels, "test")
    assert subnet_df["output"].tolist()[::6] == ["TT", "FF", "TF", "FT"]
    subnet_df.to_parquet(tmp_path / "subnet.parquet")
    p, lab = frame_to_predictions(pd.read_parquet(tmp_path / "subnet.parquet"), "test")
    assert isinstance(p, SubnetPredictions) and p.names == subnet.names
    assert torch.equal(p.logits, subnet.logits) and torch.equal(p.costs, subnet.costs) and torch.equal(lab, subnet_labels)

    gated_df = predictions_frame(gated, gated_labels, "test")
    assert len(gated_df) == 9 and gated_df["cost"].tolist() == gated.costs.tolist()
    gated_df.to_parquet(tmp_path / "gated.parquet")
    p, lab = frame_to_predictions(pd.read_parquet(tmp_path / "gated.parquet"), "test")
    assert isinstance(p, GatedPredictions)
    assert torch.equal(p.logits, gated.logits) and torch.equal(p.costs, gated.costs) and torch.equal(lab, gated_labels)


def test_confidence():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [5.0, 5.0, -1.0]]])
    conf, pred = confidence(logits)
    assert pred.tolist() == [[1, 0]]
    expected = np.exp(2) / (np.exp(1) + np.exp(2) + 1)
    assert conf[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert conf[0, 1].item() == pytest.approx(np.exp(5) / (2 * np.exp(5) + np.exp(-1)), rel=1e-6)
