"""The three prediction shapes a method can return, each carrying its own costs.

Evaluation dispatches on these types, never on the method that produced them.
Costs are multiply-adds per the convention of ``dynlab.costs``; logits are float tensors on CPU
or any device (evaluation moves them as needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExitPredictions:
    """Early-exit networks: logits at every exit and the cumulative cost to reach each exit."""

    logits: torch.Tensor  # [E, B, C]
    costs: torch.Tensor  # [E], cumulative, increasing

    def __post_init__(self):
        if self.logits.dim() != 3:
            raise ValueError(f"ExitPredictions.logits must be [exits, batch, classes], got {tuple(self.logits.shape)}")
        if self.costs.shape != (self.logits.shape[0],):
            raise ValueError(f"ExitPredictions.costs must be [exits]={self.logits.shape[0]}, got {tuple(self.costs.shape)}")

    @property
    def num_outputs(self) -> int:
        return self.logits.shape[0]


@dataclass
class SubnetPredictions:
    """Networks with selectable sub-networks (e.g. ADN): logits of every sub-network and its cost."""

    logits: torch.Tensor  # [S, B, C]
    costs: torch.Tensor  # [S]
    names: list[str] = field(default_factory=list)  # e.g. "TTFF": one letter per skippable stage

    def __post_init__(self):
        if self.logits.dim() != 3:
            raise ValueError(f"SubnetPredictions.logits must be [subnets, batch, classes], got {tuple(self.logits.shape)}")
        if self.costs.shape != (self.logits.shape[0],):
            raise ValueError(f"SubnetPredictions.costs must be [subnets]={self.logits.shape[0]}, got {tuple(self.costs.shape)}")
        if not self.names:
            self.names = [f"subnet{i}" for i in range(self.logits.shape[0])]
        if len(self.names) != self.logits.shape[0]:
            raise ValueError(f"SubnetPredictions.names has {len(self.names)} names for {self.logits.shape[0]} sub-networks")

    @property
    def num_outputs(self) -> int:
        return self.logits.shape[0]


@dataclass
class GatedPredictions:
    """Per-sample gated networks (e.g. DMNN): one logit row per sample and its executed cost."""

    logits: torch.Tensor  # [B, C]
    costs: torch.Tensor  # [B], executed cost of each sample
    gates: torch.Tensor | None = None  # [B, blocks * subblocks], 0/1, block-major (for execution-rate analyses)
    subblocks: int = 1  # gates per block
    full_cost: float | None = None  # the cost with every gate open (the dense network's)

    def __post_init__(self):
        if self.logits.dim() != 2:
            raise ValueError(f"GatedPredictions.logits must be [batch, classes], got {tuple(self.logits.shape)}")
        if self.costs.shape != (self.logits.shape[0],):
            raise ValueError(f"GatedPredictions.costs must be [batch]={self.logits.shape[0]}, got {tuple(self.costs.shape)}")
        if self.gates is not None and (self.gates.dim() != 2 or self.gates.shape[0] != self.logits.shape[0] or self.gates.shape[1] % self.subblocks):
            raise ValueError(f"GatedPredictions.gates must be [batch={self.logits.shape[0]}, blocks * {self.subblocks}], got {tuple(self.gates.shape)}")


Predictions = ExitPredictions | SubnetPredictions | GatedPredictions


def concat(parts: list[Predictions]) -> Predictions:
    """Join predictions of successive batches along the sample axis."""
    if not parts:
        raise ValueError("concat needs at least one batch of predictions")
    first = parts[0]
    if isinstance(first, ExitPredictions):
        return ExitPredictions(torch.cat([p.logits for p in parts], dim=1), first.costs)
    if isinstance(first, SubnetPredictions):
        return SubnetPredictions(torch.cat([p.logits for p in parts], dim=1), first.costs, list(first.names))
    if isinstance(first, GatedPredictions):
        gates = torch.cat([p.gates for p in parts]) if first.gates is not None else None
        return GatedPredictions(torch.cat([p.logits for p in parts]), torch.cat([p.costs for p in parts]), gates, first.subblocks, first.full_cost)
    raise TypeError(f"unknown prediction type {type(first).__name__}")
