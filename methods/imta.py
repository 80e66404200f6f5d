"""IMTA (Li et al., "Improved Techniques for Training Adaptive Deep Networks"), REFERENCE.md section 4.

One method, two phases (``imta.phase``):

- Phase I: the early-exit backbone (MSDNet, RANet) with Gradient Equilibrium, summed CE over exits
  (optionally OFA). ``gradient_equilibrium`` is the paper's exact form (default);
  ``gradient_rescale`` the reference code's coarsest-scale form (MSDNet only).
- Phase II (``phase=2``, ``run.init_from`` = a phase-I checkpoint): new classifiers on the phase-I
  heads' pooled features, with Inline Subnetwork Collaboration (``isc``) and One-for-all
  distillation (``ofa``). The paper's phase II is ``phase=2 isc=true ofa=true``.
  ``freeze=phase1`` (default, as the reference) freezes every phase-I parameter and trains the new
  classifiers and ISC modules; ``freeze=none`` fine-tunes everything. ``classifier_init=phase1``
  (default) is the paper's "fine-tune only the last layer of each classifier": every new classifier
  starts as the phase-I Linear of its exit (ISC columns at zero), so phase II starts at phase I's
  predictions and the OFA teacher (the last classifier) is the trained one from the first step;
  ``fresh`` initialises them anew as the reference code does.

Gradient Equilibrium makes each block's gradient the average of the exit losses that depend on it
through the backbone; an ISC path that is not detached (and not frozen behind) adds dependencies GE
does not count, so with ``isc_detach=false freeze=none`` the average is no longer exact.

ISC: exit i's classifier reads ``cat(pooled_i, ReLU(BN1d(Linear(num_classes -> C_i)(logits_{i-1}))))``;
``isc_detach=true`` (paper) stops the gradient along that path, ``false`` follows the reference code.

OFA: ``L_i = alpha*CE_i + (1-alpha)*KL(softmax(z_K/T) || softmax(z_i/T))`` for every exit but the
last (which keeps plain CE), teacher ``z_K`` = the last exit, detached: the paper's Eq. 7-8, with no
T^2 factor. ``kd_t2=true`` multiplies the KL term by T^2 (Hinton et al.'s scaling, this code's
default before it followed the paper: at T = 3 the distillation is 9 x stronger). ``kl_reduction``:
``batchmean`` (textbook) or ``mean`` (the reference's element-wise mean, also divided by the class
count). Defaults alpha=0.9, T=1 are the reference's shipped script (its code defaults: 0.1 and 3).

``ofa_teacher``: ``last_exit`` (default: the last exit of the network being trained, as the paper
writes it) or ``phase1`` (phase 2: the frozen phase-I last head on the same features, as the
reference code does).

Difference from the reference (kalviny/IMTA), on purpose: frozen phase-I parts stay in eval mode in
phase II (the reference keeps training-mode BatchNorm, so its "frozen" network's statistics drift).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynlab import costs
from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.recipe import hard_labels
from dynlab.registry import DatasetInfo, register_method
from methods.exits import GRADIENT_EQUILIBRIUM_HELP, GRADIENT_RESCALE_HELP, ExitMethod, build_exit_backbone, exit_loss

NEW_PARTS = ("classifiers.", "isc.")  # phase-II modules: not in a phase-I checkpoint


@dataclass
class IMTAConfig:
    phase: int = choice(1, 1, 2, help="1: train the backbone (GE); 2: new classifiers (ISC, OFA) on a phase-I checkpoint given as run.init_from")
    gradient_equilibrium: bool = field(default=True, metadata={"help": GRADIENT_EQUILIBRIUM_HELP})
    gradient_rescale: bool = field(default=False, metadata={"help": GRADIENT_RESCALE_HELP})
    isc: bool = field(default=False, metadata={"help": "Inline Subnetwork Collaboration (phase 2): exit i also reads exit i-1's logits"})
    isc_detach: bool = field(default=True, metadata={"help": "no gradient along the ISC path (paper); false follows the reference code"})
    ofa: bool = field(default=False, metadata={"help": "One-for-all distillation from the last exit into every earlier one"})
    alpha: float = bounded(0.9, 0.0, 1.0, help="OFA: weight of CE; 1-alpha weighs the KL term")
    temperature: float = bounded(1.0, 0.0, help="OFA: softmax temperature T > 0")
    kl_reduction: str = choice("batchmean", "batchmean", "mean", help="OFA KL: batchmean (textbook) or mean (reference: element-wise, also / classes)")
    ofa_teacher: str = choice("last_exit", "last_exit", "phase1", help="OFA teacher: the last exit being trained, or (phase 2) the frozen phase-I last head, as the reference")
    freeze: str = choice("phase1", "phase1", "none", help="phase 2: phase1 = every phase-I parameter frozen (reference); none = fine-tune all")
    classifier_init: str = choice("phase1", "phase1", "fresh", help="phase 2: start from the phase-I Linear (paper: fine-tune the last layer), or fresh classifiers (reference code)")
    kd_t2: bool = field(default=False, metadata={"help": "OFA: scale the KL term by T^2 (Hinton et al.); the paper's Eq. 7 has no T^2"})
    exit_weights: list[float] = field(default_factory=list, metadata={"help": "loss weight per exit; empty = all 1"})
    phase2_epochs: int = bounded(0, 0, help="IMTA pipelines: phase-II epochs; 0 = round(0.6 x run.epochs), the paper's 180 after 300 (by hand, run.epochs of the phase-2 run)")

    def validate(self, section: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{section}.temperature", self.temperature, "a number > 0 (the OFA softmax temperature T)")
        if self.isc and self.phase == 1:
            raise ConfigError(f"{section}.isc", True, f"false with {section}.phase=1 (ISC belongs to the new classifiers of phase 2: set {section}.phase=2 and run.init_from)")
        if self.ofa_teacher == "phase1" and self.phase == 1:
            raise ConfigError(f"{section}.ofa_teacher", "phase1", f"last_exit with {section}.phase=1 (the phase-I head is a teacher only in phase 2)")


# ---- losses -----------------------------------------------------------------------------------


def ofa_loss(outputs: list[torch.Tensor], targets: torch.Tensor, weights: torch.Tensor, alpha: float, T: float, reduction: str = "batchmean", teacher_logits: torch.Tensor | None = None, t2: bool = False):
    """sum_i w_i L_i with L_i = alpha*CE_i + (1-alpha)*s*KL(p_K || p_i) for i < K and L_K = CE_K, where
    s = 1 (the paper's Eq. 7) or T^2 (``t2``); the teacher p_K = softmax(z_K/T) (z_K: the last exit,
    or ``teacher_logits``) is detached, so the KD terms send it no gradient."""
    z_teacher = outputs[-1] if teacher_logits is None else teacher_logits
    teacher = F.softmax(z_teacher.detach().float() / T, dim=1)
    losses, metrics = [], {}
    for i, o in enumerate(outputs):
        ce = F.cross_entropy(o.float(), targets)
        if i == len(outputs) - 1:
            losses.append(ce)
            continue
        kl = F.kl_div(F.log_softmax(o.float() / T, dim=1), teacher, reduction="batchmean")
        if reduction == "mean":  # the reference's element-wise mean: also divided by the class count
            kl = kl / o.shape[1]
        metrics[f"kd_exit{i}"] = kl.detach()
        losses.append(alpha * ce + (1 - alpha) * (T * T if t2 else 1.0) * kl)
    stacked = torch.stack(losses)
    loss = (weights.to(stacked.device) * stacked).sum()
    metrics["loss"] = loss.detach()
    for i, (o, l) in enumerate(zip(outputs, stacked)):
        metrics[f"loss_exit{i}"] = l.detach()
        metrics[f"acc_exit{i}"] = (o.argmax(1) == hard_labels(targets)).float().mean().detach() * 100
    return loss, metrics


# ---- the phase-II network ---------------------------------------------------------------------


class ISC(nn.Sequential):
    """Inline Subnetwork Collaboration: the previous exit's logits -> Linear -> BN1d -> ReLU."""

    def __init__(self, num_classes: int, width: int):
        super().__init__(nn.Linear(num_classes, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))


class IMTANet(nn.Module):
    """The backbone alone (phase 1), or the backbone's head features with new classifiers and ISC
    modules (phase 2). ``forward`` returns the list of exit logits; ``exit_step`` serves real early
    exit; ``cost_table`` holds the measured cumulative exit costs (ISC and new classifiers included)."""

    def __init__(self, backbone: nn.Module, num_classes: int, phase: int, isc: bool, isc_detach: bool, input_shape: tuple[int, ...]):
        super().__init__()
        self.backbone = backbone
        self.num_exits = backbone.num_exits
        self.phase2 = phase == 2
        self.isc_detach = isc_detach
        self.frozen: list[nn.Module] = []  # parts kept in eval mode (set by the method)
        if not self.phase2:
            self.cost_table = backbone.cost_table
            return
        widths = [h.width for h in backbone.heads]
        self.classifiers = nn.ModuleList(nn.Linear(w * (2 if isc and k > 0 else 1), num_classes) for k, w in enumerate(widths))
        self.isc = nn.ModuleList(ISC(num_classes, w) for w in widths[1:]) if isc else None
        for m in [*self.classifiers, *(self.isc or [])]:
            for p in m.modules():
                if isinstance(p, nn.Linear):
                    nn.init.zeros_(p.bias)
        for head in backbone.heads:  # phase I's own Linear layers do not run in phase II
            head.linear.requires_grad_(False)
        self.cost_table = costs.measure_exits(self, input_shape, list(self.classifiers))

    def _classify(self, k: int, pooled: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        if self.isc is not None and k > 0:
            pooled = torch.cat([pooled, self.isc[k - 1](prev.detach() if self.isc_detach else prev)], dim=1)
        return self.classifiers[k](pooled)

    def forward(self, x: torch.Tensor, teacher: bool = False):
        """Exit logits; with ``teacher`` (phase 2) also the phase-I last head's logits on the same
        features, detached (the reference code's OFA teacher): ``(logits, teacher_logits)``.
        A keyword of forward, so that DDP's wrapper runs it."""
        if not self.phase2:
            return (self.backbone(x), None) if teacher else self.backbone(x)
        out: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []

        def head_fn(k: int, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
            pooled = head.features(h)
            if teacher and k == self.num_exits - 1:
                kept.append(head.linear(pooled).detach())
            out.append(self._classify(k, pooled, out[-1] if out else None))
            return out[-1]

        logits = self.backbone.forward_heads(x, head_fn)
        return (logits, kept[0]) if teacher else logits

    def exit_step(self, state, k: int):
        """Block ``k`` and exit ``k`` only (real early exit); the state carries exit k-1's logits for ISC."""
        if not self.phase2:
            return self.backbone.exit_step(state, k)
        inner, prev = (state, None) if k == 0 else state
        inner, head_in = self.backbone.exit_features(inner, k)
        logits = self._classify(k, self.backbone.heads[k].features(head_in), prev)
        return (inner, logits), logits

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen:  # frozen means frozen: no BatchNorm statistics drift either
            m.eval()
        return self


# ---- loading a phase-I checkpoint ----------------------------------------------------------------


def matched_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, backbone: str) -> dict[str, torch.Tensor]:
    """``state`` keyed as ``model`` (a bare backbone's checkpoint, e.g. method=joint, gets the
    ``backbone.`` prefix), after checking that it is this architecture: every tensor it holds has a
    same-shaped place in ``model``, and every tensor of ``model`` it lacks is a new phase-II part."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConfigError("run.init_from", source, "a checkpoint of weights (a state dict); it holds something else")
    if state and not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state and not k.startswith(NEW_PARTS)]
    if wrong or missing:
        example = (wrong or missing)[0]
        raise ConfigError("run.init_from", source, f"a checkpoint of this {backbone} ({len(wrong) + len(missing)} tensor(s) differ from this model's, e.g. {example}): train phase I with the same backbone settings")
    return state


@register_method("imta", IMTAConfig, backbones=("msdnet", "ranet"))
class IMTA(ExitMethod):
    """IMTA: gradient equilibrium (phase I), ISC and one-for-all distillation (phase II)."""

    def build_model(self, info: DatasetInfo) -> nn.Module:
        m = self.mcfg
        shape = (1, info.channels, info.image_size, info.image_size)
        model = IMTANet(build_exit_backbone(self.cfg, info), info.num_classes, m.phase, m.isc, m.isc_detach, shape)
        self._set_exits(model.num_exits)
        if m.phase == 2:
            if not self.cfg.run.init_from:
                raise ConfigError("run.init_from", "", "a phase-I checkpoint (a folder holding best.pt, or a .pt file) with imta.phase=2")
            if m.freeze == "phase1":
                model.backbone.requires_grad_(False)
                model.frozen = [model.backbone]
        return model

    def load_init(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        """Phase I's weights into a phase-II model (the training loop calls this before epoch 0 of a
        run that does not resume): shared keys strictly, new classifiers and ISC as built."""
        state = matched_state(model, state, source, self.cfg.backbone)
        model.load_state_dict(state, strict=False)
        if self.mcfg.classifier_init == "phase1" and getattr(model, "phase2", False):
            with torch.no_grad():
                for head, cls in zip(model.backbone.heads, model.classifiers):
                    w = head.linear.weight.shape[1]
                    cls.weight.zero_()
                    cls.weight[:, :w].copy_(head.linear.weight)
                    cls.bias.copy_(head.linear.bias)

    def train_step(self, model, batch, backward):
        images, targets = batch
        m = self.mcfg
        if m.ofa and m.ofa_teacher == "phase1":
            outputs, teacher = model(images, teacher=True)
        else:
            outputs, teacher = model(images), None
        if self._weights is None:  # a method object that did not build this model
            self._set_exits(len(outputs))
        if m.ofa:
            loss, metrics = ofa_loss(outputs, targets, self._weights, m.alpha, m.temperature, m.kl_reduction, teacher, m.kd_t2)
        else:
            loss, metrics = exit_loss(outputs, targets, self._weights)
        backward(loss)
        return metrics
