"""MSDNet: multi-scale dense network with one exit after each block (REFERENCE.md section 1).

Channel bookkeeping uses one *base* count ``c``: scale ``s`` carries ``c * gr_factor[s]`` channels.
The first layer sets ``c = n_channels``; every dense layer adds ``growth_rate`` to ``c``; a
transition (after a layer that drops the finest scale, "max" pruning) sets ``c = floor(reduction*c)``.
Heads read only the coarsest scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dynlab import costs
from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.common import ConvBNReLU, HeadFn, PerScale, block_layer_counts, conv_out, ge_edge, init_weights, keep_features, plain_head, scale_grad, with_exit_costs


@dataclass
class MSDNetConfig:
    n_blocks: int = bounded(4, 1, help="blocks, one exit after each")
    block_type: str = choice("even", "even", "lin_grow", help="layers per block: [base]+[step]*(n-1) or [base]+[step*i+1]")
    step: int = bounded(1, 1, help="layers per block after the first (even) or growth per block (lin_grow)")
    base: int = bounded(2, 1, help="layers of the first block")
    n_channels: int = bounded(8, 1, help="base channel count after the first layer")
    growth_rate: int = bounded(4, 1, help="base channels added by every dense layer")
    gr_factor: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "channel factor per scale; its length is the number of scales"})
    bn_factor: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "bottleneck width factor per scale"})
    prune: str = choice("max", "max", "none", help="'max': drop the finest scale every ceil(L/S) layers, with transitions")
    bottleneck: bool = True
    reduction: float = bounded(0.5, 0.0, 1.0, help="transition compression; 0 = no transitions")
    variant: str = choice("auto", "auto", "cifar", "imagenet", help="stem and heads; auto = imagenet when image_size >= 64")

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    def validate(self, section: str = "msdnet") -> None:
        if not self.gr_factor:
            raise ConfigError(f"{section}.gr_factor", self.gr_factor, "a non-empty list of positive integers (one per scale)")
        if len(self.bn_factor) != len(self.gr_factor):
            raise ConfigError(f"{section}.bn_factor", self.bn_factor, f"a list of {len(self.gr_factor)} positive integers (as many as gr_factor={self.gr_factor})")
        for key, values in (("gr_factor", self.gr_factor), ("bn_factor", self.bn_factor)):
            if any(v < 1 for v in values):
                raise ConfigError(f"{section}.{key}", values, "positive integers")
        odd = [s for s in range(1, self.n_scales) if (self.growth_rate * self.gr_factor[s]) % 2]
        if odd:
            raise ConfigError(
                f"{section}.growth_rate",
                self.growth_rate,
                f"a value with growth_rate*gr_factor[s] even for every scale s >= 1 (new channels of those scales come in two halves); odd at scales {odd}",
            )
        if self.prune == "max" and self.reduction > 0:
            c = self.n_channels
            for n_in, n_out in layer_scales(self.total_layers, self.n_scales, self.prune):
                c += self.growth_rate
                if n_in > n_out:
                    c = math.floor(self.reduction * c)
                    if c < 1:
                        raise ConfigError(f"{section}.reduction", self.reduction, "a value that leaves at least one channel after every transition")

    @property
    def layers_per_block(self) -> list[int]:
        return block_layer_counts(self.n_blocks, self.block_type, self.step, self.base)

    @property
    def total_layers(self) -> int:
        return sum(self.layers_per_block)


def layer_scales(total_layers: int, n_scales: int, prune: str = "max") -> list[tuple[int, int]]:
    """(input scales, output scales) of every dense layer, 1-based layer l = 1..L.

    "max": ``interval = ceil(L/S)``; ``in = S - floor(max(0, l-2)/interval)``,
    ``out = S - floor((l-1)/interval)``. "none": every layer keeps all scales.
    """
    if prune == "none":
        return [(n_scales, n_scales)] * total_layers
    if prune != "max":
        raise ValueError(f"unknown prune {prune!r}")
    interval = math.ceil(total_layers / n_scales)
    return [(n_scales - max(0, l - 2) // interval, n_scales - (l - 1) // interval) for l in range(1, total_layers + 1)]


def resolve_variant(variant: str, info: DatasetInfo) -> str:
    if variant == "auto":
        return "imagenet" if info.image_size >= 64 else "cifar"
    return variant


class ConvUnit(nn.Sequential):
    """(bottleneck) 1x1 conv to min(C_in, bn_width*C_out) -> BN -> ReLU, then 3x3 conv -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int):
        layers: list[nn.Module] = []
        c_mid = c_in
        if bottleneck:
            c_mid = min(c_in, bn_width * c_out)
            layers.append(ConvBNReLU(c_in, c_mid, kernel=1, stride=1, padding=0))
        layers.append(ConvBNReLU(c_mid, c_out, kernel=3, stride=stride, padding=1))
        super().__init__(*layers)
        self.c_in, self.c_mid, self.c_out = c_in, c_mid, c_out


class ScaleOutput(nn.Module):
    """New channels of one output scale, concatenated to that scale's input.

    With a finer input: ``n_out//2`` from a stride-2 unit on the finer scale and ``n_out//2`` from a
    stride-1 unit on this scale; otherwise all ``n_out`` from one stride-1 unit.
    """

    def __init__(self, c_same: int, n_out: int, bottleneck: bool, bn_same: int, c_finer: int | None = None, bn_finer: int = 1):
        super().__init__()
        if c_finer is None:
            self.down = None
            self.normal = ConvUnit(c_same, n_out, 1, bottleneck, bn_same)
        else:
            self.down = ConvUnit(c_finer, n_out // 2, 2, bottleneck, bn_finer)
            self.normal = ConvUnit(c_same, n_out // 2, 1, bottleneck, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([same, self.normal(same)], dim=1)
        return torch.cat([same, self.down(finer), self.normal(same)], dim=1)


class DenseLayer(nn.Module):
    """One MSDNet layer: maps ``in_scales`` feature maps to ``out_scales`` (the finest may drop)."""

    def __init__(self, c: int, growth_rate: int, gr: list[int], bn: list[int], in_scales: int, out_scales: int, bottleneck: bool):
        super().__init__()
        n_scales = len(gr)
        self.in_scales, self.out_scales = in_scales, out_scales
        self.in_offset = n_scales - in_scales  # absolute index of the first input scale
        self.out_offset = n_scales - out_scales
        units = []
        for s in range(self.out_offset, n_scales):
            has_finer = s - 1 >= self.in_offset
            units.append(
                ScaleOutput(
                    c * gr[s],
                    growth_rate * gr[s],
                    bottleneck,
                    bn[s],
                    c_finer=c * gr[s - 1] if has_finer else None,
                    bn_finer=bn[s - 1] if has_finer else 1,
                )
            )
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.in_scales:
            raise ValueError(f"DenseLayer expects {self.in_scales} scales, got {len(xs)}")
        out = []
        for j, unit in enumerate(self.units):
            i = self.out_offset + j - self.in_offset  # index of this scale in xs
            out.append(unit(xs[i], xs[i - 1] if unit.down is not None else None))
        return out


class Transition(PerScale):
    """Per kept scale s: 1x1 conv-BN-ReLU from ``c*gr[s]`` to ``c_new*gr[s]`` channels."""

    def __init__(self, c: int, c_new: int, gr_kept: list[int]):
        super().__init__([ConvBNReLU(c * g, c_new * g, kernel=1, stride=1, padding=0) for g in gr_kept])


class FirstLayer(nn.Module):
    """Builds the initial multi-scale features: a stem at the finest scale, then a stride-2
    conv-BN-ReLU per coarser scale."""

    def __init__(self, c_in: int, c: int, gr: list[int], variant: str):
        super().__init__()
        c0 = c * gr[0]
        if variant == "cifar":
            stem: nn.Module = ConvBNReLU(c_in, c0, kernel=3, stride=1, padding=1)
        else:
            stem = nn.Sequential(
                nn.Conv2d(c_in, c0, 7, stride=2, padding=3, bias=True),
                nn.BatchNorm2d(c0),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers = [stem]
        prev = c0
        for g in gr[1:]:
            layers.append(ConvBNReLU(prev, c * g, kernel=3, stride=2, padding=1))
            prev = c * g
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class ExitHead(nn.Module):
    """Two stride-2 3x3 conv-BN-ReLU, 2x2 average pool, Linear (reads the coarsest scale).

    CIFAR: 128 channels; ImageNet: keeps the input channel count. Where the map after the two convs
    is not 2x2 (non-standard input sizes), the pool averages the whole map instead.
    """

    def __init__(self, c_in: int, num_classes: int, variant: str, in_size: int):
        super().__init__()
        width = 128 if variant == "cifar" else c_in
        size = conv_out(conv_out(in_size, 3, 2, 1), 3, 2, 1)
        pool: nn.Module = nn.AvgPool2d(2) if size == 2 else nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(
            ConvBNReLU(c_in, width, kernel=3, stride=2, padding=1),
            ConvBNReLU(width, width, kernel=3, stride=2, padding=1),
            pool,
            nn.Flatten(1),
        )
        self.linear = nn.Linear(width, num_classes)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class MSDNet(nn.Module):
    """MSDNet; ``forward(x)`` returns the list of per-exit logits ``[B, classes]``, one per block.

    Two forms of IMTA's Gradient Equilibrium (forward unchanged, backward rescaled), block n of N:

    - ``gradient_rescale`` (the reference codes' form, BoostNet's "gradient rescaling"): only the
      coarsest-scale features are rescaled, ``1/(N-n+1)`` into head n and ``(N-n)/(N-n+1)`` for the
      copy continuing to later blocks; the finer scales that also continue are left as they are.
    - ``gradient_equilibrium`` (the paper's exact form): head n reads through ``1/(N-n+1)`` and
      *every* scale continuing to block n+1 through ``(N-n)/(N-n+1)``, so each block's gradient is
      the average of the N-n+1 exit losses that depend on it.
    """

    def __init__(self, cfg: MSDNetConfig, info: DatasetInfo, gradient_rescale: bool = False, gradient_equilibrium: bool = False):
        super().__init__()
        cfg.validate("msdnet")
        if gradient_rescale and gradient_equilibrium:
            raise ValueError("MSDNet: gradient_rescale and gradient_equilibrium are two forms of one thing: choose one")
        self.cfg = cfg
        self.variant = resolve_variant(cfg.variant, info)
        self.gradient_rescale = gradient_rescale
        self.gradient_equilibrium = gradient_equilibrium
        self.num_classes = info.num_classes
        gr, bn, S = list(cfg.gr_factor), list(cfg.bn_factor), cfg.n_scales
        self.layers_per_block = cfg.layers_per_block
        self.scales = layer_scales(sum(self.layers_per_block), S, cfg.prune)

        # spatial size of each scale (for the heads' pooling)
        size = info.image_size
        if self.variant == "imagenet":
            size = conv_out(conv_out(size, 7, 2, 3), 3, 2, 1)
        sizes = [size]
        for _ in range(1, S):
            sizes.append(conv_out(sizes[-1], 3, 2, 1))

        c = cfg.n_channels
        blocks, heads = [], []
        self.block_channels: list[int] = []  # base count c after each block
        layer = 0
        for b, n_layers in enumerate(self.layers_per_block):
            mods: list[nn.Module] = [FirstLayer(info.channels, c, gr, self.variant)] if b == 0 else []
            for _ in range(n_layers):
                n_in, n_out = self.scales[layer]
                layer += 1
                mods.append(DenseLayer(c, cfg.growth_rate, gr, bn, n_in, n_out, cfg.bottleneck))
                c += cfg.growth_rate
                if cfg.prune == "max" and n_in > n_out and cfg.reduction > 0:
                    c_new = math.floor(cfg.reduction * c)
                    mods.append(Transition(c, c_new, gr[S - n_out :]))
                    c = c_new
            blocks.append(nn.Sequential(*mods))
            heads.append(ExitHead(c * gr[-1], info.num_classes, self.variant, sizes[-1]))
            self.block_channels.append(c)
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.num_exits = len(heads)
        init_weights(self)
        self.cost_table: costs.CostTable | None = None

    def forward_heads(self, x: torch.Tensor, head_fn: HeadFn = plain_head) -> list[torch.Tensor]:
        """The whole network, exit by exit: after block n, ``head_fn(n, heads[n], features)`` gives
        exit n's logits (a method may put its own classifier on the head's features)."""
        logits = []
        feats = x
        N = self.num_exits
        for n, (block, head) in enumerate(zip(self.blocks, self.heads), start=1):
            if self.gradient_equilibrium and n > 1:  # every scale continuing from block n-1
                feats = [ge_edge(f, N - n + 1, N - n + 2) for f in feats]
            feats = list(block(feats))
            coarse = feats[-1]
            k = N - n + 1  # exit losses that depend on block n
            if self.gradient_rescale:
                head_in = scale_grad(coarse, 1.0 / k)
                feats[-1] = scale_grad(coarse, (k - 1) / k)
            elif self.gradient_equilibrium:
                head_in = ge_edge(coarse, 1, k)
            else:
                head_in = coarse
            logits.append(head_fn(n - 1, head, head_in))
        return logits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_heads(x)

    def exit_features(self, state, k: int):
        """Run only block ``k`` (inference): ``state`` is the image batch for k = 0, else the
        multi-scale features of the samples still running. Returns (state, head ``k``'s input)."""
        feats = list(self.blocks[k](state))
        return feats, feats[-1]

    def exit_step(self, state, k: int):
        """Block ``k`` and head ``k`` only, for real early exit (see ``dynlab.early_exit``)."""
        state, head_in = self.exit_features(state, k)
        return state, self.heads[k](head_in)

    def forward_with_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-exit logits and the pooled head features each exit's Linear reads."""
        feats: list[torch.Tensor] = []
        return self.forward_heads(x, keep_features(feats)), feats


@register_backbone("msdnet", MSDNetConfig, description="MSDNet (multi-scale dense network), one exit per block", method_options=("gradient_rescale", "gradient_equilibrium"))
def build_msdnet(cfg: MSDNetConfig, info: DatasetInfo, gradient_rescale: bool = False, gradient_equilibrium: bool = False) -> MSDNet:
    """MSDNet (multi-scale dense network), one exit per block; costs measured into ``cost_table``."""
    return with_exit_costs(MSDNet(cfg, info, gradient_rescale=gradient_rescale, gradient_equilibrium=gradient_equilibrium), info)


# ---- presets (REFERENCE.md "Presets") -------------------------------------------------------------

_CIFAR = dict(block_type="even", step=2, base=4, n_channels=16, growth_rate=6, gr_factor=[1, 2, 4], bn_factor=[1, 2, 4], variant="cifar")
register_preset("msdnet-cifar100-b7", "msdnet", "cifar100", "MSDNet CIFAR-100 anytime (MSDNet paper): 7 blocks, even, step 2, base 4", **{**_CIFAR, "n_blocks": 7})
register_preset("msdnet-cifar100-b10", "msdnet", "cifar100", "MSDNet CIFAR-100 anytime (BoostNet): 10 blocks, even, step 2, base 4", **{**_CIFAR, "n_blocks": 10})
register_preset("msdnet-cifar100-b6", "msdnet", "cifar100", "MSDNet CIFAR-100 budgeted (BoostNet): 6 blocks, even, step 2, base 4", **{**_CIFAR, "n_blocks": 6})
register_preset(
    "msdnet-cifar100-lingrow5",
    "msdnet",
    "cifar100",
    "MSDNet CIFAR-100 budgeted (MSDNet paper): 5 blocks, lin_grow, step 1, base 1",
    **{**_CIFAR, "n_blocks": 5, "block_type": "lin_grow", "step": 1, "base": 1},
)
register_preset(
    "msdnet-cifar100-lingrow7",
    "msdnet",
    "cifar100",
    "MSDNet CIFAR-100, IMTA Table 1: 7 blocks, lin_grow, step 1, base 1 (depth 28; its costs and parameters equal Table 1's)",
    **{**_CIFAR, "n_blocks": 7, "block_type": "lin_grow", "step": 1, "base": 1},
)
for _s in (4, 5, 6, 7):
    register_preset(
        f"msdnet-imagenet-s{_s}",
        "msdnet",
        "imagenet",
        f"MSDNet ImageNet: 5 blocks, even, step = base = {_s}, 32 channels, growth 16, gr/bn 1-2-4-4",
        n_blocks=5,
        block_type="even",
        step=_s,
        base=_s,
        n_channels=32,
        growth_rate=16,
        gr_factor=[1, 2, 4, 4],
        bn_factor=[1, 2, 4, 4],
        variant="imagenet",
    )
del _s
