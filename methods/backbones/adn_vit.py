"""ADN ViT: torchvision's VisionTransformer (modules and state-dict layout unchanged), its encoder
blocks in 4 groups, the last block of each group skippable (ViT-B/16: 12 blocks, groups of 3;
REFERENCE.md section 6), skip-aware LayerNorm in the mandatory blocks of a skipped group.
``load_torchvision(state_dict)`` loads a torchvision checkpoint into the super-net, the
skip-aware norms starting as copies of the loaded ones (adn_base.load_torchvision).

Costs: ``dynlab.costs`` counts modules by hooks, and ``nn.MultiheadAttention`` runs its projections
functionally (no Linear hook fires) and its two attention products are plain matmuls. So the
attention blocks here are :class:`CountedAttention` (same class layout, a ``macs`` method), and
:meth:`ADNViT.subnet_cost` adds what ``dynlab.costs`` returned 0 for: per token the q/k/v and output
projections (weights + bias, the Linear convention) and 2 * tokens * dim for QK^T and AV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from dynlab.config import bounded
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset
from methods.backbones.adn_base import SubnetCosts, TorchvisionWeights, add_skip_norms, parse_skip, skip_norms_in


class CountedAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that states its own multiply-adds for one sample."""

    def macs(self, inputs: tuple, output) -> float:
        n, e = inputs[0].shape[1], self.embed_dim  # batch_first: [B, N, E]
        proj = 3 * e * e + 3 * e + e * e + e
        return float(n * proj + 2 * n * n * e)

    def unhooked_params(self) -> int:
        return sum(p.numel() for p in self.out_proj.parameters())  # used functionally: its hook never fires


class ADNViT(SubnetCosts, TorchvisionWeights, VisionTransformer):
    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 num_classes: int, groups: int = 4, skip_aware_norms: bool = True):
        super().__init__(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, num_classes=num_classes)
        if num_layers % groups or num_layers // groups < 2:
            raise ValueError(f"{num_layers} encoder blocks do not split into {groups} groups of >= 2")
        blocks = list(self.encoder.layers)
        for b in blocks:
            b.self_attention.__class__ = CountedAttention  # same parameters and keys
        size = num_layers // groups
        self.group_blocks = [blocks[g * size:(g + 1) * size] for g in range(groups)]
        self.num_stages = groups
        self.skip_aware_norms = skip_aware_norms
        self.input_shape = (1, 3, image_size, image_size)
        self.ddp_find_unused_parameters = True
        if skip_aware_norms:
            for group in self.group_blocks:
                for b in group[:-1]:
                    add_skip_norms(b)
        self._cost_table = None

    def forward(self, x: torch.Tensor, skip=None, return_features: bool = False):
        skip = parse_skip(skip, self.num_stages)
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder.dropout(x + self.encoder.pos_embedding)
        features = []
        for group, s in zip(self.group_blocks, skip):
            for b in group[:-1] if s else group:
                with skip_norms_in(b, s and self.skip_aware_norms):
                    x = b(x)
            features.append(x.transpose(1, 2))  # [B, dim, tokens]: channels first, as the KD expects
        logits = self.heads(self.encoder.ln(x)[:, 0])
        return (logits, features) if return_features else logits



@dataclass
class ADNViTConfig:
    patch_size: int = bounded(4, 1)
    num_layers: int = bounded(8, 8, help="encoder blocks, a multiple of 4 (4 groups of >= 2)")
    num_heads: int = bounded(2, 1)
    hidden_dim: int = bounded(32, 1)
    mlp_dim: int = bounded(64, 1)

    def validate(self, section: str) -> None:
        if self.num_layers % 4:
            raise ConfigError(f"{section}.num_layers", self.num_layers, "a multiple of 4 (4 groups, the last block of each skippable)")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"{section}.hidden_dim", self.hidden_dim, f"a multiple of num_heads={self.num_heads}")


@register_backbone("adn_vit", ADNViTConfig, description="ViT with a skippable last block per group of encoder blocks (ADN), torchvision layout")
def build_adn_vit(cfg: ADNViTConfig, info: DatasetInfo, skip_aware_norms: bool = True) -> ADNViT:
    if info.channels != 3 or info.image_size % cfg.patch_size:
        raise ConfigError("adn_vit.patch_size", cfg.patch_size, f"a divisor of the {info.image_size}-pixel input (3-channel images)")
    return ADNViT(info.image_size, cfg.patch_size, cfg.num_layers, cfg.num_heads, cfg.hidden_dim, cfg.mlp_dim, info.num_classes, 4, skip_aware_norms)


# ViT-B's recipe as the authors train it (their README): 300 epochs of AdamW, lr 7.5e-4 with 30 warm-up
# epochs then cosine, weight decay 0.2, label smoothing 0.11, MixUp 0.2 / CutMix 1.0, RandAugment,
# gradient clipping 1, an EMA of the weights
VIT_RECIPE = {"run.epochs": 300, "optim.name": "adamw", "optim.lr": 7.5e-4, "optim.weight_decay": 0.2, "optim.schedule": "cosine", "optim.warmup_epochs": 30,
              "optim.label_smoothing": 0.11, "data.mixup": 0.2, "data.cutmix": 1.0, "data.auto_augment": "randaugment", "run.grad_clip": 1.0, "run.ema_decay": 0.99996}
register_preset("adn-vit-b16", "adn_vit", "imagenet", "ViT-B/16-ADN, ImageNet 224x224", recipe=VIT_RECIPE, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
register_preset("adn-vit-b32", "adn_vit", "imagenet", "ViT-B/32-ADN, ImageNet 224x224 (the paper's Table 4)", recipe=VIT_RECIPE, patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
register_preset("adn-vit-cifar", "adn_vit", "cifar10", "small ViT-ADN for 32x32 inputs (patch 4, 8 blocks, dim 32)", patch_size=4, num_layers=8, num_heads=2, hidden_dim=32, mlp_dim=64)
