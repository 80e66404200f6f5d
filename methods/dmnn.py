"""DMNN (Dynamic Multi-path Neural Network, paper 002): training towards a FLOPs target and
inference that really skips closed sub-blocks. The networks are ``methods.backbones.dmnn_resnet``
and ``methods.backbones.dmnn_mobilenet`` (their shared parts: ``dmnn_common``).

Loss (paper eqs. 9-16): ``CE + sum_b w_b CE(category_b) + lambda * (L_rate + L_flops)`` with
- ``L_rate = mean_b (r_b - t)^2``, r_b = the fraction of block b's sub-blocks open in the batch;
- ``L_flops = (mean executed MACs / dense MACs - t)^2``, executed = fixed part + open sub-blocks +
  controllers (measured at build), dense = the network with every sub-block and no controller;
- the category loss (training only) per controller state, with stage weights ``1e-4 * 10^stage``
  by default (the paper's rule), categories from ``dmnn.categories`` (see
  :func:`dynlab.data.class_categories`).
Predictions are :class:`~dynlab.predictions.GatedPredictions` from real skipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynlab import data as data_mod
from dynlab.config import bounded
from dynlab.errors import ConfigError
from dynlab.predictions import GatedPredictions
from dynlab.registry import DatasetInfo, get_backbone, register_method
from methods.backbones import dmnn_mobilenet, dmnn_resnet  # noqa: F401  (register the backbones and their presets)


@dataclass
class DMNNConfig:
    target_rate: float = bounded(0.5, 0.0, 1.0, help="t: target execution rate per block and target FLOPs rate (executed / dense)")
    resource_weight: float = bounded(1.0, 0.0, help="lambda: weight of the resource loss")
    temperature: float = bounded(1.0, 1e-3, help="Gumbel-softmax temperature")
    categories: str = field(default="auto", metadata={"help": "category supervision: auto (CIFAR-100 superclasses; built-in digits / CIFAR-10 groups), none, or a CSV/JSON class->category file"})
    category_weights: list[float] = field(default_factory=list, metadata={"help": "category-loss weight per stage; empty = 1e-4 * 10^stage (paper)"})
    gate_lr_scale: float = bounded(1.0, 0.0, help="learning rate of the controllers (gate layers) relative to optim.lr")
    gate_weight_decay: float = bounded(0.0, 0.0, help="weight decay of the controllers (0: gate logits are not pulled towards 'half open')")

    def validate(self, section: str) -> None:
        if any(w < 0 for w in self.category_weights):
            raise ConfigError(f"{section}.category_weights", self.category_weights, "non-negative weights, one per stage")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def resource_losses(model, gates: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_rate, L_flops, FLOPs rate per sample [B]) for gates [B, blocks * N]."""
    per_block = gates.view(gates.shape[0], model.num_blocks, model.n).mean(dim=(0, 2))  # r_b
    rate_loss = ((per_block - target) ** 2).mean()
    flops_rate = model.executed_macs(gates) / model.dense_macs
    flops_loss = (flops_rate.mean() - target) ** 2
    return rate_loss, flops_loss.float(), flops_rate.detach()


@register_method("dmnn", DMNNConfig, backbones=("dmnn_resnet", "dmnn_mobilenetv2"))
class DMNN:
    """Gated sub-blocks with controllers, trained towards a FLOPs target."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg: DMNNConfig = cfg.method_cfg
        self.category_of: torch.Tensor | None = None  # class -> category
        self.stage_weights: torch.Tensor | None = None  # category-loss weight per block

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The controllers (gate layers) in a group of their own: own learning rate, own weight decay."""
        gates, rest = [], []
        for name, p in model.named_parameters():
            (gates if ".controller." in f".{name}" else rest).append(p)
        groups = [{"params": rest}]
        if gates:
            groups.append({"params": gates, "lr_scale": self.mcfg.gate_lr_scale, "weight_decay": self.mcfg.gate_weight_decay})
        return groups

    def build_model(self, info: DatasetInfo) -> nn.Module:
        model = get_backbone(self.cfg.backbone).build(self.cfg.backbone_cfg, info)
        model.tau = self.mcfg.temperature
        if not model.gated:
            return model
        mapping = data_mod.class_categories(self.mcfg.categories, self.cfg.data, info.num_classes, f"{self.cfg.method}.categories")
        stages = max(model.stage_of_block) + 1
        weights = list(self.mcfg.category_weights) or [1e-4 * 10**s for s in range(stages)]
        if len(weights) != stages:
            raise ConfigError(f"{self.cfg.method}.category_weights", self.mcfg.category_weights, f"empty (1e-4 * 10^stage) or {stages} weights, one per stage")
        if mapping is not None:
            self.category_of = torch.tensor(mapping, dtype=torch.long)
            model.add_category_heads(max(mapping) + 1)
        self.stage_weights = torch.tensor([weights[s] for s in model.stage_of_block], dtype=torch.float32)
        return model

    def category_loss(self, cats: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        y = self.category_of.to(targets.device)[targets]
        w = self.stage_weights.to(targets.device)
        return sum(w[b] * F.cross_entropy(c.float(), y) for b, c in enumerate(cats))

    def train_step(self, model, batch, backward):
        images, targets = batch
        net = unwrap(model)
        out = model(images)
        ce = F.cross_entropy(out["logits"].float(), targets)
        metrics = {"acc": (out["logits"].argmax(1) == targets).float().mean() * 100, "ce": ce.detach()}
        loss = ce
        if net.gated:
            rate_loss, flops_loss, flops_rate = resource_losses(net, out["gates"], self.mcfg.target_rate)
            loss = loss + self.mcfg.resource_weight * (rate_loss + flops_loss)
            metrics.update(rate_loss=rate_loss.detach(), flops_loss=flops_loss.detach(), flops_rate=flops_rate.mean().float(), gate_rate=out["gates"].detach().mean())
            if out["categories"] and self.category_of is not None:
                cat = self.category_loss(out["categories"], targets)
                loss = loss + cat
                metrics["category_loss"] = cat.detach()
        metrics["loss"] = loss.detach()
        backward(loss)
        return metrics

    @torch.no_grad()
    def predict(self, model, images) -> GatedPredictions:
        net = unwrap(model)
        logits, gates = net.forward_skipping(images)
        return GatedPredictions(logits.float(), net.executed_macs(gates), gates.float(), net.n, float(net.dense_macs))

    @torch.no_grad()
    def gate_states(self, model, images) -> torch.Tensor:
        """Gates [B, blocks * N] (0/1, block-major) that :meth:`predict` uses for these images."""
        return unwrap(model).forward_skipping(images)[1]
