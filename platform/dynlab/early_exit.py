"""Real early exit: a batched engine that runs block k only for the samples still undecided, so
the time spent follows the multiply-adds the budgeted evaluation reports. The reference codes only
simulate exits (the whole network always runs and exits are read off afterwards).

A model supports it by exposing ``exit_step(state, k) -> (state, logits)``: run block k and its
head on ``state`` (the images for k = 0, else whatever step k-1 returned: tensors, or nested
tuples/lists of tensors with the batch first, or None), and ``num_exits``. The engine drops the
samples that exit after each step from every tensor of the state before the next block runs.

Exit decisions use :func:`dynlab.evaluation.exits_here` (compared in float64), the rule of the
simulated exits, so the engine's exits equal the simulated ones whatever the logits' dtype
(float32, float64, bfloat16 under autocast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynlab.evaluation import DECISION_DTYPE, confidence, exits_here


def _select(state, keep: torch.Tensor):
    if state is None:
        return None
    if torch.is_tensor(state):
        return state[keep]
    if isinstance(state, (list, tuple)):
        return type(state)(_select(s, keep) for s in state)
    raise TypeError(f"early-exit state must hold tensors (or lists/tuples of them), got {type(state).__name__}")


@dataclass
class EarlyExitResult:
    pred: torch.Tensor  # [B] predicted class
    exit: torch.Tensor  # [B] index of the exit each sample left at
    confidence: torch.Tensor  # [B] max softmax probability at that exit


def supports_early_exit(model: nn.Module) -> bool:
    return callable(getattr(model, "exit_step", None))


def _checked_thresholds(model: nn.Module, thresholds, device: torch.device) -> torch.Tensor:
    """Thresholds as a float64 vector with one entry per exit of the model (its num_exits)."""
    if not supports_early_exit(model):
        raise TypeError(f"{type(model).__name__} has no exit_step(state, k): real early exit is not available for it")
    num_exits = getattr(model, "num_exits", None)
    if not isinstance(num_exits, int) or num_exits < 1:
        raise TypeError(f"{type(model).__name__} has no num_exits (a positive int), got {num_exits!r}: the engine needs the model's number of exits")
    t = torch.as_tensor(thresholds, dtype=DECISION_DTYPE, device=device)
    if t.dim() != 1 or t.numel() != num_exits:
        raise ValueError(f"thresholds has shape {tuple(t.shape)}, but {type(model).__name__} has {num_exits} exits: expected one threshold per exit ({num_exits},)")
    return t


@torch.no_grad()
def early_exit(model: nn.Module, images: torch.Tensor, thresholds: torch.Tensor) -> EarlyExitResult:
    """Sample i leaves at the first exit k with confidence >= thresholds[k] (the last exit takes all
    that remain): the same rule as :func:`dynlab.evaluation.exit_indices`, computed only as far as
    each sample needs."""
    device = images.device
    thresholds = _checked_thresholds(model, thresholds, device)
    B, E = images.shape[0], thresholds.numel()
    pred = torch.empty(B, dtype=torch.long, device=device)
    exit_ = torch.empty(B, dtype=torch.long, device=device)
    conf_out = torch.empty(B, dtype=torch.float64, device=device)
    alive = torch.arange(B, device=device)
    state = images
    for k in range(E):
        state, logits = model.exit_step(state, k)
        conf, p = confidence(logits.unsqueeze(0))  # exactly the simulated rule's confidence
        conf, p = conf[0], p[0]
        done = torch.ones_like(conf, dtype=torch.bool) if k == E - 1 else exits_here(conf, thresholds[k])
        idx = alive[done]
        pred[idx], exit_[idx], conf_out[idx] = p[done], k, conf[done].double()
        keep = ~done
        if not keep.any():
            break
        alive, state = alive[keep], _select(state, keep)
    return EarlyExitResult(pred, exit_, conf_out)
