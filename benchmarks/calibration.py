"""Budgeted-batch calibration over the reference p-grid: dynlab's vectorised engine against the
per-sample loops of the reference implementations (re-written here from REFERENCE.md section 2,
the way MSDNet-PyTorch / BoostNet evaluate: a Python loop over sorted samples to find each
threshold, then a Python loop over test samples to find each exit).

    python -m benchmarks.calibration                 # CIFAR-sized: 5,000 held-out, 10,000 test, 7 exits
    python -m benchmarks.calibration --heldout 50000 --test 50000 --exits 5 --classes 1000

Prints both timings, the speed-up ratio, and checks that both give the same accuracy and cost.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dynlab.evaluation import budget_point, calibrate_many, confidence, geometric_distribution, reference_q_grid


def reference_loops(conf_h, conf_t, pred_t, labels_t, costs, q_grid):
    """One (accuracy, cost) per q, with the references' loops over samples."""
    E, N = conf_h.shape
    sorted_idx = conf_h.argsort(dim=1, descending=True)
    out = []
    for q in q_grid.tolist():
        P = [q ** (k + 1) for k in range(E)]
        s = sum(P)
        P = [p / s for p in P]
        filtered = torch.zeros(N)
        T = [math.inf] * (E - 1) + [-math.inf]
        for k in range(E - 1):
            n_k = math.floor(N * P[k])
            count = 0
            for i in range(N):  # walk down the sorted held-out samples not yet exited
                idx = int(sorted_idx[k][i])
                if filtered[idx] == 0:
                    count += 1
                    if count == n_k:
                        T[k] = float(conf_h[k][idx])
                        break
            filtered += (conf_h[k] >= T[k]).float() * (filtered == 0).float()
        correct, cost = 0, 0.0
        for i in range(conf_t.shape[1]):  # each test sample exits at the first confident exit
            for k in range(E):
                if k == E - 1 or conf_t[k][i] >= T[k]:
                    correct += int(pred_t[k][i] == labels_t[i])
                    cost += float(costs[k])
                    break
        out.append((100.0 * correct / conf_t.shape[1], cost / conf_t.shape[1]))
    return out


def vectorised(conf_h, conf_t, pred_t, labels_t, costs, q_grid):
    thresholds = calibrate_many(conf_h, geometric_distribution(q_grid, conf_h.shape[0]))
    acc, cost, _ = budget_point(conf_t, pred_t, labels_t, costs, thresholds)
    return list(zip(acc.tolist(), cost.tolist()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=int, default=5000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--exits", type=int, default=7)
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    # later exits are more confident and more accurate, as in a trained network
    scale = torch.linspace(1.0, 3.0, args.exits).view(-1, 1, 1)
    conf_h, _ = confidence(torch.randn(args.exits, args.heldout, args.classes, generator=g) * scale)
    conf_t, pred_t = confidence(torch.randn(args.exits, args.test, args.classes, generator=g) * scale)
    labels_t = torch.randint(0, args.classes, (args.test,), generator=g)
    costs = torch.linspace(1.0, 4.0, args.exits, dtype=torch.float64) * 1e7
    q = reference_q_grid()

    t0 = time.perf_counter()
    ours = vectorised(conf_h, conf_t, pred_t, labels_t, costs, q)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_loops(conf_h, conf_t, pred_t, labels_t, costs, q)
    t_ref = time.perf_counter() - t0
    same = all(abs(a[0] - b[0]) < 1e-9 and abs(a[1] - b[1]) < 1e-3 * b[1] for a, b in zip(ours, ref))
    print(f"p-grid of {len(q)} points, {args.exits} exits, {args.heldout} held-out / {args.test} test samples")
    print(f"  reference loops : {t_ref:8.3f} s")
    print(f"  dynlab vectorised: {t_ours:8.3f} s")
    print(f"  speed-up        : {t_ref / t_ours:8.1f}x   identical results: {same}")


if __name__ == "__main__":
    main()
