"""Real early exit against the full network, in the same process, against a fair baseline.

Real early exit (:func:`dynlab.early_exit.early_exit`) runs block k only for the samples still
undecided; the references run every block for every sample and read exits off afterwards. The
benchmark reports how much of the speedup the multiply-adds predict real early exit realizes:

    efficiency = (full-network time / early-exit time) / (full-network MACs / early-exit MACs)

On a CPU a smaller batch can be cheaper per sample (activations that stay in cache), and the later
blocks of real early exit see smaller batches, so a comparison with the full network as one batch
flatters it. The fair baseline is the full network at its fastest chunk size: the batch run in
chunks of each of --chunks, the fastest taken. Early exit runs as one batch per block and in
chunks of that same fastest size (``early_exit(..., chunk_size=)``); both are compared with the
fair baseline and, labelled, with the one-batch baseline.

Timings are interleaved: every round times every variant once (the full network at each chunk
size, then early exit per distribution and mode), so a noisy machine slows all of them alike; the
table gives the median over rounds and the range [min-max] of the per-round ratios. A verdict is
"within noise" when that range straddles what it is compared with.

    python -m benchmarks.early_exit                                  # msdnet-cifar100-b7, CPU
    python -m benchmarks.early_exit --quick                          # tiny, seconds (the smoke test)
    python -m benchmarks.early_exit --preset msdnet-imagenet-s4 --batch 64 --device cuda

Weights are random (costs and timing do not depend on training); thresholds are calibrated on a
separate batch for geometric exit distributions q = 0.5, 1, 2, as the budgeted evaluation does.
Every early-exit run's exits and predictions are checked against the simulated exits of the same
batch (``agree``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import methods  # noqa: F401  (fills the registries)
from dynlab import config, evaluation
from dynlab.data import static_info
from dynlab.early_exit import early_exit
from dynlab.registry import get_method, get_preset

TARGET = 0.8  # of the MACs-predicted speedup, against the fair baseline


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = clock()
    fn()
    _sync(device)
    return clock() - t0


def full_network(model, images: torch.Tensor, chunk: int) -> None:
    with torch.no_grad():
        for i in range(0, images.shape[0], chunk):
            model(images[i : i + chunk])


def spread(values: list[float]) -> str:
    return f"[{min(values):.2f}-{max(values):.2f}]"


def verdict(values: list[float], target: float) -> str:
    if min(values) >= target:
        return "met"
    if max(values) < target:
        return "not met"
    return "within noise"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _slice(state, a: int, b: int):
    if state is None:
        return None
    if torch.is_tensor(state):
        return state[a:b]
    return type(state)(_slice(s, a, b) for s in state)


def block_states(model, images: torch.Tensor) -> list:
    """The input of every block (exit_step k) for the whole batch: the images, then each step's state."""
    states, state = [], images
    with torch.no_grad():
        for k in range(model.num_exits):
            states.append(state)
            state, _ = model.exit_step(state, k)
    return states


def blocks_alone(model, states: list, chunk: int, device: str) -> list[float]:
    """Seconds of each block (and its head) for the whole batch in chunks of ``chunk``."""
    batch, out = states[0].shape[0], []
    with torch.no_grad():
        for k, state in enumerate(states):
            out.append(timed(lambda k=k, state=state: [model.exit_step(_slice(state, i, i + chunk), k) for i in range(0, batch, chunk)], device))
    return out


def bench_batch(model, costs: torch.Tensor, batch: int, args) -> list[dict]:
    """Every variant at one batch size; returns the table rows (also printed)."""
    shape = (batch, *args.image_shape)
    calib = torch.randn(shape, device=args.device)
    test = torch.randn(shape, device=args.device)
    with torch.no_grad():
        conf_calib, _ = evaluation.confidence(torch.stack(model(calib)))
        conf_test, pred_test = evaluation.confidence(torch.stack(model(test)))  # the simulated exits
    chunks = sorted({c for c in args.chunks if c < batch} | {batch})

    # 1. the full network at every chunk size, interleaved; the fastest is the fair baseline
    full_t: dict[int, list[float]] = {c: [] for c in chunks}
    for c in chunks:  # warm-up
        full_network(model, test, c)
    for _ in range(args.rounds):
        for c in chunks:
            full_t[c].append(timed(lambda c=c: full_network(model, test, c), args.device))
    med = {c: statistics.median(v) for c, v in full_t.items()}
    fair = min(med, key=med.get)
    print(f"\nbatch {batch}: the full network, {args.rounds} rounds (median ms [min-max], relative to the fastest):")
    for c in chunks:
        label = f"one batch of {batch}" if c == batch else f"chunks of {c}"
        mark = "  <- fair baseline (fastest)" if c == fair else ""
        print(f"  {label:>18}: {med[c] * 1e3:8.1f} ms [{min(full_t[c]) * 1e3:.1f}-{max(full_t[c]) * 1e3:.1f}]  {med[c] / med[fair]:.2f}x{mark}")

    # 2. thresholds, simulated exits; real early exit as one batch per block and in chunks of the
    # fair chunk size (or of the fastest smaller one where the whole batch was fastest), each
    # checked against the simulation
    cases = []
    for q in args.q:
        thresholds = evaluation.calibrate(conf_calib, evaluation.geometric_distribution(q, len(costs)))
        sim_exit = evaluation.exit_indices(conf_test, thresholds)
        sim_pred = pred_test[sim_exit, torch.arange(batch, device=sim_exit.device)]
        cases.append((q, thresholds, sim_exit, sim_pred))
    engine_chunk = fair if fair < batch else min((c for c in chunks if c < batch), key=med.get, default=None)
    modes = {"one batch": None} | ({f"chunks of {engine_chunk}": engine_chunk} if engine_chunk else {})
    agree = {}
    for q, thresholds, sim_exit, sim_pred in cases:
        for mode, chunk in modes.items():
            res = early_exit(model, test, thresholds, chunk_size=chunk)
            agree[q, mode] = bool(torch.equal(res.exit, sim_exit) and torch.equal(res.pred, sim_pred))

    # 3. interleaved rounds: both baselines, every block alone (the block-time model), early exit
    states = block_states(model, test)
    base = {c: [] for c in {fair, batch}}
    block_t: list[list[float]] = []
    ee_t: dict[tuple, list[float]] = {(q, mode): [] for q in args.q for mode in modes}
    for _ in range(args.rounds):
        for c in base:
            base[c].append(timed(lambda c=c: full_network(model, test, c), args.device))
        block_t.append(blocks_alone(model, states, fair, args.device))
        for q, thresholds, _, _ in cases:
            for mode, chunk in modes.items():
                ee_t[q, mode].append(timed(lambda t=thresholds, c=chunk: early_exit(model, test, t, chunk_size=c), args.device))
    block_med = torch.tensor([statistics.median(r[k] for r in block_t) for k in range(len(costs))], dtype=torch.float64)
    block_macs = torch.diff(costs, prepend=costs.new_zeros(1))
    print(f"  per block (chunks of {fair}): share of MACs {[round(float(x), 2) for x in block_macs / costs[-1]]}, "
          f"share of time {[round(float(x), 2) for x in block_med / block_med.sum()]}")

    rows = []
    print(f"{'q':>5} {'engine':>14} {'MACs':>6} {'ms':>7} {'ceiling':>7} {'efficiency vs fair':>20} {'vs one batch':>18} {'agree':>5}  exits")
    for q, thresholds, sim_exit, _ in cases:
        macs = float(costs[sim_exit.cpu()].mean() / costs[-1])
        hist = torch.bincount(sim_exit.cpu(), minlength=len(costs))
        running = hist.flip(0).cumsum(0).flip(0).double() / batch  # share of the batch that runs block k
        ceiling = macs / float((block_med * running).sum() / block_med.sum())
        for mode in modes:
            t = ee_t[q, mode]
            # per round: efficiency = MACs ratio / time ratio, the two times from the same round
            eff_fair = [macs * f / e for f, e in zip(base[fair], t)]
            eff_one = [macs * f / e for f, e in zip(base[batch], t)]
            row = dict(batch=batch, q=q, mode=mode, macs=macs, ms=statistics.median(t) * 1e3, ceiling=ceiling, fair_chunk=fair,
                       eff_fair=statistics.median(eff_fair), eff_fair_range=(min(eff_fair), max(eff_fair)),
                       eff_one=statistics.median(eff_one), eff_one_range=(min(eff_one), max(eff_one)),
                       agree=agree[q, mode], verdict=verdict(eff_fair, TARGET))
            rows.append(row)
            print(f"{q:5.2f} {mode:>14} {macs:5.2f}x {row['ms']:7.1f} {ceiling:7.2f} {row['eff_fair']:6.2f} {spread(eff_fair):>13}"
                  f" {row['eff_one']:5.2f} {spread(eff_one):>12} {'yes' if row['agree'] else 'NO':>5}  {hist.tolist()}")
    best = {}
    for r in rows:
        if r["q"] not in best or r["eff_fair"] > best[r["q"]]["eff_fair"]:
            best[r["q"]] = r
    summary = "; ".join(f"q={q:g}: {r['eff_fair']:.2f} {spread(list(r['eff_fair_range']))} {r['verdict']} (ceiling {r['ceiling']:.2f})" for q, r in best.items())
    print(f"  target >= {TARGET} against the fair baseline (best engine mode): {summary}")
    if len(modes) == 2:
        for q in args.q:
            one, chunked = (ee_t[q, m] for m in modes)
            ratio = [x / y for x, y in zip(one, chunked)]  # per round
            word = "within noise" if min(ratio) <= 1 <= max(ratio) else ("faster" if min(ratio) > 1 else "slower")
            print(f"  q={q:g}: the engine in chunks of {engine_chunk} runs {statistics.median(ratio):.2f}x the speed of one batch per block {spread(ratio)}: {word}")
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="msdnet-cifar100-b7")
    ap.add_argument("--method", default="boostnet")
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 64], help="batch sizes (each is its own table)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128], help="chunk sizes tried for the full network (and the batch itself)")
    ap.add_argument("--q", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="geometric exit distributions")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: elapsed time (the figure to report); cpu: this process's CPU time, steadier on a machine others share "
                         "(with --threads 1 it is the wall time less the time others held the core; with more threads it counts spinning)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test: batch 8, chunks of 4, one round, 1 thread")
    args = ap.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.quick:
        args.batch, args.chunks, args.rounds = [8], [4], 1
        args.threads = args.threads or 1  # two threads on a busy 2-core machine can stall for seconds
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    info = static_info(preset.dataset)
    cfg = config.cli_config([f"method={args.method}", f"preset={args.preset}"])
    model = get_method(args.method).cls(cfg).build_model(info).to(args.device).eval()
    args.image_shape = (3, info.image_size, info.image_size)
    costs = torch.tensor(model.cost_table.macs, dtype=torch.float64)
    print(f"{args.preset} ({args.method}), {costs[-1] / 1e6:.1f} MMACs/image at the last exit; device {args.device} ({device_name(args.device)}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.clock} clock")
    print("efficiency = realized speedup / MACs-predicted speedup, median [min-max] over rounds; 'vs fair': against the full network at "
          "its fastest chunk size, 'vs one batch': against it as one batch. ceiling: the efficiency of an engine without overhead "
          "whose blocks cost per sample what they cost in the fair baseline (measured block times: it is below 1 where the blocks "
          "most samples run cost more time per MAC than the rest). agree: the same exits and predictions as the simulated exits.")
    rows = []
    for batch in args.batch:
        rows += bench_batch(model, costs, batch, args)
    print(f"exits and predictions equal the simulated ones in every run: {all(r['agree'] for r in rows)}")
    return rows


if __name__ == "__main__":
    main()
