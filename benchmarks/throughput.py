"""Training throughput of our loop against a bare PyTorch loop, in the same process run.

    python -m benchmarks.throughput                          # msdnet on digits: the default training config
    python -m benchmarks.throughput preset=msdnet-cifar100-b7 dataset=synthetic data.synthetic_train=1024
    python -m benchmarks.throughput --amp bf16 --channels-last --compile       # the GPU keys (docs/gpu.md)
    python -m benchmarks.throughput --each-key --device cuda                   # every key alone, then all

"Ours" is the real loop of ``dynlab.training`` with one worker, run in this process (no Ray Train
worker group; that start-up is orchestration, which ``benchmarks.overhead`` measures):
``build_loop`` (what ``setup`` builds), ``make_loaders``, ``train_one_epoch``, and ``log_epoch``
into a throwaway local MLflow store (logging on). Held-out scoring and checkpoints are not part of
it (the bare loop has neither). "Bare" is a DataLoader over the same dataset object, forward, the
same summed exit loss, backward and an SGD step, on the same model (same seed, same initial weights),
batch size, sample order, loader workers and thread count. Epochs alternate between the two (ABBA
order) after one untimed warm-up epoch each; the ratio is taken per pair of epochs, and the
difference counts as within noise when the range of those ratios contains 1.

Extra ``key=value`` arguments are config overrides (as for ``python -m pipelines.train``). Exit
methods only (joint, boostnet), whose loss the bare loop reproduces.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

import methods  # noqa: F401  (fills the registries)
from dynlab import accel, config, reproduce, training
from dynlab.registry import get_method

BARE_METHODS = ("joint", "boostnet")


class EpochPermutation(Sampler):
    """The order ``DistributedSampler(shuffle=True, seed)`` gives with one replica: ``randperm``
    seeded with ``seed + epoch``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def bare_loss(outputs, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The exit methods' loss: sum_n w_n CE(outputs[n], y) (one CE for a single output)."""
    if torch.is_tensor(outputs):
        return F.cross_entropy(outputs.float(), targets)
    losses = torch.stack([F.cross_entropy(o.float(), targets) for o in outputs])
    return (weights.to(losses.device) * losses).sum() if weights is not None else losses.sum()


class Ours:
    """The training loop of dynlab.training, one worker, in this process, logging to MLflow."""

    name = "ours"

    def __init__(self, cfg, device: torch.device, tracker=None):
        self.loop = training.build_loop(cfg, device=device, tracker=tracker)
        self.sampler, self.loader, _ = training.make_loaders(self.loop)
        self.epoch = 0

    @property
    def model(self):
        return self.loop.model

    def run_epoch(self) -> dict[str, float]:
        t0, lr = time.time(), self.loop.optimizer.param_groups[0]["lr"]
        metrics = training.train_one_epoch(self.loop, self.loader, self.sampler, self.epoch, t0)
        training.log_epoch(self.loop, {"epoch": self.epoch, "lr": lr, "epoch_seconds": time.time() - t0, **metrics})
        self.epoch += 1
        return metrics


class Bare:
    """DataLoader + forward + loss + backward + SGD step: nothing else."""

    name = "bare"

    def __init__(self, cfg, device: torch.device, dataset, info, workers: int, pin: bool):
        method = get_method(cfg.method).cls(cfg)
        torch.manual_seed(cfg.run.seed)  # the same initial weights as ours
        model = method.build_model(info).to(device)
        self.fmt = torch.channels_last if cfg.run.channels_last else None
        if self.fmt is not None:
            model = model.to(memory_format=self.fmt)
        if cfg.run.compile:
            model.compile()
        self.model, self.device, self.weights = model, device, getattr(method, "_weights", None)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
        self.amp = training.autocast_dtype(cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.sampler = EpochPermutation(len(dataset), cfg.run.seed)
        bs = cfg.data.batch_size
        self.loader = DataLoader(dataset, batch_size=bs, sampler=self.sampler, num_workers=workers, pin_memory=pin, drop_last=len(dataset) > bs, persistent_workers=workers > 0)
        self.epoch = 0

    def run_epoch(self) -> dict[str, float]:
        self.sampler.epoch = self.epoch
        self.model.train()
        loss = None
        for images, targets in self.loader:
            if self.fmt is not None:
                images = images.to(self.device, non_blocking=True, memory_format=self.fmt)
            else:
                images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                loss = bare_loss(self.model(images), targets, self.weights)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.epoch += 1
        return {"train/last_loss": float(loss.detach()) if loss is not None else float("nan")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_images(loader) -> int:
    return len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)


def timed_epoch(runner, device) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of one epoch."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    runner.run_epoch()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


@dataclass
class Result:
    ours: list[float]  # images/s per repeat (wall clock)
    bare: list[float]
    ratios: list[float]  # ours / bare per ABBA pair
    images: int  # per epoch
    warmup_s: dict[str, float]
    cpu_ratio: float = float("nan")  # ours / bare in images per CPU-second (all repeats)

    @property
    def ratio(self) -> float:
        """Best against best: each loop's fastest epoch is its least disturbed one (other
        processes only ever slow an epoch down), so this is the figure least affected by load."""
        return max(self.ours) / max(self.bare)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def within_noise(self) -> bool:
        return min(self.ratios) <= 1.0 <= max(self.ratios)


def open_tracker(root: str):
    from dynlab import tracking

    uri = f"sqlite:///{os.path.join(root, 'mlflow.db')}"
    return tracking.open_run("throughput-benchmark", "ours", uri=uri)


def compare(cfg, device: torch.device, repeats: int, tracker=None, warmup: int = 1) -> Result:
    """Build both loops, warm each up, then time ``repeats`` epochs of each in ABBA order."""
    ours = Ours(cfg, device, tracker)
    workers = ours.loader.num_workers
    bare = Bare(cfg, device, ours.loop.bundle.train, ours.loop.bundle.info, workers, ours.loader.pin_memory)
    images = epoch_images(ours.loader)
    assert images == epoch_images(bare.loader), "the two loops must see the same images per epoch"
    warm = {}
    for r in (ours, bare):
        t0 = time.perf_counter()
        for _ in range(warmup):
            r.run_epoch()
        sync(device)
        warm[r.name] = time.perf_counter() - t0
    times = {"ours": [], "bare": []}
    for i in range(repeats):
        order = (ours, bare) if i % 2 == 0 else (bare, ours)  # ABBA: drift hits both alike
        for r in order:
            times[r.name].append(timed_epoch(r, device))
    ips = {k: [images / wall for wall, _ in v] for k, v in times.items()}
    ratios = [o / b for o, b in zip(ips["ours"], ips["bare"])]
    cpu = {k: sum(c for _, c in v) for k, v in times.items()}
    return Result(ips["ours"], ips["bare"], ratios, images, warm, cpu["bare"] / cpu["ours"] if cpu["ours"] > 0 else float("nan"))


def build_config(overrides: list[str], args) -> config.Config:
    extra = [f"run.amp={args.amp}"] if args.amp else []
    if args.channels_last:
        extra.append("run.channels_last=true")
    if args.compile:
        extra.append("run.compile=true")
    if args.device.startswith("cuda"):
        extra.append("run.use_gpu=true")
    # constant rate: the benchmark's epochs are not a schedule, and the two loops stay comparable
    cfg = config.cli_config(["optim.schedule=constant", "run.num_workers=0", *overrides, *extra])
    if cfg.method not in BARE_METHODS:
        raise SystemExit(f"method={cfg.method}: the bare loop reproduces the exit methods' loss only ({', '.join(BARE_METHODS)})")
    return cfg


def skip_reason(cfg, device: torch.device) -> str | None:
    """Why a setting cannot be timed on this device, or None."""
    if cfg.run.amp == "fp16" and device.type != "cuda":
        return "fp16 autocast with loss scaling needs a CUDA device"
    if cfg.run.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support (pre-Ampere): use run.amp=fp16"
    if cfg.run.compile and device.type == "cpu" and os.environ.get("DYNLAB_BENCH_CPU_COMPILE", "") != "1":
        return "torch.compile on a CPU builds C++ kernels for every graph (train and eval, each exit) before the first step, so a run of a few epochs times the compiler; set DYNLAB_BENCH_CPU_COMPILE=1 to time it anyway (warm-up excluded)"
    return None


def fmt_range(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}..{max(values):.{digits}f}]"


def describe(cfg) -> str:
    bits = [f"amp={cfg.run.amp}"]
    if cfg.run.channels_last:
        bits.append("channels_last")
    if cfg.run.compile:
        bits.append("compile")
    return " ".join(bits)


def main(argv=None) -> list[tuple[str, Result | str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (default: the default training config)")
    ap.add_argument("--repeats", type=int, default=10, help="timed epochs of each loop (alternating)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs of each loop first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--each-key", action="store_true", help="time the defaults, then each GPU key alone (bf16, fp16, channels_last, compile), then all that run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    base = build_config(args.overrides, args)
    variants: list[dict] = [{}]
    if args.each_key:
        base = base.with_overrides({"run.amp": "none", "run.channels_last": False, "run.compile": False})
        variants = [{}, {"run.amp": "bf16"}, {"run.amp": "fp16"}, {"run.channels_last": True}, {"run.compile": True}, "all"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(
        f"training throughput: {base.method}/{base.backbone}{' ' + base.preset if base.preset else ''} on {base.data.name}, batch {base.data.batch_size}, "
        f"loader workers {accel.loader_workers(base, device)}, pin_memory {accel.pin_memory(base, device)}; "
        f"device {device}{' (' + gpu + ')' if gpu else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    results: list[tuple[str, Result | str]] = []
    with tempfile.TemporaryDirectory(prefix="dynlab-throughput-") as root:
        tracker = open_tracker(root)
        timed: dict = {}  # key -> values that ran
        for overrides in variants:
            if overrides == "all":  # every key that ran, together (bf16 rather than fp16 when both ran)
                amps = timed.get("run.amp", [])
                overrides = {"run.amp": "bf16" if "bf16" in amps else "fp16" if "fp16" in amps else "none", "run.channels_last": "run.channels_last" in timed, "run.compile": "run.compile" in timed}
                if sum([overrides["run.amp"] != "none", overrides["run.channels_last"], overrides["run.compile"]]) < 2:
                    continue
            label = " ".join(f"{k.split('.')[1]}={v}" for k, v in overrides.items())
            try:
                cfg = base.with_overrides(overrides)
                label, reason = describe(cfg), skip_reason(cfg, device)
            except config.ConfigError as err:
                reason = str(err)
            if reason:
                print(f"{label}: skipped: {reason}")
                results.append((label, reason))
                continue
            for k, v in overrides.items():
                timed.setdefault(k, []).append(v)
            res = compare(cfg, device, args.repeats, tracker, args.warmup)
            results.append((label, res))
            print(f"{label}: {res.images} images/epoch, {args.repeats} timed epochs each (warm-up {res.warmup_s['ours']:.1f}s / {res.warmup_s['bare']:.1f}s)")
            print(f"  ours {fmt_range(res.ours)} img/s   bare {fmt_range(res.bare)} img/s   (median [min..max] of the epochs)")
            macs = 3 * reproduce.forward_macs(cfg) * statistics.median(res.ours)  # forward + backward ~ 3 forward passes
            print(f"  training multiply-adds per second: {macs:.3g} (3 x forward MACs x img/s; a reproduction's --plan takes it as repro.throughput={macs:.3g})")
            verdict = "within noise (the per-pair ratios range over 1)" if res.within_noise else ("ours slower beyond noise" if res.median_ratio < 1 else "ours faster beyond noise")
            print(f"  ratio ours/bare: best epoch vs best epoch {res.ratio:.3f} (target >= 0.9: {'met' if res.ratio >= 0.9 else 'NOT met'}); "
                  f"per ABBA pair {fmt_range(res.ratios, 3)}: {verdict}; per CPU-second {res.cpu_ratio:.3f}")
        tracker.end()
    if args.each_key:
        ran = [(label, r) for label, r in results if isinstance(r, Result)]
        if ran:
            ref = statistics.median(ran[0][1].ours)
            print("\nspeed-up of our loop against the plain setting (median img/s):")
            for label, r in results:
                print(f"  {label:<24} " + (f"{statistics.median(r.ours) / ref:5.2f}x   (ratio ours/bare {r.ratio:.3f})" if isinstance(r, Result) else f"skipped: {r}"))
    return results


if __name__ == "__main__":
    main()
