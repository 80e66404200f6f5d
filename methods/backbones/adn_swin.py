"""ADN Swin Transformer: torchvision's SwinTransformer (modules and state-dict layout unchanged),
every stage split by the ResNet rule (Swin-T: mandatory [1,1,3,1] of [2,2,6,2], the authors'
release; ``mandatory`` gives another split, e.g. preset adn-swin-t-v1; REFERENCE.md section 6), skip-aware LayerNorm in the mandatory blocks of a skipped stage. Stochastic depth
(``stochastic_depth_prob``, 0.1 as in the authors' swin_t) drops blocks of the super-net only: the
paper disables it for the base-net, since randomly dropping blocks conflicts with skipping
sub-paths; the authors' block runs without it whenever its stage is skipped (wchkang/depth
models/swin_transformer.py, SwinTransformerBlock.forward, "No stochastic depths for base-net").
``load_torchvision(state_dict)`` loads a torchvision checkpoint into the super-net, the
skip-aware norms starting as copies of the loaded ones (adn_base.load_torchvision).

Costs: the window attention runs its q/k/v and output projections functionally and its products as
matmuls, so it is :class:`CountedWindowAttention` (same layout, a ``macs`` method) and
``subnet_cost`` adds it to what ``dynlab.costs`` measured (see ``adn_vit``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformer

from dynlab.config import bounded
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.adn_base import SubnetCosts, TorchvisionWeights, add_skip_norms, mandatory_count, parse_skip, skip_norms_in


class CountedWindowAttention(ShiftedWindowAttention):
    """Window attention that states its own multiply-adds for one sample ([B, H, W, C] input,
    padded to whole windows as torchvision does)."""

    def macs(self, inputs: tuple, output) -> float:
        _, h, w, c = inputs[0].shape
        wh, ww = self.window_size
        tokens = math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
        proj = 3 * c * c + 3 * c + c * c + c
        return float(tokens * proj + 2 * tokens * wh * ww * c)

    def unhooked_params(self) -> int:
        return sum(p.numel() for m in (self.qkv, self.proj) for p in m.parameters())


@contextlib.contextmanager
def no_stochastic_depth(block: nn.Module, active: bool):
    """While open (and ``active``), ``block`` runs without stochastic depth (drop probability 0)."""
    if not active:
        yield
        return
    sd = block.stochastic_depth
    p, sd.p = sd.p, 0.0
    try:
        yield
    finally:
        sd.p = p


class ADNSwin(SubnetCosts, TorchvisionWeights, SwinTransformer):
    """``mandatory``: blocks per Swin stage that always run (default: the ResNet rule); a stage whose
    blocks are all mandatory has nothing to skip and no letter in the sub-network names."""

    def __init__(self, patch_size: int, embed_dim: int, depths: list[int], num_heads: list[int], window_size: int,
                 num_classes: int, stochastic_depth_prob: float = 0.0, skip_aware_norms: bool = True, image_size: int = 224,
                 mandatory: list[int] | None = None):
        super().__init__([patch_size, patch_size], embed_dim, list(depths), list(num_heads), [window_size, window_size],
                         stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes)
        every = [1 + 2 * s for s in range(len(depths))]  # features: embed, stage, merge, stage, ...
        split = list(mandatory) if mandatory else [mandatory_count(n) for n in depths]
        for i in every:
            for b in self.features[i]:
                b.attn.__class__ = CountedWindowAttention  # same parameters and keys
        # the skippable stages: index into features and mandatory blocks, one per letter of a name
        kept = [(i, m) for i, m, n in zip(every, split, depths) if m < n]
        self.stage_index, self.mandatory = [i for i, _ in kept], [m for _, m in kept]
        self.num_stages = len(kept)
        self.skip_aware_norms = skip_aware_norms
        self.input_shape = (1, 3, image_size, image_size)
        self.ddp_find_unused_parameters = True
        if skip_aware_norms:
            for i, m in kept:
                for b in list(self.features[i])[:m]:
                    add_skip_norms(b)
        self._cost_table = None

    def forward(self, x: torch.Tensor, skip=None, return_features: bool = False):
        skip = dict(zip(self.stage_index, parse_skip(skip, self.num_stages)))  # features index -> skipped
        mandatory = dict(zip(self.stage_index, self.mandatory))
        x = self.features[0](x)
        features = []
        for i in range(1, len(self.features), 2):
            if i > 1:
                x = self.features[i - 1](x)  # patch merging before every stage but the first
            skipped = skip.get(i, False)
            blocks = list(self.features[i])
            for b in blocks[: mandatory[i]] if skipped else blocks:
                with skip_norms_in(b, skipped and self.skip_aware_norms), no_stochastic_depth(b, skipped):
                    x = b(x)
            if i in skip:
                features.append(x.permute(0, 3, 1, 2))  # channels first, as the KD expects
        x = self.flatten(self.avgpool(self.permute(self.norm(x))))
        logits = self.head(x)
        return (logits, features) if return_features else logits


@dataclass
class ADNSwinConfig:
    patch_size: int = bounded(2, 1)
    embed_dim: int = bounded(16, 1)
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2], metadata={"help": "blocks per stage, each >= 2"})
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    window_size: int = bounded(4, 1)
    mandatory: list[int] = field(default_factory=list, metadata={"help": "blocks per stage that always run, each 1..depth (depth: the stage is not skippable); empty = min(n-1, ceil(n/2)), the authors' release"})
    stochastic_depth_prob: float = bounded(0.1, 0.0, 1.0, help="stochastic depth of the last block (linear in depth), super-net only (authors' swin_t: 0.1)")

    def validate(self, section: str) -> None:
        if not self.depths or any(n < 2 for n in self.depths):
            raise ConfigError(f"{section}.depths", self.depths, "blocks per stage, each >= 2 (a mandatory and a skippable half)")
        if self.mandatory and (len(self.mandatory) != len(self.depths) or any(not 1 <= m <= n for m, n in zip(self.mandatory, self.depths)) or all(m == n for m, n in zip(self.mandatory, self.depths))):
            raise ConfigError(f"{section}.mandatory", self.mandatory, f"{len(self.depths)} block counts, each from 1 to its stage's depth {self.depths}, at least one below it; empty = the release's split")
        if len(self.num_heads) != len(self.depths):
            raise ConfigError(f"{section}.num_heads", self.num_heads, f"{len(self.depths)} head counts, one per stage")


@register_backbone("adn_swin", ADNSwinConfig, description="Swin Transformer with skippable second halves (ADN), torchvision layout")
def build_adn_swin(cfg: ADNSwinConfig, info: DatasetInfo, skip_aware_norms: bool = True) -> ADNSwin:
    if info.channels != 3:
        raise ConfigError("dataset", info.name, "3-channel images for adn_swin")
    return ADNSwin(cfg.patch_size, cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, info.num_classes, cfg.stochastic_depth_prob, skip_aware_norms, info.image_size, cfg.mandatory)


SWIN_T = dict(patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
# Swin's DeiT-style recipe, which the authors train with (their README): 300 epochs of AdamW, lr 1e-3
# (batch 1024) with 20 warm-up epochs, cosine to 1e-5, weight decay 0.05, label smoothing 0.1, MixUp
# 0.8 / CutMix 1.0, RandAugment, random erasing 0.25, gradient clipping 5, an EMA of the weights
SWIN_RECIPE = {"run.epochs": 300, "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05, "optim.schedule": "cosine", "optim.min_lr": 1e-5, "optim.warmup_epochs": 20,
               "optim.label_smoothing": 0.1, "data.mixup": 0.8, "data.cutmix": 1.0, "data.auto_augment": "randaugment", "data.random_erasing": 0.25, "run.grad_clip": 5.0, "run.ema_decay": 0.99996}
register_preset("adn-swin-t", "adn_swin", "imagenet", "Swin-T-ADN, ImageNet 224x224, the authors' release split: mandatory [1,1,3,1] (base-net 2.34 GMACs)", recipe=SWIN_RECIPE, **SWIN_T)
# arXiv v1's Table 1 prints base-net 2.69 GMACs and 15.63 M parameters; it does not give its
# split. [1,2,3,1] (stage 2 whole: 3 skippable stages) is the split that fits both numbers within
# 1% (measured 2.71 G, 15.75 M); [1,1,4,1] (2.71 G, 17.09 M) and [2,1,3,1] (2.73 G, 15.42 M) are
# the other ones within 2% of the MACs.
register_preset("adn-swin-t-v1", "adn_swin", "imagenet", "Swin-T-ADN, ImageNet 224x224, the split fitting arXiv v1's base-net (2.69 GMACs): mandatory [1,2,3,1]", recipe=SWIN_RECIPE, **SWIN_T, mandatory=[1, 2, 3, 1])
register_preset("adn-swin-cifar", "adn_swin", "cifar10", "small Swin-ADN for 32x32 inputs (patch 2, dim 16, window 4)", patch_size=2, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4)
