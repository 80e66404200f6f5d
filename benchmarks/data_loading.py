"""Does data loading starve training? Loader images/s against what training consumes, per setting.

    python -m benchmarks.data_loading                                 # digits, CIFAR-10 JPEGs, ImageNet-sized JPEGs
    python -m benchmarks.data_loading --cases cifar10-jpg --subset 4096 --workers 0,1,2,4
    python -m benchmarks.data_loading --device cuda --pin both         # pinned memory on a GPU

For every dataset case, with the training loader of ``dynlab.training.make_loaders`` (same
dataset object, sampler, batch size) and our training loop:

* ``compute``: what training consumes, images/s of ``train_one_epoch`` over batches already in
  memory (the same model, batch size and images; no loading at all), best over the case's rows;
* ``loader``: images/s of the loader alone (a full pass, after a warm-up pass, so persistent
  workers are running);
* ``train``: images/s of ``train_one_epoch`` over the real loader (end to end, after a warm-up
  epoch), best of ``--repeats`` epochs interleaved with the compute epochs;
* ``starved``: ``train`` below 0.9 of ``compute`` (loading costs the training more than 10%).

With ``data.loader_workers=0`` loading runs between steps, so ``train`` is about
1 / (1/compute + 1/loader); with workers it overlaps with the steps, as long as the machine has
cores for both (on 2 cores, 2 torch threads and a worker compete).

Cases: ``digits`` (in memory, tensor crops); ``cifar10-jpg`` (the CIFAR-10 copy at
../shared/datasets/cifar10-jpg.zip as JPEG files, extracted once under $DYNLAB_CACHE; a seeded
subset of ``--subset`` training images; CIFAR-style augmentation at 32x32); ``imagenet-jpg``
(synthetic ImageNet-sized images: ``--subset`` JPEG files of 500x375 pixels, smooth colour fields
with noise, written once to a temporary folder and decoded by the imagefolder path like ImageNet:
RandomResizedCrop 224 + flip + normalise); ``imagenet-tensor`` (dataset=synthetic at 224x224:
float tensors generated per item, no decoding). The model is the default training config's
(boostnet/msdnet) at each case's image size; extra ``key=value`` arguments override it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

import methods  # noqa: F401  (fills the registries)
from dynlab import accel, config, training

CIFAR_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg.zip"
CASES = ("digits", "cifar10-jpg", "imagenet-jpg", "imagenet-tensor")
STARVED = 0.9  # train below this fraction of compute: loading starves training


@dataclass
class Row:
    case: str
    workers: int
    pin: bool
    images: int  # per epoch (training images of the subset; full batches only)
    compute: float  # img/s
    loader: float
    train: float

    @property
    def starved(self) -> bool:
        return self.train < STARVED * self.compute


def write_jpegs(root: Path, n_train: int, n_val: int = 20, classes: int = 10, size=(500, 375), seed: int = 0) -> Path:
    """An ImageNet-layout folder of JPEGs (``size`` = width, height; ImageNet's typical 500x375):
    per class a smooth colour field, plus noise per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % classes
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            phase = rng.uniform(0, 2 * np.pi, 3)
            field_ = np.stack([np.sin(xx / (20 + 7 * c) + phase[k]) * np.cos(yy / (30 + 5 * k) + phase[k]) for k in range(3)], -1)
            img = (127 + 80 * field_ + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)
    return root


def subset_size(case: str, args) -> int:
    return args.subset_224 if case.startswith("imagenet") else args.subset


def case_overrides(case: str, subset: int, tmp: Path, cifar_zip: Path) -> list[str]:
    if case == "digits":
        return ["dataset=digits"]
    if case == "cifar10-jpg":
        if not cifar_zip.is_file():
            raise FileNotFoundError(f"{cifar_zip} not found (pass --cifar-zip)")
        return ["dataset=imagefolder", f"data.root={cifar_zip}", "data.heldout=1000"]
    if case == "imagenet-jpg":
        folder = tmp / "imagenet-jpg"
        if not folder.exists():
            write_jpegs(folder, subset)
        return ["dataset=imagefolder", f"data.root={folder}", "data.heldout=1"]
    if case == "imagenet-tensor":
        return ["dataset=synthetic", "data.image_size=224", f"data.synthetic_train={subset + 1}", "data.heldout=1"]
    raise ValueError(case)


def epoch_images(loader) -> int:
    return len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader, device, pin: bool) -> float:
    """Images/s of one pass of ``loader``, after a warm-up pass (batches copied to ``device``)."""
    for _ in loader:
        pass
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        if device.type == "cuda":
            x = x.to(device, non_blocking=pin)
        n += len(y)
    sync(device)
    return n / (time.perf_counter() - t0)


def train_rate(loop, batches, sampler, device) -> float:
    """Images/s of one epoch of ``train_one_epoch`` over ``batches`` (a loader, or batches in memory)."""
    sync(device)
    t0 = time.perf_counter()
    training.train_one_epoch(loop, batches, sampler, 1, time.time())
    sync(device)
    seconds = time.perf_counter() - t0
    return (sum(len(y) for _, y in batches) if isinstance(batches, list) else epoch_images(batches)) / seconds


def measure_case(case: str, overrides: list[str], args, device) -> list[Row]:
    base = config.cli_config(["optim.schedule=constant", "run.num_workers=0", *overrides, *args.overrides] + (["run.use_gpu=true"] if device.type == "cuda" else []))
    rows: list[Row] = []
    compute = None
    pins = {"off": [False], "on": [True], "both": [False, True]}[args.pin]
    for workers in args.workers:
        for pin in pins:
            if pin and device.type != "cuda":
                continue  # pinned memory only speeds up host-to-GPU copies (reported once in main)
            cfg = base.with_overrides({"data.loader_workers": workers, "data.pin_memory": str(pin).lower()})
            loop = training.build_loop(cfg, device=device)
            n = subset_size(case, args)
            if len(loop.bundle.train) > n:  # a seeded subset, so that a case runs in minutes
                pick = np.sort(np.random.default_rng(0).choice(len(loop.bundle.train), n, replace=False))
                loop.bundle.train = Subset(loop.bundle.train, pick.tolist())
            sampler, loader, _ = training.make_loaders(loop)
            batches = [(x.clone(), y.clone()) for x, y in loader]  # the same epoch, in memory
            load = loader_rate(loader, device, pin)
            train_rate(loop, loader, sampler, device)  # warm-up (workers, allocator, caches)
            computes, trains = [], []
            for _ in range(args.repeats):  # interleaved; best of each: load from other processes only slows
                computes.append(train_rate(loop, batches, sampler, device))
                trains.append(train_rate(loop, loader, sampler, device))
            compute = max([compute or 0.0, *computes])  # the same model and batch size whatever the loader
            rows.append(Row(case, workers, pin, epoch_images(loader), compute, load, max(trains)))
            del loader  # ends its worker processes
    for r in rows:  # one compute figure per case: the best measured
        r.compute = compute
        print(f"{case:<16} {r.workers:>7} {str(r.pin):>5} {r.images:>6} {r.compute:>9.0f} {r.loader:>9.0f} {r.train:>9.0f} {r.train / r.compute:>7.2f}  {'STARVED' if r.starved else 'ok'}", flush=True)
    return rows


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value for every case (e.g. batch_size=128)")
    ap.add_argument("--cases", default=",".join(CASES[:3]), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--workers", default="0,1,2", help="data.loader_workers values")
    ap.add_argument("--pin", choices=("off", "on", "both"), default="both", help="pin_memory settings (timed on a CUDA device only)")
    ap.add_argument("--subset", type=int, default=1024, help="training images of the 32x32 cases (digits has 997)")
    ap.add_argument("--subset-224", type=int, default=256, help="training images of the 224x224 cases")
    ap.add_argument("--cifar-zip", default=str(CIFAR_ZIP))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs of compute and of train per setting (best taken)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    print(f"data loading vs training: device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {accel.available_cpus()} CPUs; images/s")
    if device.type != "cuda":
        print("pin_memory: not timed (no CUDA device: pinned memory only speeds up host-to-GPU copies)")
    print(f"{'case':<16} {'workers':>7} {'pin':>5} {'images':>6} {'compute':>9} {'loader':>9} {'train':>9} {'train/compute':>7}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dynlab-data-loading-") as tmp:
        for case in cases:
            try:
                overrides = case_overrides(case, subset_size(case, args), Path(tmp), Path(args.cifar_zip))
            except FileNotFoundError as err:
                print(f"{case:<16} skipped: {err}")
                continue
            rows += measure_case(case, overrides, args, device)
    starved = [r for r in rows if r.starved]
    print("\nstarving settings (train < 0.9 x compute): " + (", ".join(f"{r.case} workers={r.workers} pin={r.pin}" for r in starved) or "none"))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    main()
