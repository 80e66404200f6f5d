"""What every DMNN network shares (paper 002 / REFERENCE.md section 5): the controller, the
hard Gumbel gates, the gated block (identity or projection + sum_i g_i * sub_i(x)), the network
that runs fixed layers and gated blocks in order (masked, or really skipping), and the cost
measurement (fixed part, every sub-block, every controller, dense total).

A network is ``stem -> layers -> head``; ``layers`` mixes :class:`GatedBlock` s and fixed modules
(MobileNetV2's blocks without a residual connection). Controllers chain their state h through the
gated blocks only. ``force_gates`` = 1.0 / 0.0 opens / closes every gate (tests, the dense reference).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.costs import CostCounter, CostTable


class StateNorm(nn.BatchNorm1d):
    """BatchNorm1d over the controller's hidden units. A training batch of one sample has no batch
    statistics: it is normalised with the running ones instead of failing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class Controller(nn.Module):
    """Gate logits [B, N, 2] (index 1 = open) and the state h [B, hidden] passed to the next block.

    The paper's controller (eqs. 5-8): ``e = ReLU(W_e GAP(x))``, ``h = e + ReLU(W_h h_prev)`` (the
    first block: ``h = e``), logits ``W_g h + b_g``. ``norm="batch"`` (default; a deviation, as in
    ConvNet-AIG) puts a BatchNorm after W_e and after W_h (their biases dropped): GAP features
    barely change between images, and without it the logits of all images are nearly equal, so
    the gates cannot route. ``init_std``: std of W_g (0.01 in the first version, which left the
    across-image spread of the logit gap at 0.03-0.19 against a Gumbel noise of std 1.8).
    The bias starts the gates open with probability ``open_init`` (under Gumbel noise, sigmoid of
    the logit gap)."""

    def __init__(self, c_in: int, hidden: int, n: int, has_prev: bool, open_init: float, norm: str = "batch", init_std: float = 0.1):
        super().__init__()
        self.n = n
        batch = norm == "batch"
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(c_in, hidden, bias=not batch)
        self.embed_norm = StateNorm(hidden) if batch else nn.Identity()
        self.embed_relu = nn.ReLU()
        self.prev = nn.Linear(hidden, hidden, bias=not batch) if has_prev else None
        self.prev_norm = (StateNorm(hidden) if batch else nn.Identity()) if has_prev else None
        self.state_relu = nn.ReLU() if has_prev else None
        self.gate = nn.Linear(hidden, 2 * n)
        nn.init.normal_(self.gate.weight, 0.0, init_std)
        with torch.no_grad():
            self.gate.bias.view(n, 2)[:, 0] = 0.0
            self.gate.bias.view(n, 2)[:, 1] = math.log(open_init / (1 - open_init))

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed_relu(self.embed_norm(self.embed(torch.flatten(self.pool(x), 1))))
        if self.prev is not None:
            h = h + self.state_relu(self.prev_norm(self.prev(h_prev)))
        return self.gate(h).view(-1, self.n, 2), h


class _HardStraightThrough(torch.autograd.Function):
    """Forward: exactly 0 or 1 (p_open > 0.5, the argmax of two classes). Backward: the gradient
    passes to the soft sample unchanged. (``hard + soft - soft.detach()`` is not exactly 0/1 in
    floating point.)"""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sample_gates(logits: torch.Tensor, training: bool, tau: float, noise: float = 1.0) -> torch.Tensor:
    """[B, N, 2] logits -> [B, N] gates, exactly 0 or 1. Training: Gumbel-softmax (Gumbel noise
    times ``noise``, temperature ``tau``) with a hard forward and the soft sample's gradient
    (straight-through); ``noise=0`` gives the evaluation decisions, with the gradient of
    sigmoid(gap / tau). Evaluation: no noise, argmax."""
    if not training:
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    z = logits
    if noise:
        u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
        z = logits - noise * torch.log(-torch.log(u))
    soft = F.softmax(z / tau, dim=-1)[..., 1]
    return _HardStraightThrough.apply(soft)


def decisions(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """The gates evaluation takes (1 where the open logit wins), differentiable: forward exactly
    those 0/1 values, backward the gradient of sigmoid((open - closed) / tau). At tau = 1 that is
    P(open) under the Gumbel noise, so the resource loss on decisions pushes each image's gate by
    how undecided it is."""
    return sample_gates(logits, True, tau, noise=0.0)


class GatedBlock(nn.Module):
    """``act(shortcut(x) + sum_i g_i * sub_i(x))``: the sub-blocks, the shortcut (identity or a
    projection; always executed) and the block's controller (None: not gated)."""

    def __init__(self, subs: list[nn.Module], shortcut: nn.Module, controller: Controller | None, act: nn.Module | None = None):
        super().__init__()
        self.subs = nn.ModuleList(subs)
        self.shortcut = shortcut
        self.controller = controller
        self.relu = act if act is not None else nn.Identity()

    def masked(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every sub-block on every sample, times its gate ([B, N])."""
        out = self.shortcut(x)
        for i, sub in enumerate(self.subs):
            out = out + gates[:, i].view(-1, 1, 1, 1).to(out.dtype) * sub(x)
        return self.relu(out)

    def skipping(self, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Each sub-block only on the samples whose gate is open; also the sample count per sub-block.
        Same additions in the same order as :meth:`masked` (adding g*s with g = 1 is adding s)."""
        out = self.shortcut(x).clone()
        counts = []
        for i, sub in enumerate(self.subs):
            idx = torch.nonzero(gates[:, i] > 0.5).squeeze(1)
            counts.append(int(idx.numel()))
            if idx.numel() == x.shape[0]:  # every sample: no gather / scatter copies
                out.add_(sub(x).to(out.dtype))
            elif idx.numel():
                out.index_add_(0, idx, sub(x.index_select(0, idx)).to(out.dtype))
        return self.relu(out), counts


class GatedNet(nn.Module):
    """``stem -> layers (gated blocks and fixed modules) -> head``; see the module docstring."""

    def __init__(self, stem: nn.Module, layers: list[nn.Module], head: nn.Module, subblocks: int, hidden: int, gated: bool, stage_of_block: list[int]):
        super().__init__()
        self.stem, self.layers, self.head = stem, nn.ModuleList(layers), head
        self.gated, self.n, self.hidden = gated, subblocks, hidden
        self.stage_of_block = list(stage_of_block)  # resolution stage of each gated block (category-loss weights)
        self.category_heads: nn.ModuleList | None = None  # training only (add_category_heads)
        self.force_gates: float | None = None  # 1.0 / 0.0: every gate open / closed
        self.tau = 1.0  # Gumbel-softmax temperature (set by the method)
        self.noise_scale = 1.0  # Gumbel noise multiplier in training (the method anneals it)
        self.train_open = False  # training with every gate open (the method's warm-up)
        self.last_counts: list[list[int]] = []  # samples run per sub-block by the last forward_skipping

    @property
    def blocks(self) -> list[GatedBlock]:
        return [m for m in self.layers if isinstance(m, GatedBlock)]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def add_category_heads(self, num_categories: int) -> None:
        """One linear category classifier per controller state (category supervision; training only)."""
        if self.gated and num_categories > 0:
            self.category_heads = nn.ModuleList(nn.Linear(self.hidden, num_categories) for _ in self.blocks)

    def _gates(self, block: GatedBlock, x, h):
        """``(used, decided, h)``: the gates [B, N] this forward multiplies the sub-blocks by, the
        noiseless decisions [B, N] evaluation would take (what the resource loss constrains) and
        the controller state. Training: ``used`` are Gumbel samples (noise ``noise_scale``), or all
        ones while ``train_open`` (the warm-up); evaluation: ``used`` = the decisions."""
        if block.controller is None or self.force_gates is not None:
            value = 1.0 if self.force_gates is None else self.force_gates
            if block.controller is not None:
                h = block.controller(x, h)[1]  # still runs: its cost is part of every sample's
            g = torch.full((x.shape[0], self.n), value, dtype=x.dtype, device=x.device)
            return g, g, h
        logits, h = block.controller(x, h)
        logits = logits.float()
        if not self.training:
            g = sample_gates(logits, False, self.tau)
            return g, g, h
        decided = decisions(logits, self.tau)
        if self.train_open:
            return torch.ones_like(decided), decided, h
        return sample_gates(logits, True, self.tau, self.noise_scale), decided, h

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Masked computation. Returns ``logits`` [B, C], ``gates`` [B, blocks * N] (block-major; the
        gates this forward used), ``decisions`` (the same shape: the noiseless gates evaluation
        takes, differentiable, see :func:`decisions`) and ``categories`` (per block [B, K] category
        logits, training with heads only)."""
        x = self.stem(x)
        h, gates, decided, cats = None, [], [], []
        for layer in self.layers:
            if not isinstance(layer, GatedBlock):
                x = layer(x)
                continue
            g, d, h = self._gates(layer, x, h)
            if self.training and self.category_heads is not None and h is not None:
                cats.append(self.category_heads[len(gates)](h))
            gates.append(g)
            decided.append(d)
            x = layer.masked(x, g)
        return {"logits": self.head(x), "gates": torch.cat(gates, 1), "decisions": torch.cat(decided, 1), "categories": cats}

    @torch.no_grad()
    def forward_skipping(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference that really skips closed sub-blocks: ``(logits [B, C], gates [B, blocks * N])``.
        ``last_counts[b][i]`` is how many samples sub-block i of block b ran on."""
        x = self.stem(x)
        h, gates, self.last_counts = None, [], []
        for layer in self.layers:
            if not isinstance(layer, GatedBlock):
                x = layer(x)
                continue
            g, _, h = self._gates(layer, x, h)
            gates.append(g)
            x, counts = layer.skipping(x, g)
            self.last_counts.append(counts)
        return self.head(x), torch.cat(gates, 1)

    def executed_macs(self, gates: torch.Tensor) -> torch.Tensor:
        """Executed MACs per sample [B] (float64, differentiable in the gates): the fixed part + the
        open sub-blocks + every controller, from the costs measured at build."""
        return self.fixed_macs + self.controller_macs + gates.double() @ self.sub_macs.to(gates.device)


@contextlib.contextmanager
def _forced_open(model: GatedNet):
    before = model.force_gates
    model.force_gates = 1.0
    try:
        yield
    finally:
        model.force_gates = before


def measure_costs(model: GatedNet, input_shape: tuple[int, ...]) -> CostTable:
    """Measure (every gate open, eval mode, one sample) the fixed part, each sub-block, each
    controller and the dense total; store the per-sample cost terms on the model."""
    parts: dict[str, nn.Module] = {}
    for b, block in enumerate(model.blocks):
        for i, sub in enumerate(block.subs):
            parts[f"block{b}.sub{i}"] = sub
        if block.controller is not None:
            parts[f"block{b}.controller"] = block.controller
    modes = [(m, m.training) for m in model.modules()]
    p = next(model.parameters())
    x = torch.zeros((1, *input_shape[-3:]), device=p.device, dtype=p.dtype)
    try:
        model.eval()
        with torch.no_grad(), _forced_open(model), contextlib.ExitStack() as stack:
            total = stack.enter_context(CostCounter(model))
            counters = {name: stack.enter_context(CostCounter(m)) for name, m in parts.items()}
            model(x)
    finally:
        for m, mode in modes:
            m.training = mode
    fixed_macs = total.macs - sum(c.macs for c in counters.values())
    fixed_params = total.params - sum(c.params for c in counters.values())
    subs = [n for n in parts if ".sub" in n]
    ctrls = [n for n in parts if n.endswith("controller")]
    model.fixed_macs = float(fixed_macs)
    model.controller_macs = float(sum(counters[n].macs for n in ctrls))
    model.register_buffer("sub_macs", torch.tensor([counters[n].macs for n in subs], dtype=torch.float64), persistent=False)
    dense_macs = fixed_macs + sum(counters[n].macs for n in subs)
    dense_params = fixed_params + sum(counters[n].params for n in subs)
    model.dense_macs = float(dense_macs)
    names = ["fixed", *parts, "dense total"]
    macs = [fixed_macs, *(counters[n].macs for n in parts), dense_macs]
    params = [fixed_params, *(counters[n].params for n in parts), dense_params]
    return CostTable(macs=[float(m) for m in macs], params=[int(q) for q in params], names=names)
