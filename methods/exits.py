"""Pieces shared by the exit methods (joint, BoostNet): building an exit backbone, the summed exit
loss and turning a list of exit logits into ExitPredictions. (Real early-exit inference is
``dynlab.early_exit``.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.errors import ConfigError
from dynlab.predictions import ExitPredictions
from dynlab.recipe import hard_labels
from dynlab.registry import DatasetInfo, backbone_options, get_backbone


def build_exit_backbone(cfg, info: DatasetInfo) -> nn.Module:
    """The backbone of ``cfg``, given the method options it implements (e.g. gradient_rescale)."""
    entry = get_backbone(cfg.backbone)
    check_gradient_forms(cfg.method_cfg, cfg.method)
    return entry.build(cfg.backbone_cfg, info, **backbone_options(cfg.backbone, cfg.method_cfg))


GRADIENT_EQUILIBRIUM_HELP = "IMTA's gradient equilibrium, the paper's exact form: each block's gradient is the average of the exit losses that depend on it (MSDNet, RANet)"
GRADIENT_RESCALE_HELP = "gradient equilibrium as the reference codes do it: MSDNet's coarsest scale only (BoostNet's gradient rescaling)"


def check_gradient_forms(cfg, section: str) -> None:
    """The two forms of gradient equilibrium are alternatives, not layers. Checked at the model build
    (the driver's preflight builds it), after the config layer has set off what the backbone lacks."""
    if getattr(cfg, "gradient_rescale", False) and getattr(cfg, "gradient_equilibrium", False):
        raise ConfigError(f"{section}.gradient_equilibrium", True, f"false when {section}.gradient_rescale=true (two forms of one rescaling: the paper's exact form, or the reference codes' coarsest-scale form; choose one)")


def exit_weights(weights: list[float], num_exits: int, section: str) -> torch.Tensor:
    if not weights:
        return torch.ones(num_exits)
    if len(weights) != num_exits:
        raise ConfigError(f"{section}.exit_weights", weights, f"empty (all 1) or {num_exits} numbers, one per exit")
    return torch.tensor(weights, dtype=torch.float32)


def exit_loss(outputs: list[torch.Tensor], targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_n w_n * CE(outputs[n], y), plus per-exit loss and correct counts for logging."""
    losses = torch.stack([F.cross_entropy(o.float(), targets) for o in outputs])
    loss = (weights.to(losses.device) * losses).sum()
    metrics = {"loss": loss.detach()}
    for n, (o, l) in enumerate(zip(outputs, losses)):
        metrics[f"loss_exit{n}"] = l.detach()
        metrics[f"acc_exit{n}"] = (o.argmax(1) == hard_labels(targets)).float().mean().detach() * 100
    return loss, metrics


def exit_predictions(outputs: list[torch.Tensor], model: nn.Module) -> ExitPredictions:
    costs = torch.tensor(model.cost_table.macs, dtype=torch.float64)
    return ExitPredictions(torch.stack([o.float() for o in outputs]), costs)


class ExitMethod:
    """train_step / predict shared by methods whose model returns a list of exit logits.
    A method adds ``build_model``; the method config must have ``exit_weights``. Targets may be
    class probabilities (MixUp, CutMix, label smoothing: see dynlab.recipe)."""

    soft_targets = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg = cfg.method_cfg
        self._weights: torch.Tensor | None = None

    def _set_exits(self, num_exits: int) -> None:
        self._weights = exit_weights(self.mcfg.exit_weights, num_exits, self.cfg.method)

    def train_step(self, model, batch, backward):
        images, targets = batch
        outputs = model(images)
        if self._weights is None:  # a method object that did not build this model
            self._set_exits(len(outputs))
        loss, metrics = exit_loss(outputs, targets, self._weights)
        backward(loss)
        return metrics

    @torch.no_grad()
    def predict(self, model, images):
        return exit_predictions(model(images), model)
