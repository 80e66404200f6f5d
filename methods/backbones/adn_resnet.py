"""ADN ResNet (Kang et al., "Adaptive Depth Networks with Skippable Sub-Paths"): torchvision's ResNet
blocks and state-dict layout, every stage split into a mandatory first half and a skippable second
half (REFERENCE.md section 6).

``forward(x, skip=[bool per stage])``: a True stage runs only its mandatory blocks, which then use
a second set of norm layers (skip-aware BN, stored as ``skip_norms`` inside each mandatory block,
so every torchvision key keeps its name and a torchvision state dict loads into the super-net).
The 2^stages sub-networks are named one letter per stage: F = stage kept whole, T = skippable half
skipped (``FFFF`` = super-net, ``TTTT`` = base-net).

The ImageNet stem (7x7/2 conv + max-pool, width 64) reproduces torchvision's ResNet exactly; the
CIFAR stem (3x3/1 conv, no pooling, any width) makes variants that train on 32x32 images in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.adn_base import SubnetCosts, TorchvisionWeights, add_skip_norms, mandatory_count, parse_skip

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _norm_paths(block: nn.Module) -> dict[str, str]:
    """Skip-norm key -> path of the torchvision norm it stands in for (``downsample``: the BN of
    the downsample branch)."""
    names = ["bn1", "bn2"] + (["bn3"] if isinstance(block, Bottleneck) else [])
    paths = {n: n for n in names}
    return paths | ({"downsample": "downsample.1"} if block.downsample is not None else {})


def block_forward(block: nn.Module, x: torch.Tensor, skip_norms: bool) -> torch.Tensor:
    """A torchvision block, with its second norm set when ``skip_norms`` (and the block has one)."""
    if not skip_norms or not hasattr(block, "skip_norms"):
        return block(x)
    n = block.skip_norms
    out = block.relu(n["bn1"](block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(n["bn2"](block.conv2(out)))
        out = n["bn3"](block.conv3(out))
    else:
        out = n["bn2"](block.conv2(out))
    identity = x if block.downsample is None else n["downsample"](block.downsample[0](x))
    return block.relu(out + identity)


class ADNResNet(SubnetCosts, TorchvisionWeights, nn.Module):
    """ResNet with skippable second halves; attribute names follow torchvision's ResNet."""

    def __init__(self, block: str, layers: list[int], num_classes: int, width: int = 64, stem: str = "imagenet",
                 skip_aware_norms: bool = True, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        blk = BLOCKS[block]
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        for i, n in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(blk, width * 2**i, n, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        self.num_stages = len(layers)
        self.layers = list(layers)
        self.mandatory = [mandatory_count(n) for n in layers]
        self.skip_aware_norms = skip_aware_norms
        self.input_shape = (1, in_channels, image_size, image_size)
        # each training pass leaves parameters unused (super-net: the skip-aware norms; base-net: the
        # skippable halves), so DDP must look for them (REFERENCE.md section 6)
        self.ddp_find_unused_parameters = True
        self._init_weights()
        if skip_aware_norms:  # copies of the mandatory blocks' norms: same init, separate statistics
            for stage, m in zip(self.stages, self.mandatory):
                for b in list(stage)[:m]:
                    add_skip_norms(b, _norm_paths(b))
        self._cost_table = None

    def _make_layer(self, blk, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * blk.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * blk.expansion, stride), nn.BatchNorm2d(planes * blk.expansion))
        blocks = [blk(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * blk.expansion
        blocks += [blk(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:  # torchvision's ResNet initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: torch.Tensor, skip=None, return_features: bool = False):
        """Logits of the sub-network ``skip`` (None = super-net); with ``return_features`` also the
        output of every stage (the features that skip-aware self-distillation compares)."""
        skip = parse_skip(skip, self.num_stages)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage, m, s in zip(self.stages, self.mandatory, skip):
            for j, b in enumerate(stage):
                if s and j >= m:
                    break
                x = block_forward(b, x, skip_norms=s and self.skip_aware_norms)
            features.append(x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return (logits, features) if return_features else logits


@dataclass
class ADNResNetConfig:
    block: str = choice("basic", "basic", "bottleneck", help="torchvision block type")
    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2], metadata={"help": "blocks per stage (each >= 2: a mandatory and a skippable half)"})
    width: int = bounded(8, 1, help="channels of the first stage (torchvision: 64)")
    stem: str = choice("cifar", "cifar", "imagenet", help="cifar: 3x3/1 conv; imagenet: torchvision's 7x7/2 conv + max-pool")

    def validate(self, section: str) -> None:
        if not self.layers or any(n < 2 for n in self.layers):
            raise ConfigError(f"{section}.layers", self.layers, "a non-empty list of blocks per stage, each >= 2 (a mandatory and a skippable half)")


@register_backbone("adn_resnet", ADNResNetConfig, description="ResNet with skippable second halves (ADN), torchvision layout")
def build_adn_resnet(cfg: ADNResNetConfig, info: DatasetInfo, skip_aware_norms: bool = True) -> ADNResNet:
    return ADNResNet(cfg.block, list(cfg.layers), info.num_classes, cfg.width, cfg.stem, skip_aware_norms, info.channels, info.image_size)


# The authors' ImageNet recipe (their README): 150 epochs of SGD, lr 0.1 x0.1 at 60 / 100 / 140,
# weight decay 1e-4 on weights only (torchvision's reference script, which they train with), batch 256
SGD_150 = {"run.epochs": 150, "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.decay_norms": False,
           "optim.schedule": "multistep", "optim.milestones": [60 / 150, 100 / 150, 140 / 150], "optim.gamma": 0.1}
register_preset("adn-resnet50", "adn_resnet", "imagenet", "ResNet-50-ADN, ImageNet 224x224", recipe=SGD_150, block="bottleneck", layers=[3, 4, 6, 3], width=64, stem="imagenet")
register_preset("adn-resnet101", "adn_resnet", "imagenet", "ResNet-101-ADN, ImageNet 224x224", recipe=SGD_150, block="bottleneck", layers=[3, 4, 23, 3], width=64, stem="imagenet")
register_preset("adn-resnet-cifar", "adn_resnet", "cifar10", "small ADN ResNet for 32x32 inputs (basic blocks, width 16)", block="basic", layers=[2, 2, 2, 2], width=16, stem="cifar")
