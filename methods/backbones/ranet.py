"""RANet: resolution adaptive network (Yang et al., CVPR 2020; REFERENCE.md section 1).

S sub-networks ("streams") run one after another, from the lowest to the highest input resolution.
``scale_list[i]`` is the resolution level of stream i (1 = lowest; each level doubles the side).

- Base features: a stem at the finest level, then one 3x3 conv-BN-ReLU per coarser stream, stride 2
  where the level changes and stride 1 where it repeats. Stream i starts with
  ``n_channels * gr_factor[i]`` channels and grows by ``growth_rate * gr_factor[i]`` per layer.
- Stream i has ``n_blocks + block_step*i`` blocks; block k (0-based, the same k in every stream)
  has ``step`` layers ("even") or ``step*(k+1)`` ("lin_grow").
- In stream i > 0 the first ``n_blocks + block_step*(i-1)`` blocks (as many as stream i-1 has) are
  *fusion* blocks: layer l takes a ``floor(g*compress_factor)``-channel conv unit of the input of
  layer l of block k in stream i-1, bilinearly upsampled, plus the rest of the g new channels from
  its own stream; the block ends with a 1x1 conv-BN-ReLU of stream i-1's block-k output
  (``floor(C*compress_factor)`` channels, upsampled and concatenated). A stream at level s >= 2
  downsamples in s-1 fusion blocks (the last layer's own unit has stride 2 and the dense features
  are resized bilinearly), at the block positions where the s-1 streams before it ended, so every
  stream reaches the lowest resolution.
- The remaining ``block_step`` blocks (all ``n_blocks`` of stream 0) are plain dense blocks, each
  followed by an exit. Exits = ``n_blocks + block_step*(S-1)``, lowest-resolution stream first.
- A stream at level s has s-1 transitions (1x1 conv-BN-ReLU to ``floor(reduction*C)`` channels)
  after blocks ``floor(j*n/s)``, j = 1..s-1 (n = blocks of the stream, 1-based).
- Heads and initialisation as MSDNet's (CIFAR: 128-channel head; ImageNet: keeps the width).

Differences from the reference code (yangle15/RANet-pytorch), on purpose:
- a stream at level 1 after stream 0 (e.g. ``scale_list=[1,1,2]``) never downsamples; the
  reference's ``list[-(s-1):]`` selects *every* earlier block end when s-1 = 0;
- every module is initialised like MSDNet (the reference leaves the first layer at PyTorch's default);
- ``bottleneck=false`` drops the 1x1 bottleneck (the reference always uses it).

Gradient Equilibrium: the paper's exact form (``gradient_equilibrium``) is implemented. Block (i, k)
is depended on by every exit at or after it in exit order (later blocks of its stream, and every
later stream, which fuses all of its blocks); with ``n`` that count, every edge from a part with
``n_from`` dependants into one with ``n_to`` is scaled by ``n_to/n_from`` (a head: ``1/n``), so each
block's gradient is the average of the losses that depend on it. The reference code has no GE on
RANet. The reference-code form (``gradient_rescale``, coarsest MSDNet scale only) has no meaning
here: RANet does not declare it, so the config layer turns it off (and refuses it when set), and
``method=boostnet backbone=ranet`` reproduces the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynlab import costs
from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.common import ConvBNReLU, HeadFn, conv_out, ge_edge, init_weights, keep_features, plain_head, with_exit_costs
from methods.backbones.msdnet import ConvUnit, ExitHead, resolve_variant


@dataclass
class RANetConfig:
    n_blocks: int = bounded(2, 1, help="blocks of the lowest-resolution stream (all with exits)")
    block_step: int = bounded(1, 1, help="extra blocks (and exits) of every higher-resolution stream")
    block_type: str = choice("even", "even", "lin_grow", help="layers of block k: step (even) or step*(k+1) (lin_grow)")
    step: int = bounded(1, 1, help="layers per block (even) or growth per block (lin_grow)")
    n_channels: int = bounded(8, 1, help="base channel count; stream i starts with n_channels*gr_factor[i]")
    growth_rate: int = bounded(4, 1, help="base channels added by every dense layer (times gr_factor[i])")
    scale_list: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={"help": "resolution level per stream, lowest first: starts at 1, steps of 0 or +1"})
    gr_factor: list[int] = field(default_factory=lambda: [4, 2, 1], metadata={"help": "channel factor per stream"})
    bn_factor: list[int] = field(default_factory=lambda: [4, 2, 1], metadata={"help": "bottleneck width factor per stream"})
    compress_factor: float = bounded(0.25, 0.0, 1.0, help="share of new channels taken from the lower-resolution stream (0 < f < 1)")
    reduction: float = bounded(0.5, 0.0, 1.0, help="transition compression; 0 = no transitions")
    bottleneck: bool = True
    variant: str = choice("auto", "auto", "cifar", "imagenet", help="stem and heads; auto = imagenet when image_size >= 64")

    @property
    def n_streams(self) -> int:
        return len(self.scale_list)

    @property
    def num_exits(self) -> int:
        return self.n_blocks + self.block_step * (self.n_streams - 1)

    def validate(self, section: str = "ranet") -> None:
        S = len(self.scale_list)
        if S == 0:
            raise ConfigError(f"{section}.scale_list", self.scale_list, "a non-empty list of resolution levels, lowest first (e.g. [1, 2, 3])")
        if self.scale_list[0] != 1 or any(b - a not in (0, 1) for a, b in zip(self.scale_list, self.scale_list[1:])):
            raise ConfigError(f"{section}.scale_list", self.scale_list, "levels starting at 1, each equal to the previous or one more (e.g. [1, 2, 3, 3])")
        for key in ("gr_factor", "bn_factor"):
            values = getattr(self, key)
            if len(values) != S:
                raise ConfigError(f"{section}.{key}", values, f"a list of {S} positive integers (one per stream, as many as scale_list={self.scale_list})")
            if any(v < 1 for v in values):
                raise ConfigError(f"{section}.{key}", values, "positive integers")
        if not 0.0 < self.compress_factor < 1.0:
            raise ConfigError(f"{section}.compress_factor", self.compress_factor, "a number strictly between 0 and 1")
        for i in range(1, S):
            g = self.growth_rate * self.gr_factor[i]
            if math.floor(g * self.compress_factor) < 1:
                raise ConfigError(
                    f"{section}.compress_factor",
                    self.compress_factor,
                    f"a value with floor(growth_rate*gr_factor[i]*compress_factor) >= 1 for every fused stream i >= 1 (stream {i}: growth {g})",
                )
        for stream in plan_streams(self):
            for b in stream:
                if b.c_out < 1:
                    raise ConfigError(f"{section}.reduction", self.reduction, "a value that leaves at least one channel after every transition")


# ---- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockPlan:
    """One block of one stream: its kind, layer count and channel counts."""

    stream: int
    index: int  # 0-based position in its stream (block k of stream i fuses block k of stream i-1)
    layers: int
    growth: int  # channels added per layer
    fusion: bool
    down: bool  # the last layer halves the resolution (fusion blocks only)
    transition: bool
    c_in: int
    c_low_in: int  # fusion: channels of the lower stream's block input (0 otherwise)
    c_low_dense: int  # fusion: channels of the lower stream's block dense output (0 otherwise)
    c_dense: int  # c_in + layers*growth
    c_cat: int  # c_dense plus the fused channels of the lower stream's output (fusion)
    c_out: int  # after the transition, if any
    exit: bool


def block_layers(k: int, block_type: str, step: int) -> int:
    """Layers of block k (0-based position in a stream): ``step`` or ``step*(k+1)``."""
    if block_type == "even":
        return step
    if block_type == "lin_grow":
        return step * (k + 1)
    raise ValueError(f"unknown block_type {block_type!r}: expected even or lin_grow")


def stream_blocks(cfg: RANetConfig, i: int) -> int:
    return cfg.n_blocks + cfg.block_step * i


def down_blocks(cfg: RANetConfig, i: int) -> set[int]:
    """1-based blocks of stream i that downsample: where the last ``level-1`` earlier streams end."""
    level = cfg.scale_list[i]
    ends = [stream_blocks(cfg, j) for j in range(i)]
    return set(ends[len(ends) - (level - 1) :]) if level > 1 else set()


def transition_blocks(n: int, level: int) -> set[int]:
    """1-based blocks after which a stream of ``n`` blocks at ``level`` has a transition."""
    return {math.floor(j * n / level) for j in range(1, level)}


def plan_streams(cfg: RANetConfig) -> list[list[BlockPlan]]:
    """Every block of every stream, lowest-resolution stream first (pure bookkeeping, no modules)."""
    streams: list[list[BlockPlan]] = []
    for i in range(cfg.n_streams):
        n = stream_blocks(cfg, i)
        n_fusion = stream_blocks(cfg, i - 1) if i > 0 else 0
        downs, trans = down_blocks(cfg, i), transition_blocks(n, cfg.scale_list[i])
        g = cfg.growth_rate * cfg.gr_factor[i]
        c = cfg.n_channels * cfg.gr_factor[i]
        blocks = []
        for k in range(n):
            layers = block_layers(k, cfg.block_type, cfg.step)
            fusion = k < n_fusion
            c_dense = c + layers * g
            low = streams[i - 1][k] if fusion else None
            c_cat = c_dense + (math.floor(c_dense * cfg.compress_factor) if fusion else 0)
            has_trans = (k + 1) in trans and cfg.reduction > 0
            c_out = math.floor(cfg.reduction * c_cat) if has_trans else c_cat
            blocks.append(
                BlockPlan(
                    stream=i,
                    index=k,
                    layers=layers,
                    growth=g,
                    fusion=fusion,
                    down=fusion and (k + 1) in downs,
                    transition=has_trans,
                    c_in=c,
                    c_low_in=low.c_in if low else 0,
                    c_low_dense=low.c_dense if low else 0,
                    c_dense=c_dense,
                    c_cat=c_cat,
                    c_out=c_out,
                    exit=not fusion,
                )
            )
            c = c_out
        streams.append(blocks)
    return streams


# ---- modules ------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=True, as the reference); identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class BaseFeatures(nn.Module):
    """The first layer: a stem at the finest level, then one 3x3 conv-BN-ReLU per coarser stream
    (stride 2 where the level changes, 1 where it repeats). Returns the streams' inputs, lowest first."""

    def __init__(self, c_in: int, cfg: RANetConfig, variant: str):
        super().__init__()
        levels = list(reversed(cfg.scale_list))  # finest first
        widths = [cfg.n_channels * g for g in reversed(cfg.gr_factor)]
        if variant == "cifar":
            stem: nn.Module = ConvBNReLU(c_in, widths[0], kernel=3, stride=1, padding=1)
        else:
            stem = nn.Sequential(
                nn.Conv2d(c_in, widths[0], 7, stride=2, padding=3, bias=True),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers = [stem]
        self.strides = [1]
        for j in range(1, len(levels)):
            stride = 1 if levels[j] == levels[j - 1] else 2
            layers.append(ConvBNReLU(widths[j - 1], widths[j], kernel=3, stride=stride, padding=1))
            self.strides.append(stride)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out[::-1]


class DenseLayer(nn.Module):
    """A plain dense layer: ``cat(x, unit(x))`` with ``growth`` new channels."""

    def __init__(self, c_in: int, growth: int, bottleneck: bool, bn_width: int):
        super().__init__()
        self.unit = ConvUnit(c_in, growth, 1, bottleneck, bn_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.unit(x)], dim=1)


class FusionLayer(nn.Module):
    """A dense layer fed by its own stream and by the lower-resolution stream.

    New channels: ``floor(growth*compress)`` from a unit on the lower stream's features (run at the low
    resolution, then upsampled) and the rest from a unit on this stream (stride 2 when ``down``, and
    then the dense features are resized to the new resolution too). Output ``cat(x, up, own)``.
    """

    def __init__(self, c_in: int, c_low: int, growth: int, compress: float, bottleneck: bool, bn_own: int, bn_low: int, down: bool):
        super().__init__()
        n_up = math.floor(growth * compress)
        self.up = ConvUnit(c_low, n_up, 1, bottleneck, bn_low)
        self.own = ConvUnit(c_in, growth - n_up, 2 if down else 1, bottleneck, bn_own)
        self.down = down

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        own = self.own(x)
        size = own.shape[-2:]
        return torch.cat([_resize(x, size), _resize(self.up(low), size), own], dim=1)


class PlainBlock(nn.Module):
    """Dense layers on one stream (then a transition). ``forward(x) -> (out, dense)`` where ``dense``
    holds the input and every layer's output (what the next stream's fusion block reads)."""

    fusion = False

    def __init__(self, plan: BlockPlan, bottleneck: bool, bn_width: int):
        super().__init__()
        self.plan = plan
        self.layers = nn.ModuleList(DenseLayer(plan.c_in + l * plan.growth, plan.growth, bottleneck, bn_width) for l in range(plan.layers))
        self.transition = ConvBNReLU(plan.c_cat, plan.c_out, kernel=1, stride=1, padding=0) if plan.transition else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dense = [x]
        for layer in self.layers:
            x = layer(x)
            dense.append(x)
        if self.transition is not None:
            x = self.transition(x)
        return x, dense


class FusionBlock(nn.Module):
    """Fusion layers (layer l reads ``low[l]``), then a 1x1 conv-BN-ReLU of the lower block's output
    (``low[-1]``), upsampled and concatenated; then a transition. ``forward(x, low) -> (out, dense)``."""

    fusion = True

    def __init__(self, plan: BlockPlan, compress: float, bottleneck: bool, bn_own: int, bn_low: int, low_growth: int):
        super().__init__()
        self.plan = plan
        layers = []
        for l in range(plan.layers):
            down = plan.down and l == plan.layers - 1
            layers.append(FusionLayer(plan.c_in + l * plan.growth, plan.c_low_in + l * low_growth, plan.growth, compress, bottleneck, bn_own, bn_low, down))
        self.layers = nn.ModuleList(layers)
        self.fuse_last = ConvBNReLU(plan.c_low_dense, plan.c_cat - plan.c_dense, kernel=1, stride=1, padding=0)
        self.transition = ConvBNReLU(plan.c_cat, plan.c_out, kernel=1, stride=1, padding=0) if plan.transition else None

    def forward(self, x: torch.Tensor, low: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(low) != len(self.layers) + 1:
            raise ValueError(f"FusionBlock: {len(low)} lower-stream features for {len(self.layers)} layers (expected layers+1)")
        dense = [x]
        for layer, low_l in zip(self.layers, low):
            x = layer(x, low_l)
            dense.append(x)
        x = torch.cat([x, _resize(self.fuse_last(low[-1]), x.shape[-2:])], dim=1)
        if self.transition is not None:
            x = self.transition(x)
        return x, dense


class RANet(nn.Module):
    """RANet; ``forward(x)`` returns the list of per-exit logits ``[B, classes]`` in exit order
    (lowest-resolution stream first). The streams run one after another, so the cumulative cost of
    exit k (measured by hooks) covers the first layer, every block and every head run before it."""

    def __init__(self, cfg: RANetConfig, info: DatasetInfo, gradient_equilibrium: bool = False):
        super().__init__()
        cfg.validate("ranet")
        self.cfg = cfg
        self.gradient_equilibrium = gradient_equilibrium
        self.variant = resolve_variant(cfg.variant, info)
        self.num_classes = info.num_classes
        self.plan = plan_streams(cfg)
        gr, bn = list(cfg.gr_factor), list(cfg.bn_factor)

        self.first = BaseFeatures(info.channels, cfg, self.variant)
        size = info.image_size
        if self.variant == "imagenet":
            size = conv_out(conv_out(size, 7, 2, 3), 3, 2, 1)
        sizes = [size]  # finest first
        for stride in self.first.strides[1:]:
            sizes.append(conv_out(sizes[-1], 3, stride, 1))
        self.stream_sizes = sizes[::-1]  # input side of every stream, lowest first
        low_size = self.stream_sizes[0]

        streams, heads = [], []
        self.exit_blocks: list[tuple[int, int]] = []  # (stream, block) of every exit
        for i, plans in enumerate(self.plan):
            blocks: list[nn.Module] = []
            side = self.stream_sizes[i]
            for p in plans:
                if p.fusion:
                    low_growth = cfg.growth_rate * gr[i - 1]
                    blocks.append(FusionBlock(p, cfg.compress_factor, cfg.bottleneck, bn[i], bn[i - 1], low_growth))
                    if p.down:
                        side = conv_out(side, 3, 2, 1)
                else:
                    blocks.append(PlainBlock(p, cfg.bottleneck, bn[i]))
                if p.exit:
                    if side != low_size:
                        raise AssertionError(f"RANet: stream {i} exits at side {side}, expected {low_size}")
                    heads.append(ExitHead(p.c_out, info.num_classes, self.variant, low_size))
                    self.exit_blocks.append((i, p.index))
            streams.append(nn.ModuleList(blocks))
        self.streams = nn.ModuleList(streams)
        self.heads = nn.ModuleList(heads)
        self.num_exits = len(heads)
        assert self.num_exits == cfg.num_exits
        self.dependants = exit_dependants(self.plan, self.exit_blocks)
        init_weights(self)
        self.cost_table: costs.CostTable | None = None

    def forward_heads(self, x: torch.Tensor, head_fn: HeadFn = plain_head) -> list[torch.Tensor]:
        """The whole network, exit by exit: ``head_fn(e, heads[e], features)`` gives exit e's logits
        (a method may put its own classifier on the head's features). With gradient equilibrium
        every input of block (i, k) and every head input pass through :func:`ge_edge`."""
        ge = self.gradient_equilibrium
        E = self.num_exits  # every exit depends on the first layer
        logits = []
        inputs = self.first(x)
        low: list[list[torch.Tensor]] = []
        h = 0
        for i, blocks in enumerate(self.streams):
            z, z_n = inputs[i], E
            dense_i = []
            for k, block in enumerate(blocks):
                n = self.dependants[i][k]
                if ge:  # the block's inputs: its own stream, and (fusion) the lower stream's block k
                    z = ge_edge(z, n, z_n)
                    lows = [ge_edge(t, n, self.dependants[i - 1][k]) for t in low[k]] if block.fusion else None
                else:
                    lows = low[k] if block.fusion else None
                z, dense = block(z, lows) if block.fusion else block(z)
                z_n = n
                dense_i.append(dense)  # every tensor in it is made (or, dense[0], rescaled) at level n
                if block.plan.exit:
                    logits.append(head_fn(h, self.heads[h], ge_edge(z, 1, n) if ge else z))
                    h += 1
            low = dense_i
        return logits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_heads(x)

    def exit_step(self, state, e: int):
        """What exit ``e`` needs beyond exit ``e-1``, then head ``e`` (real early exit)."""
        state, head_in = self.exit_features(state, e)
        return state, self.heads[e](head_in)

    def exit_features(self, state, e: int):
        """Run only what exit ``e`` needs beyond exit ``e-1`` (inference), up to head ``e``'s input.
        ``state`` is the image batch for e = 0, else ``(stream inputs, dense features of the
        previous stream, dense features of this stream so far, current features)``."""
        if e == 0:
            inputs, low, dense_i, z = self.first(state), [], [], None
            i, k = 0, 0
        else:
            inputs, low, dense_i, z = state
            i, k = self.exit_blocks[e - 1]
            k += 1
        target = self.exit_blocks[e]
        while True:
            if k == len(self.streams[i]):  # this stream is done: the next one fuses its features
                low, dense_i, z, i, k = dense_i, [], None, i + 1, 0
            block = self.streams[i][k]
            z, dense = block(inputs[i] if z is None else z, low[k]) if block.fusion else block(inputs[i] if z is None else z)
            dense_i.append(dense)
            if (i, k) == target:
                return (inputs, low, dense_i, z), z
            k += 1

    def forward_with_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-exit logits and the pooled head features each exit's Linear reads."""
        feats: list[torch.Tensor] = []
        return self.forward_heads(x, keep_features(feats)), feats


def exit_dependants(plan: list[list[BlockPlan]], exit_blocks: list[tuple[int, int]]) -> list[list[int]]:
    """For every block (i, k): how many exits depend on it, i.e. the exits at or after (i, k) in
    exit order (stream first, then block): later blocks of stream i, and all of every later stream."""
    return [[sum(1 for eb in exit_blocks if eb >= (b.stream, b.index)) for b in stream] for stream in plan]


@register_backbone(
    "ranet", RANetConfig, description="RANet (resolution adaptive network), exits on every stream, lowest resolution first", method_options=("gradient_equilibrium",)
)
def build_ranet(cfg: RANetConfig, info: DatasetInfo, gradient_equilibrium: bool = False) -> RANet:
    """RANet (resolution adaptive network); costs measured into ``cost_table``. Implements the
    paper's gradient equilibrium, not the reference's MSDNet-only rescaling: see the module doc."""
    return with_exit_costs(RANet(cfg, info, gradient_equilibrium=gradient_equilibrium), info)


# ---- presets (REFERENCE.md "Presets") -------------------------------------------------------------

_COMMON = dict(n_blocks=2, block_step=2, compress_factor=0.25, reduction=0.5)
_CIFAR = dict(_COMMON, n_channels=16, growth_rate=6, variant="cifar")
register_preset(
    "ranet-cifar100-anytime",
    "ranet",
    "cifar100",
    "RANet CIFAR-100 anytime: even, step 4, scales 1-2-3-3, gr/bn 4-2-1-1 (8 exits)",
    **_CIFAR,
    block_type="even",
    step=4,
    scale_list=[1, 2, 3, 3],
    gr_factor=[4, 2, 1, 1],
    bn_factor=[4, 2, 1, 1],
)
_BUDGETED = {
    1: ([1, 2, 3], [4, 2, 1]),
    2: ([1, 2, 2, 3], [4, 2, 2, 1]),
    3: ([1, 2, 3, 3], [4, 2, 1, 1]),
}
for _k, (_scales, _gr) in _BUDGETED.items():
    register_preset(
        f"ranet-cifar100-budgeted{_k}",
        "ranet",
        "cifar100",
        f"RANet CIFAR-100 budgeted model {_k}: lin_grow, step 2, scales {'-'.join(map(str, _scales))}, gr/bn {'-'.join(map(str, _gr))}",
        **_CIFAR,
        block_type="lin_grow",
        step=2,
        scale_list=list(_scales),
        gr_factor=list(_gr),
        bn_factor=list(_gr),
    )
for _c in (32, 64):
    register_preset(
        f"ranet-imagenet-c{_c}",
        "ranet",
        "imagenet",
        f"RANet ImageNet: even, step 8, {_c} channels, growth 16, scales 1-2-3-4, gr/bn 4-2-2-1",
        **_COMMON,
        n_channels=_c,
        growth_rate=16,
        block_type="even",
        step=8,
        scale_list=[1, 2, 3, 4],
        gr_factor=[4, 2, 2, 1],
        bn_factor=[4, 2, 2, 1],
        variant="imagenet",
    )
del _k, _scales, _gr, _c
