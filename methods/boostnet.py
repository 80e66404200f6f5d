"""BoostNet (Yu et al., "Boosted Dynamic Neural Networks"): exits form an additive model.

F_0 = 0, F_n = t_n * stop_grad(F_{n-1}) + f_n, loss = sum_n w_n CE(F_n, y); the same F_n are the exit
logits at test time. ``trainable_prev=true`` drops the stop-gradient (the paper's ablation), and
``gradient_rescale`` turns the reference's gradient rescaling on or off (on backbones that
implement it: MSDNet; elsewhere the config layer refuses or turns it off); ``gradient_equilibrium``
is the IMTA paper's exact form (MSDNet and RANet), an alternative to it.

Temperatures are indexed by the exit that *uses* them (t_n multiplies F_{n-1} inside F_n), which
avoids the reference code's off-by-one between its training and evaluation scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynlab.config import bounded
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_method
from methods.exits import GRADIENT_EQUILIBRIUM_HELP, GRADIENT_RESCALE_HELP, ExitMethod, build_exit_backbone


@dataclass
class BoostNetConfig:
    temperature: float = bounded(0.5, 0.0, help="t_n for every exit (paper default 0.5)")
    temperatures: list[float] = field(default_factory=list, metadata={"help": "per-exit t_2..t_N; overrides temperature"})
    trainable_prev: bool = field(default=False, metadata={"help": "let gradients flow into F_{n-1} (ablation)"})
    gradient_rescale: bool = field(default=True, metadata={"help": GRADIENT_RESCALE_HELP + "; the BoostNet reference's default"})
    gradient_equilibrium: bool = field(default=False, metadata={"help": GRADIENT_EQUILIBRIUM_HELP})
    exit_weights: list[float] = field(default_factory=list, metadata={"help": "w_n per exit; empty = all 1"})

    def validate(self, section: str) -> None:
        if any(t < 0 for t in self.temperatures):
            raise ConfigError(f"{section}.temperatures", self.temperatures, "non-negative numbers")


class BoostedExits(nn.Module):
    """Wraps an exit backbone (forward -> list of f_n) and returns the boosted logits F_n."""

    def __init__(self, backbone: nn.Module, temperatures: list[float], trainable_prev: bool = False):
        super().__init__()
        if len(temperatures) != backbone.num_exits - 1:
            raise ValueError(f"need {backbone.num_exits - 1} temperatures (exits 2..N), got {len(temperatures)}")
        self.backbone = backbone
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32), persistent=False)
        self.trainable_prev = trainable_prev
        self.num_exits = backbone.num_exits

    @property
    def cost_table(self):  # additions are not counted: the ensemble costs what the backbone costs
        return self.backbone.cost_table

    def exit_step(self, state, k: int):
        """Block ``k`` of the backbone, then F_k = t_k F_{k-1} + f_k for the samples still running."""
        inner, prev = (state, None) if k == 0 else state
        inner, f = self.backbone.exit_step(inner, k)
        F = f if prev is None else self.temperatures[k - 1].to(f.dtype) * prev + f
        return (inner, F), F

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.backbone(x)
        out = [f[0]]
        for n in range(1, len(f)):
            prev = out[-1] if self.trainable_prev else out[-1].detach()
            out.append(self.temperatures[n - 1].to(prev.dtype) * prev + f[n])
        return out


@register_method("boostnet", BoostNetConfig, backbones=("msdnet", "ranet"))
class BoostNet(ExitMethod):
    """Additive exits with temperature, stop-gradient and gradient rescaling."""

    def temperatures(self, num_exits: int) -> list[float]:
        ts = self.mcfg.temperatures
        if not ts:
            return [self.mcfg.temperature] * (num_exits - 1)
        if len(ts) != num_exits - 1:
            raise ConfigError(f"{self.cfg.method}.temperatures", ts, f"{num_exits - 1} numbers (t_2..t_N for {num_exits} exits), or empty")
        return list(ts)

    def build_model(self, info: DatasetInfo) -> nn.Module:
        backbone = build_exit_backbone(self.cfg, info)
        self._set_exits(backbone.num_exits)
        return BoostedExits(backbone, self.temperatures(backbone.num_exits), self.mcfg.trainable_prev)
