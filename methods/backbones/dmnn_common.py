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


class Controller(nn.Module):
    """Gate logits [B, N, 2] (index 1 = open) and the state h [B, hidden] passed to the next block."""

    def __init__(self, c_in: int, hidden: int, n: int, has_prev: bool, open_init: float):
        super().__init__()
        self.n = n
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(c_in, hidden)
        self.embed_relu = nn.ReLU()
        self.prev = nn.Linear(hidden, hidden) if has_prev else None
        self.state_relu = nn.ReLU() if has_prev else None
        self.gate = nn.Linear(hidden, 2 * n)
        # small weights, bias favouring "open": P(open) = sigmoid(bias_on - bias_off) with Gumbel noise
        nn.init.normal_(self.gate.weight, 0.0, 0.01)
        with torch.no_grad():
            self.gate.bias.view(n, 2)[:, 0] = 0.0
            self.gate.bias.view(n, 2)[:, 1] = math.log(open_init / (1 - open_init))

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed_relu(self.embed(torch.flatten(self.pool(x), 1)))
        h = e if self.prev is None else self.state_relu(e + self.prev(h_prev))
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


def sample_gates(logits: torch.Tensor, training: bool, tau: float) -> torch.Tensor:
    """[B, N, 2] logits -> [B, N] gates, exactly 0 or 1. Training: Gumbel-softmax with a hard
    forward and the soft sample's gradient (straight-through). Evaluation: no noise, argmax."""
    if not training:
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)[..., 1]
    return _HardStraightThrough.apply(soft)


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
        """Gates [B, N] of one block and the controller state."""
        if block.controller is None or self.force_gates is not None:
            value = 1.0 if self.force_gates is None else self.force_gates
            if block.controller is not None:
                h = block.controller(x, h)[1]  # still runs: its cost is part of every sample's
            return torch.full((x.shape[0], self.n), value, dtype=x.dtype, device=x.device), h
        logits, h = block.controller(x, h)
        return sample_gates(logits.float(), self.training, self.tau), h

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Masked computation. Returns ``logits`` [B, C], ``gates`` [B, blocks * N] (block-major),
        ``categories`` (per block [B, K] category logits, training with heads only)."""
        x = self.stem(x)
        h, gates, cats = None, [], []
        for layer in self.layers:
            if not isinstance(layer, GatedBlock):
                x = layer(x)
                continue
            g, h = self._gates(layer, x, h)
            if self.training and self.category_heads is not None and h is not None:
                cats.append(self.category_heads[len(gates)](h))
            gates.append(g)
            x = layer.masked(x, g)
        return {"logits": self.head(x), "gates": torch.cat(gates, 1), "categories": cats}

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
            g, h = self._gates(layer, x, h)
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
