"""Real early exit against the full network, in the same process: wall time of a test batch when
each block runs only for the samples still undecided, versus the references' way (run every block
for every sample, read exits off afterwards), at several exit distributions. Reports both the
multiply-add ratio and the measured time ratio, so one sees how closely time follows MACs.

    python -m benchmarks.early_exit                                  # msdnet-cifar100-b7, CPU
    python -m benchmarks.early_exit --preset msdnet-imagenet-s4 --batch 64 --device cuda

Weights are random (costs and timing do not depend on training); thresholds are calibrated on a
separate batch for geometric exit distributions q = 0.5, 1, 2, as the budgeted evaluation does.
"""

from __future__ import annotations

import argparse
import time

import torch

import methods  # noqa: F401  (fills the registries)
from dynlab import config, evaluation
from dynlab.data import static_info
from dynlab.early_exit import early_exit
from dynlab.registry import get_method, get_preset


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="msdnet-cifar100-b7")
    ap.add_argument("--method", default="boostnet")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    info = static_info(preset.dataset)
    cfg = config.cli_config([f"method={args.method}", f"preset={args.preset}"])
    model = get_method(args.method).cls(cfg).build_model(info).to(args.device).eval()
    shape = (args.batch, 3, info.image_size, info.image_size)
    calib, test = torch.randn(shape, device=args.device), torch.randn(shape, device=args.device)
    costs = torch.tensor(model.cost_table.macs, dtype=torch.float64)
    with torch.no_grad():
        conf_calib, _ = evaluation.confidence(torch.stack(model(calib)))
        full = best_time(lambda: model(test), args.repeats)
    print(f"{args.preset} ({args.method}), batch {args.batch} on {args.device}: full network {full * 1e3:.1f} ms, {costs[-1] / 1e6:.1f} MMACs/image")
    print(f"{'q':>5} {'MACs vs full':>13} {'time vs full':>13}  exits")
    for q in (0.5, 1.0, 2.0):
        thresholds = evaluation.calibrate(conf_calib, evaluation.geometric_distribution(q, len(costs)))
        res = early_exit(model, test, thresholds)
        macs = costs[res.exit.cpu()].mean() / costs[-1]
        t = best_time(lambda: early_exit(model, test, thresholds), args.repeats)
        hist = torch.bincount(res.exit.cpu(), minlength=len(costs)).tolist()
        print(f"{q:5.2f} {macs:12.2f}x {t / full:12.2f}x  {hist}")


if __name__ == "__main__":
    main()
