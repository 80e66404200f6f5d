"""Accelerator settings of the training loop, each a config key (see docs/gpu.md):

* ``run.amp`` (none / bf16 / fp16): autocast in the loop (``training.autocast_dtype``); fp16 adds loss
  scaling. bf16 also runs on a CPU.
* ``run.channels_last``: the model's 4-D weights and every 4-D input batch in NHWC layout
  (:func:`prepare_model`, :func:`to_device`): tensor cores and cuDNN's fast convolution kernels
  prefer it, with AMP above all.
* ``run.compile``: ``torch.compile`` of the model's forward, in place (``nn.Module.compile``), so
  parameter names, checkpoints and ``state_dict`` keys stay what they are without it.
* ``data.pin_memory`` (auto / true / false): page-locked loader batches, so the host-to-GPU copy
  is asynchronous (:func:`pin_memory`); auto = on when training on a GPU.
* ``data.loader_workers`` (-1 = auto): DataLoader worker processes per training worker
  (:func:`loader_workers`).

Every function here is a no-op with the defaults, so the default loop is the loop it was.
"""

from __future__ import annotations

import os

import torch
from torch import nn

IN_MEMORY = ("digits",)  # datasets whose items are slices of a tensor already in memory
MAX_AUTO_WORKERS = 8


def prepare_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """``model`` on ``device``, in channels_last layout and compiled as ``cfg.run`` asks. In place
    (the same module is returned), so that DDP wrapping, ``state_dict`` and checkpoints see the
    module they would see without these settings."""
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D parameters only; others unchanged
    if cfg.run.compile:
        model.compile()  # nn.Module.compile: compiles __call__ in place, keys unchanged
    return model


def memory_format(cfg) -> torch.memory_format | None:
    return torch.channels_last if cfg.run.channels_last else None


def to_device(x: torch.Tensor, device: torch.device, fmt: torch.memory_format | None = None) -> torch.Tensor:
    """One batch tensor on ``device`` (asynchronous from pinned memory), NHWC when ``fmt`` is
    ``torch.channels_last`` and the tensor is a 4-D image batch."""
    if fmt is not None and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=fmt)
    return x.to(device, non_blocking=True)


def pin_memory(cfg, device: torch.device) -> bool:
    """``data.pin_memory``: auto = on for a CUDA device (pinning helps only host-to-GPU copies)."""
    value = cfg.data.pin_memory
    if value == "auto":
        return device.type == "cuda"
    return value == "true"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_workers(cfg, device: torch.device, cpus: float | None = None) -> int:
    """``data.loader_workers``, with -1 (auto) resolved per training worker:

    * in-memory data (digits) and synthetic tensors on a CPU: 0 (worker processes only add copies);
    * otherwise the CPUs this training worker holds (``run.cpus_per_worker``, or the machine's when
      training in the driver) minus one for the training process itself, at most 8: on a GPU node
      give each GPU worker ``cpus_per_worker`` = its share of the node's cores (e.g. 8 of 64 for
      8 GPUs) and auto uses 7 of them for decoding.
    """
    value = cfg.data.loader_workers
    if value >= 0:
        return value
    if cfg.data.name in IN_MEMORY or (cfg.data.name == "synthetic" and device.type != "cuda"):
        return 0
    cpus = cpus if cpus is not None else (cfg.run.cpus_per_worker if cfg.run.num_workers > 0 else available_cpus())
    return max(0, min(MAX_AUTO_WORKERS, int(cpus) - 1))
