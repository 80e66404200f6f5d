"""ADN MobileNetV2: torchvision's MobileNetV2 (its modules and state-dict layout), every
inverted-residual group of n >= 2 blocks a stage whose blocks i >= (n+1)//2 are skippable (the
authors' release; ``mandatory`` gives another split, e.g. preset adn-mobilenetv2-v1, arXiv v1's 4
stages; REFERENCE.md section 6); skip-aware BN in the mandatory blocks of a skipped stage.
``load_torchvision(state_dict)`` loads a torchvision checkpoint into the super-net, the
skip-aware norms starting as copies of the loaded ones (adn_base.load_torchvision).

The CIFAR stem (``cifar_stem``) makes the first conv stride 1, so 32x32 inputs keep a 2x2 map at
the end; with a small ``width_mult`` the network trains on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2

from dynlab.config import bounded
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.adn_base import SubnetCosts, TorchvisionWeights, add_skip_norms, parse_skip, skip_norms_in

GROUP_SIZES = [1, 2, 3, 4, 3, 3, 1]  # torchvision's inverted-residual setting, n per group


def mandatory_blocks(n: int) -> int:
    """Blocks of a group that always run: the first (n+1)//2."""
    return (n + 1) // 2


class ADNMobileNetV2(SubnetCosts, TorchvisionWeights, nn.Module):
    """``mandatory``: blocks that always run in each group of n >= 2 blocks (default: the first
    (n+1)//2); a group whose blocks are all mandatory has nothing to skip and is not a stage."""

    def __init__(self, num_classes: int, width_mult: float = 1.0, skip_aware_norms: bool = True,
                 in_channels: int = 3, image_size: int = 224, cifar_stem: bool = False, mandatory: list[int] | None = None):
        super().__init__()
        tv = MobileNetV2(num_classes=num_classes, width_mult=width_mult)
        self.features, self.classifier = tv.features, tv.classifier
        if in_channels != 3 or cifar_stem:
            old = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, stride=1 if cifar_stem else 2, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)  # torchvision pools functionally; a module so that it is counted
        starts = [1 + sum(GROUP_SIZES[:g]) for g in range(len(GROUP_SIZES))]
        self.groups = [list(range(s, s + n)) for s, n in zip(starts, GROUP_SIZES)]  # indices into features
        multi = [g for g, n in enumerate(GROUP_SIZES) if n >= 2]
        split = list(mandatory) if mandatory else [mandatory_blocks(GROUP_SIZES[g]) for g in multi]
        self.mandatory_of_group = dict(zip(multi, split))
        self.stage_of_group = {}
        for g in multi:
            if self.mandatory_of_group[g] < GROUP_SIZES[g]:
                self.stage_of_group[g] = len(self.stage_of_group)
        self.num_stages = len(self.stage_of_group)
        self.skip_aware_norms = skip_aware_norms
        self.input_shape = (1, in_channels, image_size, image_size)
        self.ddp_find_unused_parameters = True
        if skip_aware_norms:
            for g in self.stage_of_group:
                for i in self.groups[g][: self.mandatory_of_group[g]]:
                    add_skip_norms(self.features[i])
        self._cost_table = None

    def stage_blocks(self) -> list[tuple[int, int]]:
        """(blocks, mandatory blocks) per stage."""
        return [(GROUP_SIZES[g], self.mandatory_of_group[g]) for g in self.stage_of_group]

    def forward(self, x: torch.Tensor, skip=None, return_features: bool = False):
        skip = parse_skip(skip, self.num_stages)
        x = self.features[0](x)
        features = []
        for g, idx in enumerate(self.groups):
            s = self.stage_of_group.get(g)
            skipped = s is not None and skip[s]
            keep = self.mandatory_of_group[g] if skipped else len(idx)
            for i in idx[:keep]:
                with skip_norms_in(self.features[i], skipped and self.skip_aware_norms):
                    x = self.features[i](x)
            if s is not None:
                features.append(x)
        x = self.features[-1](x)
        logits = self.classifier(torch.flatten(self.pool(x), 1))
        return (logits, features) if return_features else logits


@dataclass
class ADNMobileNetV2Config:
    width_mult: float = bounded(0.25, 0.05, help="channel multiplier (torchvision: 1.0)")
    cifar_stem: bool = True
    mandatory: list[int] = field(default_factory=list, metadata={"help": "blocks that always run in each group of n >= 2 blocks (5 groups: n = 2, 3, 4, 3, 3), each 1..n (n: not a stage); empty = (n+1)//2, the authors' release"})

    def validate(self, section: str) -> None:
        sizes = [n for n in GROUP_SIZES if n >= 2]
        if self.mandatory and (len(self.mandatory) != len(sizes) or any(not 1 <= m <= n for m, n in zip(self.mandatory, sizes)) or all(m == n for m, n in zip(self.mandatory, sizes))):
            raise ConfigError(f"{section}.mandatory", self.mandatory, f"{len(sizes)} block counts, each from 1 to its group's size {sizes}, at least one below it; empty = the release's split")


@register_backbone("adn_mobilenetv2", ADNMobileNetV2Config, description="MobileNetV2 with skippable second halves (ADN), torchvision layout")
def build_adn_mobilenetv2(cfg: ADNMobileNetV2Config, info: DatasetInfo, skip_aware_norms: bool = True) -> ADNMobileNetV2:
    return ADNMobileNetV2(info.num_classes, cfg.width_mult, skip_aware_norms, info.channels, info.image_size, cfg.cifar_stem, cfg.mandatory)


# The authors' recipe (their README): 300 epochs of SGD, lr 0.1 x0.1 at 150 / 225 / 285, weight decay 1e-5
SGD_300 = {"run.epochs": 300, "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 1e-5, "optim.decay_norms": False,
           "optim.schedule": "multistep", "optim.milestones": [0.5, 0.75, 0.95], "optim.gamma": 0.1}
register_preset("adn-mobilenetv2", "adn_mobilenetv2", "imagenet", "MobileNetV2-ADN, ImageNet 224x224, the authors' release split: 5 stages (base-net 0.22 GMACs)", recipe=SGD_300, width_mult=1.0, cifar_stem=False)
# arXiv v1 says every base model but ViT has 4 residual stages and prints base-net 0.25 GMACs,
# 2.99 M parameters: the release's split with the 2-block group (24 channels) kept whole, i.e. the
# groups of 3, 4, 3, 3 blocks as the 4 stages, measures 0.248 G (paper convention), 2.94 M.
register_preset("adn-mobilenetv2-v1", "adn_mobilenetv2", "imagenet", "MobileNetV2-ADN, ImageNet 224x224, the split fitting arXiv v1 (4 stages, base-net 0.25 GMACs)", recipe=SGD_300, width_mult=1.0, cifar_stem=False, mandatory=[2, 2, 2, 2, 2])
register_preset("adn-mobilenetv2-cifar", "adn_mobilenetv2", "cifar10", "small MobileNetV2-ADN for 32x32 inputs (width 0.25, stride-1 stem)", width_mult=0.25, cifar_stem=True)
