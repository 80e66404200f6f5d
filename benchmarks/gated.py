"""DMNN inference that really skips closed sub-blocks against the masked computation (every
sub-block on every sample, multiplied by its gate), in the same process: wall time of a batch at
several gate-open rates, next to the executed multiply-adds, both as ratios to the masked run.

    python -m benchmarks.gated                                      # dmnn-resnet50-cifar32 (CIFAR, first stage at 32x32), CPU
    python -m benchmarks.gated --preset dmnn-resnet-small --batch 256
    python -m benchmarks.gated --preset dmnn-resnet50-imagenet --batch 32 --device cuda

Weights are random (costs and timing do not depend on training). For each open rate p, every
controller's gate layer is set so that, on the benchmark batch, each sub-block is open for a
fraction p of the samples, decided per sample (so real skipping gathers and scatters).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import methods  # noqa: F401  (fills the registries)
from dynlab import config
from dynlab.data import static_info
from dynlab.registry import get_method, get_preset
from methods.backbones.dmnn_common import GatedBlock


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired_best_times(a, b, repeats: int) -> tuple[float, float]:
    """Best wall time of ``a`` and of ``b``, measured alternately (a, b, a, b, ...) after a warm-up,
    so that a burst of load on a shared machine hits both rather than one."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed(a))
        tb.append(_timed(b))
    return min(ta), min(tb)


@torch.no_grad()
def set_open_rate(model, x: torch.Tensor, rate: float | list[float]) -> None:
    """Gate layers with random weights and, per sub-block, a bias at the (1 - p) quantile of the
    open-minus-closed logit on ``x``: each sub-block opens for about a fraction p of the samples
    (``rate``: one p for every block, or one per block)."""
    rates = list(rate) if isinstance(rate, (list, tuple)) else [rate] * len(model.blocks)
    h, x, rates = None, model.stem(x), iter(rates)
    for block in model.layers:
        if not isinstance(block, GatedBlock):
            x = block(x)  # a fixed layer (MobileNetV2's blocks without a residual)
            continue
        p = next(rates)
        ctrl = block.controller
        nn.init.normal_(ctrl.gate.weight, 0.0, 1.0)
        ctrl.gate.bias.zero_()
        logits, h_next = ctrl(x, h)
        diff = logits[..., 1] - logits[..., 0]  # [B, N]
        if p >= 1.0 or p <= 0.0:  # every sample the same way, whatever the features' scale
            ctrl.gate.weight.zero_()
            shift = torch.full((diff.shape[1],), 1.0 if p >= 1.0 else -1.0)
        else:
            shift = -torch.quantile(diff.float(), 1.0 - p, dim=0) + 1e-6
        ctrl.gate.bias.view(-1, 2)[:, 1] = shift.to(ctrl.gate.bias)
        logits, _ = ctrl(x, h)
        x = block.masked(x, (logits[..., 1] > logits[..., 0]).to(x.dtype))
        h = h_next


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dmnn-resnet50-cifar32")  # the network of the README's table
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rates", default="0.25,0.5,0.75,1.0", help="gate-open rates to measure")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    info = static_info(preset.dataset)
    cfg = config.cli_config(["method=dmnn", f"preset={args.preset}", "dmnn.categories=none"])
    model = get_method("dmnn").cls(cfg).build_model(info).to(args.device).eval()
    x = torch.randn(args.batch, info.channels, info.image_size, info.image_size, device=args.device)
    masked_macs = model.dense_macs + model.controller_macs  # the masked run executes everything
    print(f"{args.preset}, batch {args.batch} on {args.device}: dense {model.dense_macs / 1e6:.1f} MMACs/image, controllers {model.controller_macs / 1e6:.3f}")
    print(f"{'open rate':>9} {'MACs vs masked':>15} {'time vs masked':>15} {'masked ms':>10} {'skipping ms':>12}")
    rows = []
    for p in (float(r) for r in args.rates.split(",")):
        set_open_rate(model, x, p)
        with torch.no_grad():
            logits, gates = model.forward_skipping(x)
            masked = model(x)
            t_masked, t_skip = paired_best_times(lambda: model(x), lambda: model.forward_skipping(x), args.repeats)
        same = torch.equal(logits.argmax(1), masked["logits"].argmax(1)) and torch.allclose(logits, masked["logits"], rtol=1e-4, atol=1e-4)
        macs = float(model.executed_macs(gates).mean()) / masked_macs
        rows.append({"rate": float(gates.mean()), "macs": macs, "time": t_skip / t_masked, "same": same})
        print(f"{float(gates.mean()):9.2f} {macs:14.2f}x {t_skip / t_masked:14.2f}x {t_masked * 1e3:10.1f} {t_skip * 1e3:12.1f}" + ("" if same else "  PREDICTIONS DIFFER"))
    print(f"real skipping and masked computation agree: {all(r['same'] for r in rows)}")
    return rows


if __name__ == "__main__":
    main()
