"""Joint training: the sum of cross-entropy over all exits (the MSDNet / RANet baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dynlab.registry import DatasetInfo, register_method
from methods.exits import GRADIENT_EQUILIBRIUM_HELP, GRADIENT_RESCALE_HELP, ExitMethod, build_exit_backbone


@dataclass
class JointConfig:
    gradient_rescale: bool = field(default=False, metadata={"help": GRADIENT_RESCALE_HELP})
    gradient_equilibrium: bool = field(default=False, metadata={"help": GRADIENT_EQUILIBRIUM_HELP})
    exit_weights: list[float] = field(default_factory=list, metadata={"help": "loss weight per exit; empty = all 1"})


@register_method("joint", JointConfig, backbones=("msdnet", "ranet"))
class Joint(ExitMethod):
    """Sum of CE over exits (MSDNet baseline)."""

    def build_model(self, info: DatasetInfo) -> nn.Module:
        model = build_exit_backbone(self.cfg, info)
        self._set_exits(model.num_exits)
        return model
