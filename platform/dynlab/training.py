"""One Ray Train (V2) loop for every method.

The driver calls :func:`fit`; each worker runs :func:`train_loop_per_worker`, which owns what a
method must not: devices, DDP, the distributed sampler, optimiser and schedule, AMP, clipping,
checkpoints, progress and logging (rank 0 only). The method supplies ``build_model``,
``train_step(model, batch, backward)`` and ``predict``.

``run.init_from`` (IMTA's phase II: a phase-I checkpoint) is loaded before epoch 0 unless the run
resumes. Checkpoints (one per epoch, rank 0) hold ``state.pt`` (model, optimiser, schedule, scaler, epoch,
best score; the EMA with ``run.ema_decay``) and ``best.pt`` (weights of the epoch with the best
held-out score: the EMA's with ``run.ema_eval``). The recipe pieces (AdamW, MixUp / CutMix / label
smoothing, EMA) are :mod:`dynlab.recipe`. A run restarted
under the same ``run.name`` resumes from the latest one. Model selection uses the held-out split
only, never the test set.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from dynlab import config as config_mod
from dynlab.errors import StorageError, TrainingDiverged
from dynlab.predictions import ExitPredictions, GatedPredictions, Predictions, SubnetPredictions, concat

STATE_FILE = "state.pt"
PROGRESS_SECONDS = 30.0  # a progress line within an epoch at most this often
BEST_FILE = "best.pt"
FINAL_FLUSH_SECONDS = 300.0  # at the end of training, buffered metrics wait this long for the tracking server


# ---------------------------------------------------------------- pieces usable outside Ray


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def import_plugins(modules: list[str]) -> None:
    """Import the packages that fill the registries (``methods``) in a fresh worker process."""
    for name in modules:
        importlib.import_module(name)


def build_optimizer(model: torch.nn.Module, cfg, method=None) -> torch.optim.Optimizer:
    """SGD (``optim.name=sgd``) or AdamW over the model. A method may split its parameters into
    groups with their own settings (``method.param_groups(model)`` -> ``[{"params": [...],
    "lr_scale": 0.1, "weight_decay": 0}, ...]``, e.g. DMNN's gate layers); the schedule then scales
    every group's learning rate alike. AdamW splits each group again: no weight decay on norms,
    biases, embeddings and position / class tokens (:func:`dynlab.recipe.no_weight_decay`), as DeiT;
    SGD does so with ``optim.decay_norms=false``."""
    o = cfg.optim
    groups = method.param_groups(unwrap(model)) if hasattr(method, "param_groups") else [{"params": list(model.parameters())}]
    groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": o.lr * g.get("lr_scale", 1.0)} for g in groups]
    if o.name == "adamw" or not o.decay_norms:
        from dynlab import recipe

        groups = recipe.split_weight_decay(unwrap(model), groups, o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)


def lr_factor(epoch: int, cfg) -> float:
    """Learning-rate multiplier for a 0-based epoch: optional linear warm-up, then the schedule.
    Milestones are fractions of the epochs (0.5, 0.75 = the papers' 150/225 of 300); the cosine
    decays from the full rate towards ``optim.min_lr`` (0 by default)."""
    o, epochs = cfg.optim, cfg.run.epochs
    if epoch < o.warmup_epochs:
        return (epoch + 1) / (o.warmup_epochs + 1)
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "cosine":
        span = max(1, epochs - o.warmup_epochs)
        floor = o.min_lr / o.lr if o.lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - o.warmup_epochs) / span))
    return o.gamma ** sum(epoch >= m for m in milestone_epochs(o.milestones, epochs))


def milestone_epochs(fractions: list[float], epochs: int) -> list[int]:
    """The 0-based epochs at which each milestone fraction lowers the rate. Never epoch 0 (the first
    epoch runs at the full rate), strictly increasing (distinct fractions stay distinct), pulled back
    inside the run when there are enough epochs for all; a milestone at >= ``epochs`` never fires."""
    out: list[int] = []
    for m in fractions:
        out.append(max(round(m * epochs), 1, out[-1] + 1 if out else 1))
    if epochs - 1 >= len(out):  # room for every milestone: the i-th from the end at most epochs - 1 - i
        for i in range(len(out) - 1, -1, -1):
            out[i] = min(out[i], epochs - (len(out) - i))
    return out


def output_accuracy(preds: Predictions, labels: torch.Tensor) -> torch.Tensor:
    """Correct counts per output (exit / sub-network), or one count for gated predictions."""
    if isinstance(preds, (ExitPredictions, SubnetPredictions)):
        return (preds.logits.argmax(-1) == labels.unsqueeze(0)).sum(1).double()
    if isinstance(preds, GatedPredictions):
        return (preds.logits.argmax(-1) == labels).sum().double().reshape(1)
    raise TypeError(f"unknown prediction type {type(preds).__name__}")


@torch.no_grad()
def predict_dataset(method, model, dataset, batch_size: int, device, max_batches: int = 0, amp_dtype=None) -> tuple[Predictions, torch.Tensor]:
    """Run ``method.predict`` over a dataset (no augmentation: pass the eval-transform dataset)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts, labels = [], []
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = method.predict(model, x.to(device, non_blocking=True))
        parts.append(_to_cpu(p))
        labels.append(y)
    if not parts:
        raise ValueError("cannot predict on an empty dataset")
    return concat(parts), torch.cat(labels)


def _to_cpu(p: Predictions) -> Predictions:
    kw = {k: (v.detach().float().cpu() if k == "logits" else v.detach().cpu()) if torch.is_tensor(v) else v for k, v in vars(p).items()}
    return type(p)(**kw)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def load_trained(cfg, checkpoint_dir: str | Path, info, which: str = BEST_FILE):
    """Build the method and its model, and load weights saved by the loop (weights_only)."""
    from dynlab.registry import get_method

    method = get_method(cfg.method).cls(cfg)
    model = method.build_model(info)
    from dynlab.storage import open_file

    state = torch.load(open_file(checkpoint_dir, which), map_location="cpu", weights_only=True)  # a folder or a URI
    model.load_state_dict(state["model"] if "model" in state else state)
    return method, model


# ---------------------------------------------------------------- the worker loop


def autocast_dtype(cfg):
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.run.amp]


def _progress(msg: str) -> None:
    # sys.__stdout__: Ray Train patches print() into a logger and tees it when a library (MLflow)
    # wraps sys.stdout, which printed every line twice.
    print(f"[dynlab] {msg}", file=sys.__stdout__ or sys.stdout, flush=True)


@dataclass
class Loop:
    """What the worker loop carries from one epoch to the next."""

    cfg: Any
    rank: int
    world: int
    device: torch.device
    tracker: Any  # a tracking.RunHandle on rank 0 when the run is tracked, else None
    bundle: Any  # data.DataBundle
    method: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: Any
    local_root: Path | None  # in-process mode: we persist checkpoints here (Ray does not)
    start_epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)  # every epoch's metrics, saved with the checkpoint
    logged_epochs: set[int] = field(default_factory=set)  # epochs already in the MLflow run
    best_saved: tuple[int, Path] | None = None  # (best epoch, its best.pt in the latest local checkpoint): linked, not re-written, while unchanged
    tune_trial: bool = False  # in-process in a Tune trial: Ray forbids ray.train.* there; epochs go to Tune via ray.tune.report
    ema: Any = None  # run.ema_decay > 0: an AveragedModel of the (unwrapped) model, updated after every step
    mix: Any = None  # MixUp / CutMix / label smoothing: (images, labels) -> (images, soft targets), or None


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray.train

    loop = setup(payload)
    loop.tune_trial = bool(payload.get("tune_trial"))
    resumed = find_checkpoint(payload)
    if resumed is not None:
        resume(loop, *resumed)
    elif loop.cfg.run.init_from:
        init_from(loop)
    sampler, loader, heldout_shard = make_loaders(loop)
    for epoch in range(loop.start_epoch, loop.cfg.run.epochs):
        t0, lr = time.time(), loop.optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(loop, loader, sampler, epoch, t0)
        heldout_metrics, score = score_heldout(loop, heldout_shard, epoch)
        update_best(loop, score, epoch)
        metrics = {"epoch": epoch, "lr": lr, "epoch_seconds": time.time() - t0, **train_metrics, **heldout_metrics, "best_score": loop.best_score, "best_epoch": loop.best_epoch}
        metrics.update(best_epoch_metrics([*loop.history, metrics], loop.best_epoch))
        loop.history.append(metrics)
        if loop.rank == 0:
            _print_epoch(loop, metrics, epoch)
            log_epoch(loop, metrics)
            save_checkpoint(loop, epoch, metrics)
        else:
            ray.train.report(metrics)
        if loop.cfg.run.kill_after_epoch == epoch:  # fault injection for tests: die like a preempted node.
            # Fires once: a retry resumes from this epoch's checkpoint, so it never reaches this epoch again.
            os.kill(os.getpid(), signal.SIGKILL)
        if epoch + 1 < loop.cfg.run.epochs:
            hold_at_test_gate(epoch)
    note = cost_band_note(loop.history[-1]) if loop.history else ""
    if note and loop.rank == 0:
        _progress(note)
    if loop.tracker and not loop.tracker.flush(FINAL_FLUSH_SECONDS):
        _progress("tracking server still unreachable: some epochs' metrics were not logged (the checkpoints hold them; a resumed run logs them)")


TEST_GATE_ENV = "DYNLAB_TEST_EPOCH_GATE"
TEST_GATE_SECONDS = 600.0


def hold_at_test_gate(epoch: int) -> None:
    """Fault tests only: with ``$DYNLAB_TEST_EPOCH_GATE`` naming a file that holds a number N,
    training waits once the run has N epochs done (checkpointed and logged; resumed ones count)
    until the file allows more or is removed, so that a test acts between two known epochs
    whatever the machine's speed. Unset (outside tests): returns at once."""
    gate = os.environ.get(TEST_GATE_ENV)
    deadline = time.monotonic() + TEST_GATE_SECONDS
    while gate:
        try:
            if int(Path(gate).read_text() or -1) > epoch + 1:
                return
        except FileNotFoundError:
            return
        if time.monotonic() > deadline:  # a test that died: never train on unobserved
            raise RuntimeError(f"{TEST_GATE_ENV}={gate} held epoch {epoch + 1} for {TEST_GATE_SECONDS:.0f} s")
        time.sleep(0.1)


def setup(payload: dict[str, Any]) -> Loop:
    """Config, rank, device, data, model, optimiser, schedule and scaler, identical on every rank."""
    import ray.train
    import ray.train.torch

    from dynlab.tracking import RunHandle

    import_plugins(payload.get("plugins", []))
    cfg = config_mod.from_dict(payload["config"])
    rank, world = _rank_and_world(payload)
    seed_everything(cfg.run.seed + rank)
    device = ray.train.torch.get_device() if world > 1 or cfg.run.use_gpu else torch.device("cpu")
    tracker = RunHandle(**payload["tracking"]) if rank == 0 and payload.get("tracking") else None
    if tracker:
        _best_effort(tracker.set_tags, {"dynlab.world_size": world, "dynlab.device": str(device)})
    local_root = Path(payload["local_checkpoint_root"]) if payload.get("local_checkpoint_root") else None
    return build_loop(cfg, rank, world, device, tracker, local_root)


def build_loop(cfg, rank: int = 0, world: int = 1, device: torch.device | None = None, tracker=None, local_root: Path | None = None) -> Loop:
    """Data, model, optimiser, schedule and scaler of :func:`setup`, without a Ray Train context
    (what ``benchmarks.throughput`` times in-process)."""
    from dynlab import accel
    from dynlab import data as data_mod
    from dynlab.registry import get_method

    device = device or torch.device("cpu")
    bundle = data_mod.build_datasets(cfg.data, cfg.run.seed)
    method = get_method(cfg.method).cls(cfg)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = accel.prepare_model(method.build_model(bundle.info), cfg, device)  # on the device; channels_last
    optimizer = build_optimizer(model, cfg, method)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))
    amp_dtype = autocast_dtype(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    from dynlab import recipe

    loop = Loop(cfg, rank, world, device, tracker, bundle, method, model, optimizer, scheduler, scaler, amp_dtype, local_root)
    loop.ema = recipe.make_ema(model, cfg.run.ema_decay) if cfg.run.ema_decay > 0 else None
    if loop.ema is not None and cfg.run.compile:  # the copy is not compiled (deepcopy drops it)
        loop.ema.module.compile()
    loop.mix = recipe.batch_targets(cfg, bundle.info.num_classes)
    return loop


def eval_model(loop: Loop) -> torch.nn.Module:
    """The weights held-out scoring and model selection use: the EMA's with ``run.ema_eval``."""
    return loop.ema.module if loop.ema is not None and loop.cfg.run.ema_eval else unwrap(loop.model)


def _rank_and_world(payload: dict[str, Any]) -> tuple[int, int]:
    if payload.get("tune_trial"):  # in-process: one worker, and ray.train.get_context() refuses to run in a Tune trial
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def find_checkpoint(payload: dict[str, Any]) -> tuple[dict, dict] | None:
    """``(state, best weights)`` of the newest readable checkpoint of this run, or None. On local
    storage the run folder is read too: a worker killed right after saving may die before Ray
    registers that checkpoint, and the retry must not train (or log) that epoch again."""
    import ray.train

    folders = []
    if payload.get("run_dir"):
        folders += sorted(Path(payload["run_dir"]).glob("epoch_*"), reverse=True)
    ckpt = None if payload.get("tune_trial") else ray.train.get_checkpoint()  # in a Tune trial: the run folder is all there is
    candidates = [lambda d=d: _read_checkpoint(d) for d in folders]
    if ckpt is not None:
        candidates.append(lambda: _read_ray_checkpoint(ckpt))
    if payload.get("resume_dir"):
        candidates.append(lambda: _read_checkpoint(Path(payload["resume_dir"])))
    for read in candidates:
        found = read()
        if found is not None:
            return found
    return None


def _read_checkpoint(d: Path) -> tuple[dict, dict] | None:
    try:  # a checkpoint cut short by a crash (truncated file) is skipped, not fatal
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
        return state, torch.load(d / BEST_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None


def _read_ray_checkpoint(ckpt) -> tuple[dict, dict] | None:
    with ckpt.as_directory() as d:
        return _read_checkpoint(Path(d))


def resume(loop: Loop, state: dict, best_state: dict) -> None:
    """Restore model, optimiser, schedule, scaler and best-so-far; complete the MLflow curve with
    any checkpointed epoch whose metrics never reached the server."""
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    if loop.ema is not None and "ema" in state:
        loop.ema.load_state_dict(state["ema"])
    loop.start_epoch, loop.best_score, loop.best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
    loop.best_state, loop.history = best_state, list(state.get("history", []))
    if loop.rank != 0:
        return
    _progress(f"resumed from checkpoint after epoch {loop.start_epoch} of {loop.cfg.run.epochs}")
    if loop.tracker:
        _best_effort(loop.tracker.set_tags, {"dynlab.resumed_at_epoch": loop.start_epoch})
        loop.logged_epochs = _best_effort(_logged_epochs, loop.tracker) or set()
        for metrics in loop.history:
            log_epoch(loop, metrics)


def read_weights(source: str) -> dict:
    """Weights to start from: a .pt file, or a folder holding best.pt; a full state.pt gives its model.
    A ConfigError naming ``run.init_from`` when the file holds no state dict (tensor name -> tensor)
    or a tensor with NaN or inf values: training from those would only spread them."""
    from dynlab.errors import ConfigError

    path = Path(source)
    state = torch.load(path / BEST_FILE if path.is_dir() else path, map_location="cpu", weights_only=True)
    state = state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state
    wrong = f"a {type(state).__name__}" if not isinstance(state, dict) else next((f"{k!r} -> {type(v).__name__}" for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if wrong is not None:
        raise ConfigError("run.init_from", source, f"a state dict (tensor names -> tensors, as torch.save(model.state_dict(), path) writes); this file holds {wrong}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ConfigError("run.init_from", source, f"finite weights: tensor {bad!r} holds NaN or inf values (start from an earlier checkpoint of the run that wrote them)")
    return state


def init_from(loop: Loop) -> None:
    """``run.init_from`` into the model before epoch 0 (a resumed run has its own weights): through
    the method's ``load_init(model, state, source)`` when it has one (IMTA's phase II maps phase I's
    weights and leaves its new parts as built), else a strict load."""
    source = loop.cfg.run.init_from
    state = read_weights(source)
    hook = getattr(loop.method, "load_init", None)
    if hook is not None:
        hook(unwrap(loop.model), state, source)
    else:
        unwrap(loop.model).load_state_dict(state)
    if loop.rank == 0:
        _progress(f"initialised from {source}")
        if loop.tracker:
            _best_effort(loop.tracker.set_tags, {"dynlab.init_from": source})


def _logged_epochs(tracker) -> set[int]:
    from dynlab.tracking import client

    return {m.step for m in client(tracker.uri).get_metric_history(tracker.run_id, "best_score")}


def make_loaders(loop: Loop):
    """The distributed sampler, the training loader and this rank's shard of the held-out split."""
    cfg, world, rank = loop.cfg, loop.world, loop.rank
    if world > 1:
        import ray.train.torch

        loop.model = ray.train.torch.prepare_model(loop.model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": bool(getattr(loop.model, "ddp_find_unused_parameters", False))})  # ADN: a pass leaves some norms unused
    train = loop.bundle.train
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.run.seed, drop_last=False)
    from dynlab import accel

    workers = accel.loader_workers(cfg, loop.device)
    loader = DataLoader(
        train, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers, drop_last=len(train) > cfg.data.batch_size * world,
        pin_memory=accel.pin_memory(cfg, loop.device), persistent_workers=workers > 0,  # workers kept across epochs
    )
    heldout_shard = Subset(loop.bundle.heldout, list(range(rank, len(loop.bundle.heldout), world)))
    return sampler, loader, heldout_shard


def train_one_epoch(loop: Loop, loader, sampler, epoch: int, t0: float) -> dict[str, float]:
    """One pass over the training set; the method's step metrics averaged over samples (and ranks)."""
    from dynlab.accel import memory_format, to_device

    cfg, device, scaler, optimizer = loop.cfg, loop.device, loop.scaler, loop.optimizer
    fmt = memory_format(cfg)  # channels_last input batches, or None

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss).backward()

    sampler.set_epoch(epoch)
    hook = getattr(loop.method, "on_epoch_start", None)  # e.g. DMNN's gate warm-up and annealing
    if hook is not None:
        hook(unwrap(loop.model), epoch, cfg.run.epochs)
        if loop.ema is not None:  # attributes the hook sets (not weights) are the EMA copy's too
            hook(loop.ema.module, epoch, cfg.run.epochs)
    loop.model.train()
    sums: dict[str, torch.Tensor] = {}
    seen, last_note = 0, time.time()
    watch = LossWatch(device)
    for step, (images, targets) in enumerate(loader):
        images, targets = to_device(images, device, fmt), targets.to(device, non_blocking=True)
        if loop.mix is not None:  # MixUp / CutMix / label smoothing: soft targets
            images, targets = loop.mix(images, targets)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
            metrics = loop.method.train_step(loop.model, (images, targets), backward)
        watch.step(metrics.get("loss"), step, epoch, len(loader), cfg)  # before the optimiser takes a NaN step
        if cfg.run.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.run.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if loop.ema is not None:
            loop.ema.update_parameters(unwrap(loop.model))
        n = targets.shape[0]
        seen += n
        for k, v in metrics.items():  # summed on the device: no host sync per step
            v = v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64, device=device)
            sums[k] = sums.get(k, 0) + v * n
        if loop.rank == 0 and time.time() - last_note > PROGRESS_SECONDS:  # long epochs show progress
            last_note = time.time()
            watch.check(epoch, len(loader), cfg)  # synchronised here anyway
            loss = float(sums["loss"]) / seen if "loss" in sums else float("nan")
            _progress(f"epoch {epoch + 1}/{cfg.run.epochs}  step {step + 1}/{len(loader)}  loss {loss:.4f}  {seen / (last_note - t0):.0f} img/s")
    watch.check(epoch, len(loader), cfg)  # before this epoch's weights can be scored, selected or saved
    loop.scheduler.step()
    train_metrics = {f"train/{k}": float(v) / max(seen, 1) for k, v in sums.items()}
    if loop.world > 1:  # average over ranks
        keys = sorted(train_metrics)
        t = torch.tensor([train_metrics[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        train_metrics = {k: float(v) / loop.world for k, v in zip(keys, t)}
    return train_metrics


class LossWatch:
    """Stops training at a NaN or infinite loss (``optim.lr=1e6`` gives one in the first steps),
    with one line naming the epoch, the step and the keys to look at. On the CPU every step's loss
    is checked at once (a comparison, no synchronisation to pay). On an accelerator reading the
    loss each step would stall the queue of kernels, so the first bad step is kept on the device
    (a couple of tiny kernels per step) and read where the loop synchronises anyway: at progress
    lines and at the end of the epoch, before its weights are scored, selected or checkpointed."""

    def __init__(self, device: torch.device, deferred: bool | None = None):
        self.on_cpu = device.type == "cpu" if deferred is None else not deferred
        self.first_bad = None if self.on_cpu else torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = None if self.on_cpu else torch.zeros((), dtype=torch.float32, device=device)

    def step(self, loss, step: int, epoch: int, steps: int, cfg) -> None:
        if not torch.is_tensor(loss):
            if loss is not None and not math.isfinite(float(loss)):
                raise diverged(float(loss), epoch, step, steps, cfg)
            return
        loss = loss.detach().float()
        if self.on_cpu:
            if not torch.isfinite(loss).all():
                raise diverged(float(loss.sum()), epoch, step, steps, cfg)
            return
        new = (self.first_bad < 0) & ~torch.isfinite(loss).all()
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_value = torch.where(new, loss.sum(), self.bad_value)

    def check(self, epoch: int, steps: int, cfg) -> None:
        if self.first_bad is not None and int(self.first_bad) >= 0:
            raise diverged(float(self.bad_value), epoch, int(self.first_bad), steps, cfg)


def diverged(value: float, epoch: int, step: int, steps: int, cfg) -> TrainingDiverged:
    """The one line for a non-finite loss (0-based ``epoch`` and ``step``, printed 1-based)."""
    r, o = cfg.run, cfg.optim
    return TrainingDiverged(
        f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step + 1} of {steps}; nothing of this epoch is kept. "
        f"Lower optim.lr (now {o.lr:g}) or add optim.warmup_epochs (now {o.warmup_epochs}), check run.amp (now {r.amp}; fp16 can overflow), "
        f"set run.grad_clip (now {r.grad_clip:g}{', off' if not r.grad_clip else ''}), or look at data.batch_size (now {cfg.data.batch_size})"
    )


def selection_score(acc: float, cost_rate: float | None, band: tuple | None) -> float:
    """Model selection's score of an epoch: its held-out accuracy when there is no cost band or
    its held-out cost rate lies in ``band`` = (lo, hi, ...); else ``-d / (1 + d)`` with d the
    distance to the band, in (-1, 0): below every epoch that meets the band, the closest first."""
    if band is None or cost_rate is None:
        return acc
    lo, hi = band[0], band[1]
    d = max(lo - cost_rate, cost_rate - hi, 0.0)
    return acc if d == 0 else -d / (1 + d)


def best_epoch_metrics(history: list[dict], best_epoch: int) -> dict[str, float]:
    """The kept epoch's held-out accuracy, cost rate and whether it met the cost band, as
    ``best_acc``, ``best_cost_rate``, ``best_meets_target`` (only the ones that epoch has)."""
    best = next((m for m in history if m.get("epoch") == best_epoch), {})
    keys = {"best_acc": "heldout/acc_mean", "best_cost_rate": "heldout/cost_rate", "best_meets_target": "heldout/meets_target", "cost_band_lo": "heldout/cost_band_lo", "cost_band_hi": "heldout/cost_band_hi"}
    return {k: float(best[v]) for k, v in keys.items() if v in best}


def cost_band_note(metrics: dict) -> str:
    """The line for a run whose kept epoch does not meet its cost band ("" when it does or has none)."""
    if metrics.get("best_meets_target", 1.0) != 0.0:
        return ""
    return (
        f"no epoch's held-out cost was within [{metrics['cost_band_lo']:.2f}, {metrics['cost_band_hi']:.2f}] of the dense cost (the method's cost target): "
        f"kept epoch {int(metrics['best_epoch']) + 1}, the closest (cost {metrics['best_cost_rate']:.2f})"
    )


def score_heldout(loop: Loop, shard, epoch: int) -> tuple[dict[str, float], float]:
    """Held-out accuracy per output (each rank predicts its shard; counts are summed) and the
    selection score: mean held-out accuracy, or the epoch itself for ``run.select=last`` or
    without a held-out split ("best" then means "latest"). A method with a cost target
    (``method.cost_band()`` -> (lo, hi) of executed / dense cost, or None) has the epochs whose
    held-out cost is outside it ranked below every one inside (:func:`selection_score`). The test
    set is never looked at."""
    if not len(loop.bundle.heldout):
        return {}, float(epoch)
    correct, count, rate_sum = _heldout_counts(loop.method, eval_model(loop), shard, loop.cfg, loop.device, loop.amp_dtype)
    if loop.world > 1:
        for t in (correct, count) if rate_sum is None else (correct, count, rate_sum):
            dist.all_reduce(t)
    acc = (correct / count.clamp(min=1) * 100).tolist()
    metrics = {f"heldout/acc_out{i}": a for i, a in enumerate(acc)}
    metrics["heldout/acc_mean"] = float(np.mean(acc))
    if rate_sum is not None:  # gated networks: the executed share of the dense cost at evaluation (no gate noise)
        metrics["heldout/cost_rate"] = float(rate_sum) / max(float(count[0]), 1.0)
    band = getattr(loop.method, "cost_band", lambda: None)()
    if band is not None and "heldout/cost_rate" in metrics:
        score = selection_score(metrics["heldout/acc_mean"], metrics["heldout/cost_rate"], band)
        metrics.update({"heldout/meets_target": float(score >= 0), "heldout/cost_band_lo": float(band[0]), "heldout/cost_band_hi": float(band[1])})
    else:
        score = metrics["heldout/acc_mean"]
    return metrics, score if loop.cfg.run.select == "best" else float(epoch)


def update_best(loop: Loop, score: float, epoch: int) -> None:
    if score > loop.best_score:
        loop.best_score, loop.best_epoch = score, epoch
        loop.best_state = {k: v.detach().cpu().clone() for k, v in eval_model(loop).state_dict().items()}


def log_epoch(loop: Loop, metrics: dict[str, Any]) -> None:
    """One epoch's metrics into the MLflow run, once: an epoch trained again after a crash between
    logging and checkpointing keeps its first point (a curve has one point per epoch)."""
    epoch = int(metrics["epoch"])
    if loop.tracker is None or epoch in loop.logged_epochs:
        return
    loop.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)  # buffered, never raises
    loop.logged_epochs.add(epoch)


def save_checkpoint(loop: Loop, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0's checkpoint of this epoch (state, best weights, config), reported to Ray."""
    import ray.train

    model = unwrap(loop.model)
    state = {
        "model": model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "epoch": epoch,
        "best_score": loop.best_score,
        "best_epoch": loop.best_epoch,
        "history": loop.history,
    }
    if loop.ema is not None:
        state["ema"] = loop.ema.state_dict()
    if loop.local_root is None:
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "checkpoint"
            with _unwritable_as_storage_error(folder, epoch):
                folder.mkdir()
                _write_checkpoint(folder, state, loop.best_state, loop.cfg)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=f"epoch_{epoch:04d}")
        return
    final = loop.local_root / f"epoch_{epoch:04d}"
    partial = loop.local_root / f".partial_epoch_{epoch:04d}"
    with _unwritable_as_storage_error(partial, epoch):
        partial.mkdir(parents=True, exist_ok=True)
        same_best = loop.best_saved[1] if loop.best_saved and loop.best_saved[0] == loop.best_epoch else None
        _write_checkpoint(partial, state, loop.best_state, loop.cfg, same_best)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)  # atomic: a half-written checkpoint is never found as complete
    loop.best_saved = (loop.best_epoch, final / BEST_FILE)
    for old in sorted(loop.local_root.glob("epoch_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    if loop.tune_trial:  # Ray Train's local mode inside a Tune trial: Tune's API, for ASHA and the trial's progress
        from ray import tune

        tune.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))


def _print_epoch(loop: Loop, metrics: dict[str, Any], epoch: int) -> None:
    held = f"held-out acc (mean over outputs) {metrics['heldout/acc_mean']:.2f}%  " if "heldout/acc_mean" in metrics else ""
    if "heldout/cost_rate" in metrics:
        held += f"cost {metrics['heldout/cost_rate']:.2f} of dense  "
    _progress(f"epoch {epoch + 1}/{loop.cfg.run.epochs}  loss {metrics.get('train/loss', float('nan')):.4f}  {held}{metrics['epoch_seconds']:.1f}s")


def _best_effort(fn, *args):
    """Tracking calls made from the loop: a tracking failure is reported, never fatal to training."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        _progress(f"tracking call {getattr(fn, '__name__', fn)} failed, training goes on: {type(err).__name__}: {err}")
        return None


@contextlib.contextmanager
def _unwritable_as_storage_error(folder: Path, epoch: int):
    """A full disk or a read-only folder while checkpointing: the half-written folder is removed
    (a later run never resumes from it) and the error names the path, in one line."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise StorageError(
            f"cannot write the checkpoint of epoch {epoch + 1} into {folder}: {err.strerror or err}; "
            "free space (or set run.storage_path), then run the same command again: it resumes from the last complete checkpoint"
        ) from err


def _write_checkpoint(d: Path, state: dict, best_state: dict, cfg, same_best: Path | None = None) -> None:
    """Every checkpoint folder is complete on its own; best weights unchanged since ``same_best``
    was written are hard-linked from it rather than serialised again."""
    torch.save(state, d / STATE_FILE)
    try:
        if same_best is None:
            raise FileNotFoundError
        os.link(same_best, d / BEST_FILE)
    except OSError:  # none yet, removed, or a filesystem without hard links
        torch.save(best_state, d / BEST_FILE)
    (d / "config.yaml").write_text(cfg.to_yaml())


def _heldout_counts(method, model, shard, cfg, device, amp_dtype):
    """Correct counts per output and sample counts on this rank's held-out shard, and for gated
    predictions with a known dense cost the sum of executed / dense cost (else None)."""
    def rate_sum(preds, n: int):
        if not isinstance(preds, GatedPredictions) or not preds.full_cost:
            return None
        return (preds.costs.double().sum() / preds.full_cost).to(device) if n else torch.zeros((), dtype=torch.float64, device=device)

    if len(shard) == 0:  # more ranks than held-out samples: contribute zeros of the right size
        probe = method.predict(model, shard.dataset[0][0].unsqueeze(0).to(device))
        zeros = torch.zeros(probe.logits.shape[0] if probe.logits.dim() == 3 else 1, dtype=torch.float64, device=device)
        return zeros, zeros.clone(), rate_sum(probe, 0)
    preds, labels = predict_dataset(method, model, shard, cfg.data.eval_batch_size, device, amp_dtype=amp_dtype)
    correct = output_accuracy(preds, labels).to(device)
    return correct, torch.full_like(correct, float(labels.numel())), rate_sum(preds, labels.numel())


# ---------------------------------------------------------------- the driver side


@dataclass
class FitResult:
    checkpoint_dir: str  # latest checkpoint (holds best.pt and state.pt)
    metrics: dict[str, Any]
    name: str


def storage_path(cfg) -> str:
    """``run.storage_path`` made absolute, with its defaults (``$DYNLAB_STORAGE``, ``~/dynlab_runs``
    under a Ray job, else ``./dynlab_runs``: see :mod:`dynlab.storage`); URIs (s3://, gs://) as given.
    Resolve it in the driver: Ray workers and Tune trials run in folders of their own."""
    from dynlab import storage

    return storage.storage_path(cfg)


CHECKPOINT_FILES = (STATE_FILE, BEST_FILE, "config.yaml")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``epoch_*`` checkpoint of a run folder (a restarted run resumes from it)."""
    for d in sorted(Path(run_dir).glob("epoch_*"), reverse=True):
        if all((d / f).is_file() and (d / f).stat().st_size > 0 for f in CHECKPOINT_FILES):
            return d
    return None


def fit(cfg, name: str, tracking: dict | None = None, plugins: list[str] | None = None, callbacks: list | None = None, in_process: bool = False) -> FitResult:
    """Train ``cfg`` with a TorchTrainer named ``name``; the same name resumes from its checkpoints.
    ``in_process`` (a Tune trial of one CPU worker on local storage): the TorchTrainer runs in this
    process (Ray Train's local mode, ``num_workers=0``), checkpointed into the run folder as usual,
    each epoch reported to Tune (``callbacks`` do not run in local mode)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = storage_path(cfg)
    local_storage = "://" not in storage
    in_process = in_process and local_storage and cfg.run.num_workers <= 1 and not cfg.run.use_gpu
    resume = latest_checkpoint(Path(storage) / name) if local_storage else None  # remote storage: Ray restores
    if resume is not None:
        _progress(f"run '{name}' has a checkpoint at {resume.name}: resuming")
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "tracking": tracking,
            "plugins": plugins or ["methods"],
            "local_checkpoint_root": str(Path(storage) / name) if (cfg.run.num_workers == 0 or in_process) and local_storage else None,
            "tune_trial": in_process,
            "run_dir": str(Path(storage) / name) if local_storage else None,  # checkpoints a retry may read
            "resume_dir": str(resume) if resume else None,
        },
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=0 if in_process else cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if in_process:  # the loop checkpointed into the run folder itself (no ray.train.report in a Tune trial)
        last = latest_checkpoint(Path(storage) / name)
        if last is None:
            raise RuntimeError(f"training run '{name}' finished without a checkpoint")
        state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
        return FitResult(str(last), dict(state["history"][-1]) if state.get("history") else {}, name)
    if result.checkpoint is None:
        raise RuntimeError(f"training run '{name}' finished without a checkpoint")
    from dynlab.storage import checkpoint_uri

    return FitResult(checkpoint_uri(storage, result.checkpoint), dict(result.metrics or {}), name)  # a URI on remote storage
