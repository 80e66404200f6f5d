"""DMNN ResNet (Dynamic Multi-path Neural Network, paper 002 / REFERENCE.md section 5).

Every bottleneck block is split into ``subblocks`` parallel sub-blocks (1x1 -> 3x3 -> 1x1, each
with its own narrower width) whose widths are chosen so that the split block keeps the parameter
count of the original bottleneck (eqs. 1-3 of the paper; :func:`subblock_width`). The block output
is ``ReLU(shortcut(x) + sum_i g_i * subblock_i(x))`` with gates g_i in {0, 1} from a per-block
controller (:class:`Controller`): ``e = ReLU(BN(FC(GAP(x))))`` to ``hidden`` units,
``h = e + ReLU(BN(FC(h_prev)))``, gate logits from ``h`` (``controller_norm=none``: without the BNs,
the paper's form).

Three ways to run the same weights:
- ``forward`` (training and the "masked" reference): every sub-block runs on every sample and is
  multiplied by its gate; training samples gates with Gumbel noise (straight-through);
- ``forward_skipping`` (inference): each sub-block runs only on the samples whose gate is open
  (gathered, run, scattered back), so the executed work follows the gates;
- ``force_gates`` = 1.0 / 0.0 opens / closes every gate (tests, dense reference).

``gated=false`` builds no controllers and runs every sub-block: with ``subblocks=1`` that is the
unmodified ResNet (the dense baseline of the sweeps).

Costs are measured once at build with :mod:`dynlab.costs` (every gate open) into ``cost_table``:
the fixed part (stem, shortcuts, head), every sub-block, every controller and the dense total.
The executed cost of a sample is fixed + its open sub-blocks + every controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.dmnn_common import Controller, GatedBlock, GatedNet, measure_costs, sample_gates  # noqa: F401  (re-exported)


@dataclass
class DMNNResNetConfig:
    layers: list[int] = field(default_factory=lambda: [1, 1, 1], metadata={"help": "bottleneck blocks per stage (ResNet-50: 3,4,6,3)"})
    widths: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"help": "bottleneck width per stage (output = width * expansion)"})
    stem_channels: int = bounded(16, 1, help="channels of the stem convolution")
    stem: str = choice("cifar", "cifar", "imagenet", "half", help="cifar: 3x3 conv; imagenet: 7x7/2 conv + 3x3/2 max-pool; half: 3x3 conv + 3x3/2 max-pool (32x32 inputs: first stage at 16x16, the paper's CIFAR cost)")
    expansion: int = bounded(1, 1, help="bottleneck expansion (output channels = width * expansion; ResNet-50: 4)")
    subblocks: int = bounded(2, 1, help="N: sub-blocks per block")
    hidden: int = bounded(32, 1, help="controller hidden size")
    gate_open_init: float = bounded(0.85, 0.01, 0.99, help="initial probability that a gate is open (gate bias)")
    controller_norm: str = choice("batch", "batch", "none", help="batch: BatchNorm on the controller's embedding and state paths (not in the paper; lets gates differ per image); none: the paper's FC + ReLU")
    gate_init_std: float = bounded(0.1, 0.0, help="std of the gate layer's initial weights (spread of the gate logits across images at the start)")
    controller_prev: bool = field(default=True, metadata={"help": "the controller adds the previous block's state (the paper's PREV, Table 4); false: each block's gates read only its own input"})
    gated: bool = field(default=True, metadata={"help": "false: no controllers, every sub-block runs (the dense network)"})

    def validate(self, section: str) -> None:
        if not self.layers or any(n < 1 for n in self.layers):
            raise ConfigError(f"{section}.layers", self.layers, "a non-empty list of positive block counts")
        if len(self.widths) != len(self.layers) or any(w < 1 for w in self.widths):
            raise ConfigError(f"{section}.widths", self.widths, f"{len(self.layers)} positive widths, one per stage of {section}.layers")


def bottleneck_params(c_in: int, width: int, c_out: int) -> int:
    """Convolution weights of one bottleneck path: 1x1 c_in->w, 3x3 w->w, 1x1 w->c_out."""
    return c_in * width + 9 * width * width + width * c_out


def subblock_width(c_in: int, width: int, c_out: int, n: int) -> int:
    """Width w' of each of ``n`` sub-blocks such that n * params(w') ~= params(w) (paper eq. 1 = eq. 2).

    n * (a w' + 9 w'^2) = a w + 9 w^2 with a = c_in + c_out: the positive root, rounded.
    Plain w/n would drop the 3x3 weights to 1/n of the original (eq. 3)."""
    if n == 1:
        return width
    a = c_in + c_out
    target = bottleneck_params(c_in, width, c_out)
    root = (-n * a + math.sqrt((n * a) ** 2 + 36 * n * target)) / (18 * n)
    return max(1, round(root))


class SubBlock(nn.Sequential):
    """One path of a split bottleneck: 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 -> BN."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )


def bottleneck_block(c_in: int, width: int, c_out: int, stride: int, n: int, controller: Controller | None) -> GatedBlock:
    """A bottleneck split into ``n`` sub-blocks of width :func:`subblock_width`, ReLU after the sum."""
    w = subblock_width(c_in, width, c_out, n)
    shortcut: nn.Module = nn.Identity()
    if stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
    return GatedBlock([SubBlock(c_in, w, c_out, stride) for _ in range(n)], shortcut, controller, nn.ReLU())


class DMNNResNet(GatedNet):
    """Stem -> gated bottleneck blocks -> GAP -> linear. See the module docstring."""

    def __init__(self, cfg: DMNNResNetConfig, num_classes: int, in_channels: int = 3):
        s = cfg.stem_channels
        if cfg.stem == "imagenet":
            stem = nn.Sequential(nn.Conv2d(in_channels, s, 7, 2, 3, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif cfg.stem == "half":
            stem = nn.Sequential(nn.Conv2d(in_channels, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            stem = nn.Sequential(nn.Conv2d(in_channels, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True))
        blocks, c_in, stages = [], s, []
        for stage, (count, width) in enumerate(zip(cfg.layers, cfg.widths)):
            c_out = width * cfg.expansion
            for j in range(count):
                stride = 2 if stage > 0 and j == 0 else 1
                ctrl = Controller(c_in, cfg.hidden, cfg.subblocks, bool(blocks) and cfg.controller_prev, cfg.gate_open_init, cfg.controller_norm, cfg.gate_init_std) if cfg.gated else None
                blocks.append(bottleneck_block(c_in, width, c_out, stride, cfg.subblocks, ctrl))
                stages.append(stage)
                c_in = c_out
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
        super().__init__(stem, blocks, head, cfg.subblocks, cfg.hidden, cfg.gated, stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_backbone("dmnn_resnet", DMNNResNetConfig)
def build_dmnn_resnet(cfg: DMNNResNetConfig, info: DatasetInfo) -> DMNNResNet:
    """DMNN bottleneck ResNet (CIFAR or ImageNet stem): gated sub-blocks and controllers."""
    model = DMNNResNet(cfg, info.num_classes, info.channels)
    model.cost_table = measure_costs(model, (info.channels, info.image_size, info.image_size))
    return model


_R50 = {"layers": [3, 4, 6, 3], "widths": [64, 128, 256, 512], "stem_channels": 64, "expansion": 4}
register_preset("dmnn-resnet-small", "dmnn_resnet", "digits", "small CIFAR-style DMNN ResNet: 3 stages of 1 block, widths 16-32-64, expansion 1, N=2 (trains in seconds)", layers=[1, 1, 1], widths=[16, 32, 64], stem_channels=16, expansion=1, subblocks=2)
# The paper's CIFAR-100 ResNet-50 costs 0.33 GMACs (Table 3): an ImageNet-style ResNet-50 whose first
# stage runs at 16x16 (README, "DMNN's CIFAR cost"); the 3x3 stem + max-pool ("half") gives that at 32x32.
register_preset("dmnn-resnet50", "dmnn_resnet", "cifar100", "DMNN-50 for CIFAR at the paper's cost (3x3 stem + 3x3/2 max-pool: first stage at 16x16; 0.33 GMACs dense), N=4", stem="half", subblocks=4, **_R50)
register_preset("dmnn-resnet50-n2", "dmnn_resnet", "cifar100", "DMNN-50 for CIFAR at the paper's cost, N=2", stem="half", subblocks=2, **_R50)
register_preset("dmnn-resnet50-cifar32", "dmnn_resnet", "cifar100", "DMNN-50 with its first stage at 32x32 (3x3 stem, no max-pool; 1.35 GMACs dense, 4x the paper's CIFAR cost), N=4", stem="cifar", subblocks=4, **_R50)
register_preset("dmnn-resnet50-imagenet", "dmnn_resnet", "imagenet", "DMNN-50 for ImageNet (7x7/2 stem + max-pool), N=4", stem="imagenet", subblocks=4, **_R50)
register_preset("dmnn-resnet101-imagenet", "dmnn_resnet", "imagenet", "DMNN-101 for ImageNet, N=4", stem="imagenet", subblocks=4, **{**_R50, "layers": [3, 4, 23, 3]})
