"""Tiny stand-in methods for the two prediction shapes whose real methods come later (ADN's
sub-networks, DMNN's per-sample gates). They use the real protocol, registry and loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.costs import measure_total
from dynlab.predictions import GatedPredictions, SubnetPredictions
from dynlab.registry import register_method



def cross_entropy_step(model, batch, backward) -> dict:
    """One plain training step (cross-entropy on the model's logits), for stand-ins with one output."""
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    backward(loss)
    return {"loss": loss.detach()}

class TwoDepthNet(nn.Module):
    """A shallow path and a deep path (``skip=True`` drops the second block), like ADN's sub-networks."""

    def __init__(self, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.extra = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))

    def forward(self, x, skip: bool = False):
        h = self.stem(x)
        if not skip:
            h = h + self.extra(h)
        return self.head(h)


@dataclass
class TwoDepthConfig:
    kd_weight: float = 0.5


@register_method("standin_subnets", TwoDepthConfig)
class StandInSubnets:
    """Calls backward twice per step (super-net CE, then base-net CE + KD), as ADN will."""

    backward_calls: list[int] = []

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self, info):
        model = TwoDepthNet(info.num_classes)
        shape = (1, 3, info.image_size, info.image_size)
        full = measure_total(model, shape)[0]
        model.eval()
        base = measure_total(_Skip(model), shape)[0]
        model.costs = torch.tensor([base, full], dtype=torch.float64)
        return model

    def train_step(self, model, batch, backward):
        x, y = batch
        calls = 0
        logits = model(x)
        loss_super = F.cross_entropy(logits, y)
        backward(loss_super)
        calls += 1
        base = model(x, skip=True)
        kd = F.kl_div(F.log_softmax(base, 1), F.softmax(logits.detach(), 1), reduction="batchmean")
        loss_base = F.cross_entropy(base, y) + self.cfg.method_cfg.kd_weight * kd
        backward(loss_base)
        calls += 1
        StandInSubnets.backward_calls.append(calls)
        return {"loss": (loss_super + loss_base).detach()}

    @torch.no_grad()
    def predict(self, model, images):
        m = getattr(model, "module", model)
        return SubnetPredictions(torch.stack([m(images, skip=True), m(images)]), m.costs, ["T", "F"])


class _Skip(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, skip=True)


@register_method("standin_gated", TwoDepthConfig)
class StandInGated:
    """Runs the second block only for samples whose gate opens; reports each sample's cost."""

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self, info):
        model = TwoDepthNet(info.num_classes)
        model.gate = nn.Linear(3, 1)
        shape = (1, 3, info.image_size, info.image_size)
        model.eval()
        model.base_cost = measure_total(_Skip(model), shape)[0]
        model.extra_cost = measure_total(model.extra, (1, 4, info.image_size // 2, info.image_size // 2))[0]
        return model

    def train_step(self, model, batch, backward):
        return cross_entropy_step(model, batch, backward)

    @torch.no_grad()
    def predict(self, model, images):
        m = getattr(model, "module", model)
        open_ = m.gate(images.mean((2, 3))).squeeze(1) > 0
        logits = m(images, skip=True)
        if open_.any():
            logits[open_] = m(images[open_])  # the deep path runs only for the open samples
        costs = torch.full((len(images),), m.base_cost, dtype=torch.float64) + open_.double() * m.extra_cost
        return GatedPredictions(logits, costs)
