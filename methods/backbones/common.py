"""Pieces shared by the early-exit backbones (MSDNet, RANet)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias unless asked) -> BatchNorm -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int | None = None, bias: bool = False):
        if padding is None:
            padding = kernel // 2
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
        self.c_in, self.c_out = c_in, c_out


class PerScale(nn.Module):
    """Applies module i to the i-th tensor of a list (one module per scale)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != len(self.m):
            raise ValueError(f"PerScale: {len(xs)} inputs for {len(self.m)} modules")
        return [m(x) for m, x in zip(self.m, xs)]


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Gradient rescaling (IMTA's gradient equilibrium): ``x`` unchanged, its gradient times ``factor``."""
    return _ScaleGrad.apply(x, float(factor))


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a convolution or pooling over a ``size``-pixel side."""
    return (size + 2 * padding - kernel) // stride + 1


def block_layer_counts(n_blocks: int, block_type: str, step: int, base: int) -> list[int]:
    """Layers per block: ``[base] + [step]*(n-1)`` ("even") or ``[base] + [step*i + 1]`` ("lin_grow")."""
    if block_type == "even":
        return [base] + [step] * (n_blocks - 1)
    if block_type == "lin_grow":
        return [base] + [step * i + 1 for i in range(1, n_blocks)]
    raise ValueError(f"unknown block_type {block_type!r}: expected even or lin_grow")


def init_weights(model: nn.Module) -> None:
    """Conv weights ~ N(0, sqrt(2 / (kh*kw*C_out))); BatchNorm weight 1, bias 0; Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


HeadFn = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


def plain_head(k: int, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's own exit head ``k`` on its input: the default ``head_fn`` of ``forward_heads``."""
    return head(x)


def keep_features(store: list) -> HeadFn:
    """A ``head_fn`` that also keeps the pooled features each head's Linear reads (in ``store``)."""

    def fn(k: int, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pooled = head.features(x)
        store.append(pooled)
        return head.linear(pooled)

    return fn


def ge_edge(x: torch.Tensor, n_to: int, n_from: int) -> torch.Tensor:
    """Gradient Equilibrium on one edge of the network: a tensor made by a part on which ``n_from``
    exit losses depend, read by a part on which ``n_to`` of them depend (a head: 1). Scaling every
    such edge's gradient by ``n_to/n_from`` makes the factors telescope along any path, so the
    gradient of each loss at a part is the raw one divided by that part's ``n``: every part gets the
    average of the losses that depend on it (IMTA Eq. 5), whatever the graph (chain or streams)."""
    return x if n_to == n_from else scale_grad(x, n_to / n_from)


def with_exit_costs(model: nn.Module, info) -> nn.Module:
    """Measure the cumulative cost of every exit (``model.heads``) once, at build, into ``cost_table``."""
    from dynlab import costs

    model.cost_table = costs.measure_exits(model, (1, info.channels, info.image_size, info.image_size), list(model.heads))
    return model
