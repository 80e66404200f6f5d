"""DMNN MobileNetV2 (paper 002, Fig. 2a): every inverted-residual block with a residual
connection (stride 1, same channels in and out) is split into ``subblocks`` sub-blocks whose
expansion ratio is t / N, so the sub-blocks together have the original block's convolutions
(1x1 and depth-wise convolutions split exactly); output = x + sum_i g_i * sub_i(x). Blocks
without a residual connection stay fixed (always executed). Built on torchvision's MobileNetV2
definition (no weights): its blocks, settings and channel rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2

from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.dmnn_common import Controller, GatedBlock, GatedNet, measure_costs


@dataclass
class DMNNMobileNetV2Config:
    width_mult: float = bounded(1.0, 0.1, help="MobileNetV2 width multiplier (1.0, 1.4, ...)")
    stem: str = choice("imagenet", "imagenet", "cifar", help="cifar: first convolution and second stage at stride 1 (32x32 inputs)")
    subblocks: int = bounded(2, 1, help="N: sub-blocks per residual block (expansion t/N each)")
    hidden: int = bounded(32, 1, help="controller hidden size")
    gate_open_init: float = bounded(0.85, 0.01, 0.99, help="initial probability that a gate is open (gate bias)")
    controller_norm: str = choice("batch", "batch", "none", help="batch: BatchNorm on the controller's embedding and state paths (not in the paper; lets gates differ per image); none: the paper's FC + ReLU")
    gate_init_std: float = bounded(0.1, 0.0, help="std of the gate layer's initial weights (spread of the gate logits across images at the start)")
    controller_prev: bool = field(default=True, metadata={"help": "the controller adds the previous block's state (the paper's PREV, Table 4); false: each block's gates read only its own input"})
    gated: bool = field(default=True, metadata={"help": "false: no controllers, every sub-block runs (the dense network)"})
    dropout: float = bounded(0.2, 0.0, 1.0, help="dropout before the classifier")

    def validate(self, section: str) -> None:
        if self.subblocks not in (1, 2, 3, 4):  # N = 6 would leave expansion 1: torchvision drops the 1x1 expansion then
            raise ConfigError(f"{section}.subblocks", self.subblocks, "1, 2, 3 or 4 (the expansion ratio 6 is divided among the sub-blocks)")


def _stage_index(strides_before: list[int]) -> list[int]:
    """Resolution stage of each gated block, numbered from 0 over the stages that have one."""
    order = sorted(set(strides_before))
    return [order.index(s) for s in strides_before]


class DMNNMobileNetV2(GatedNet):
    """torchvision's MobileNetV2 with its residual blocks gated; see the module docstring."""

    def __init__(self, cfg: DMNNMobileNetV2Config, num_classes: int):
        base = MobileNetV2(num_classes=num_classes, width_mult=cfg.width_mult, dropout=cfg.dropout)
        feats = list(base.features)
        if cfg.stem == "cifar":
            feats[0][0].stride = (1, 1)
            for block in feats[1:-1]:
                if isinstance(block, InvertedResidual) and block.stride == 2:  # the first stride-2 stage
                    block.conv[1][0].stride = (1, 1)
                    block.stride = 1
                    break
        layers, strides, downsampled = [], [], 0
        for block in feats[1:-1]:
            if not block.use_res_connect:
                downsampled += block.stride == 2
                layers.append(block)
                continue
            c, t = block.out_channels, block.conv[0][0].out_channels / block.out_channels
            ctrl = Controller(c, cfg.hidden, cfg.subblocks, bool(strides) and cfg.controller_prev, cfg.gate_open_init, cfg.controller_norm, cfg.gate_init_std) if cfg.gated else None
            subs = [InvertedResidual(c, c, 1, expand_ratio=t / cfg.subblocks).conv for _ in range(cfg.subblocks)]
            layers.append(GatedBlock(subs, nn.Identity(), ctrl))
            strides.append(downsampled)
        head = nn.Sequential(feats[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), *base.classifier)
        super().__init__(feats[0], layers, head, cfg.subblocks, cfg.hidden, cfg.gated, _stage_index(strides))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")


@register_backbone("dmnn_mobilenetv2", DMNNMobileNetV2Config)
def build_dmnn_mobilenetv2(cfg: DMNNMobileNetV2Config, info: DatasetInfo) -> DMNNMobileNetV2:
    """DMNN MobileNetV2 (torchvision definition): gated residual blocks and controllers."""
    if info.channels != 3:
        raise ConfigError("data.name", info.name, "a 3-channel dataset for dmnn_mobilenetv2")
    model = DMNNMobileNetV2(cfg, info.num_classes)
    model.cost_table = measure_costs(model, (info.channels, info.image_size, info.image_size))
    return model


register_preset("dmnn-mobilenetv2-imagenet", "dmnn_mobilenetv2", "imagenet", "DMNN-MobileNetV2 (1.0) for ImageNet, N=2", stem="imagenet", subblocks=2)
register_preset("dmnn-mobilenetv2-cifar", "dmnn_mobilenetv2", "cifar100", "DMNN-MobileNetV2 (1.0) at CIFAR resolution (stride-1 stem and second stage), N=2", stem="cifar", subblocks=2)
