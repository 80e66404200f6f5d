"""Real early exit: a batched engine that runs block k only for the samples still undecided, so
the time spent follows the multiply-adds the budgeted evaluation reports, as far as each block's
time follows its multiply-adds (``python -m benchmarks.early_exit`` measures both). The reference
codes only simulate exits (the whole network always runs and exits are read off afterwards).

A model supports it by exposing ``exit_step(state, k) -> (state, logits)``: run block k and its
head on ``state`` (the images for k = 0, else whatever step k-1 returned: tensors, or nested
tuples/lists of tensors with the batch first, or None), and ``num_exits``. The engine drops the
samples that exit after each step from every tensor of the state before the next block runs, and
may run a block on slices of its samples (``chunk_size``): ``exit_step`` must treat the samples of
a batch independently, as any network in eval mode does.

Exit decisions use :func:`dynlab.evaluation.exits_here` (compared in float64), the rule of the
simulated exits, so the engine's exits equal the simulated ones whatever the logits' dtype
(float32, float64, bfloat16 under autocast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynlab.evaluation import DECISION_DTYPE, confidence, exits_here


def _flatten(state, leaves: list) -> object:
    """The tensors of ``state`` appended to ``leaves`` in order; returns the structure with each
    tensor replaced by its position, for :func:`_rebuild`."""
    if state is None:
        return None
    if torch.is_tensor(state):
        leaves.append(state)
        return len(leaves) - 1
    if isinstance(state, (list, tuple)):
        return (type(state), [_flatten(s, leaves) for s in state])
    raise TypeError(f"early-exit state must hold tensors (or lists/tuples of them), got {type(state).__name__}")


def _rebuild(spec, leaves: list):
    if spec is None:
        return None
    if isinstance(spec, int):
        return leaves[spec]
    kind, items = spec
    return kind(_rebuild(s, leaves) for s in items)


def _chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """[start, end) of ceil(n / chunk_size) nearly equal chunks (one chunk without a chunk size)."""
    if not chunk_size or n <= chunk_size:
        return [(0, n)]
    count = -(-n // chunk_size)
    edges = [n * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


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


def _room(t: torch.Tensor, n: int) -> torch.Tensor:
    """An empty tensor like ``t`` with ``n`` rows, in ``t``'s memory format (channels_last stays so)."""
    fmt = torch.channels_last if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt)


def _gather(state, rows: torch.Tensor):
    leaves: list = []
    spec = _flatten(state, leaves)
    return _rebuild(spec, [t.index_select(0, rows) for t in leaves])


@torch.no_grad()
def early_exit(model: nn.Module, images: torch.Tensor, thresholds: torch.Tensor, chunk_size: int | None = None) -> EarlyExitResult:
    """Sample i leaves at the first exit k with confidence >= thresholds[k] (the last exit takes all
    that remain): the same rule as :func:`dynlab.evaluation.exit_indices`, computed only as far as
    each sample needs.

    ``chunk_size``: run each block on at most this many samples at a time (its undecided samples
    split into nearly equal chunks, slices without a copy). On a CPU a network can be cheaper per
    sample in chunks of 32..128 than as one batch of 256 (activations that stay in cache): give the
    full network's fastest chunk size (``python -m benchmarks.early_exit`` measures it). None: each
    block runs on all of its undecided samples at once. Either way the exits and predictions equal
the simulated ones (tested, as for the smaller batches of later blocks).

    The samples that go on are copied once per block into the next block's state (not at all when
    a block runs as one chunk and nobody exits there)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    device = images.device
    thresholds = _checked_thresholds(model, thresholds, device)
    B, E = images.shape[0], thresholds.numel()
    pred = torch.empty(B, dtype=torch.long, device=device)
    exit_ = torch.empty(B, dtype=torch.long, device=device)
    conf_out = torch.empty(B, dtype=torch.float64, device=device)
    alive = torch.arange(B, device=device)
    state = images
    for k in range(E):
        n, last = alive.numel(), k == E - 1
        bounds = _chunks(n, chunk_size)
        whole = len(bounds) == 1
        if not whole:
            leaves_in: list = []
            spec_in = _flatten(state, leaves_in)
        kept, spec, buffers, filled = [], None, None, 0
        for a, b in bounds:
            chunk = state if whole else _rebuild(spec_in, [t[a:b] for t in leaves_in])
            out, logits = model.exit_step(chunk, k)
            conf, p = confidence(logits.unsqueeze(0))  # exactly the simulated rule's confidence
            conf, p, ids = conf[0], p[0], alive[a:b]
            if last:
                pred[ids], exit_[ids], conf_out[ids] = p, k, conf.double()
                continue
            done = exits_here(conf, thresholds[k])
            n_done = int(done.sum())
            if n_done:
                idx = ids[done]
                pred[idx], exit_[idx], conf_out[idx] = p[done], k, conf[done].double()
            if n_done == b - a:
                continue
            rows = None if n_done == 0 else (~done).nonzero().squeeze(1)
            kept.append(ids if rows is None else ids[rows])
            if whole:  # the next state is this block's output, or its survivors
                state = out if rows is None else _gather(out, rows)
                continue
            leaves: list = []
            spec = _flatten(out, leaves)
            if buffers is None:  # room for all of this block's undecided samples, trimmed below
                buffers = [_room(t, n) for t in leaves]
            count = b - a - n_done
            for t, buf in zip(leaves, buffers):
                if rows is None:
                    buf[filled : filled + count].copy_(t)
                else:
                    torch.index_select(t, 0, rows, out=buf[filled : filled + count])
            filled += count
        if last or not kept:
            break
        alive = kept[0] if len(kept) == 1 else torch.cat(kept)
        if not whole:
            state = _rebuild(spec, [buf[:filled] for buf in buffers])
    return EarlyExitResult(pred, exit_, conf_out)
