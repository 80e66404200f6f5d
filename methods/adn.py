"""ADN (Kang et al., "Adaptive Depth Networks with Skippable Sub-Paths"): one network, 2^stages
sub-networks chosen at test time (REFERENCE.md section 6; paper 004).

Training step (paper Algorithm 1 in the two-backward form the paper uses under DDP, as the authors'
code does it: wchkang/depth train_adn.py, train_one_epoch_twobackward):
1. super-net (no stage skipped): ``alpha * CE(logits, y)``, first ``backward``;
2. base-net (every stage skipped): with self-distillation (``distill=true``)
   ``(1 - alpha) * kd_lambda * (KL_T(logits) + feature_weight * sum_s KL_T(pooled stage s))``,
   teacher = the super-net's outputs, detached; without it (the paper's Table 4 ablation; the
   authors' ``..._no_kd`` step) ``(1 - alpha) * CE(logits, y)``; second ``backward``. The platform
   then takes one optimizer step, so the gradient is that of the sum of both losses. alpha = 0.5
   (paper section 4.1; authors' ``--subpath-alpha``), kd_lambda = feature_weight = 1 (authors).

KL_T(t, s) = T^2 * KL(softmax(t/T) || softmax(s/T)) summed over the last axis and averaged over the
batch (torch's KLDivLoss ``batchmean``, as the authors use it). Logits: over the teacher's top-k
classes (``topk``; the authors take 500, written for ImageNet's 1000; k >= classes keeps them all).
Stage features: each stage output [B, C, ...] is global-average-pooled to [B, C] and the KL is over
channels (the authors' IntermediateLayerGetter in models/_utils_fpn.py), on the stages
``feature_stages`` (1-based; empty = the authors' choice: stages 1..S-1 of a ResNet, i.e.
layer1-layer3; none on the other backbones, for which their code extracts no features).

``run.init_from``: a dynlab ADN checkpoint of the same network (loaded strictly), or a torchvision
state dict of the architecture (e.g. ImageNet weights of resnet50): it loads into the super-net and
every skip-aware norm starts as a copy of its loaded norm (``ADN.load_init``). A file that is
neither is refused when the model is built, so the driver's preflight refuses it before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.config import bounded, choice
from dynlab.errors import ConfigError
from dynlab.predictions import SubnetPredictions
from dynlab.recipe import hard_labels
from dynlab.registry import DatasetInfo, get_backbone, register_method
from methods.backbones import adn_mobilenetv2, adn_resnet, adn_swin, adn_vit  # noqa: F401  (register the ADN backbones)
from methods.backbones.adn_base import SKIP_NORMS, load_torchvision, subnet_names, torchvision_mismatches


# Stages (0-based) whose outputs the authors' code distills, by backbone and stage count: ResNet's
# layer1-layer3 (train_adn.py at the release f24b7b5, line 323; their later commit moved it to
# layer2-layer4 "for rtdetr", a detector); the other backbones have none ("fpn is only supported for
# resnet models"): their base-nets learn from the logits only.
AUTHORS_FEATURE_STAGES = {"adn_resnet": lambda stages: list(range(stages - 1))}


@dataclass
class ADNConfig:
    distill: bool = field(default=True, metadata={"help": "skip-aware self-distillation; false: the base-net is trained with CE (ablation)"})
    skip_aware_norms: bool = field(default=True, metadata={"help": "second set of norms in mandatory blocks, used when the stage is skipped"})
    alpha: float = bounded(0.5, 0.0, 1.0, help="super-net CE weighted alpha, the base-net's loss 1 - alpha (paper and authors: 0.5)")
    kd_lambda: float = bounded(1.0, 0.0, help="multiplies the base-net's distillation terms (authors: 1; the knob sweep_adn varies)")
    temperature: float = bounded(1.0, 1e-3, help="KD temperature T (authors: 1)")
    feature_weight: float = bounded(1.0, 0.0, help="weight of the stage-feature KD beside the logit KD (authors: 1; 0 = logits only, the paper's Table 4 last row)")
    feature_stages: list[int] = field(default_factory=list, metadata={"help": "stages (1-based) whose pooled outputs are distilled; empty = the authors' choice (ResNet: 1..S-1; other backbones: none)"})
    topk: int = bounded(500, 0, help="logit KD over the teacher's top-k classes (authors: 500, for ImageNet); 0 or >= classes = all classes")
    individual: str = choice("", "", "super", "base", help="baselines: train only the super-net or only the base-net, with CE; empty = ADN training")
    subnets: list[str] = field(default_factory=list, metadata={"help": "sub-networks to evaluate, e.g. [TTTT,FFFF] (base = all T, super = all F); empty = all 2^stages"})

    def validate(self, section: str) -> None:
        if any(s < 1 for s in self.feature_stages) or len(set(self.feature_stages)) != len(self.feature_stages):
            raise ConfigError(f"{section}.feature_stages", self.feature_stages, "distinct stage numbers from 1 (the first stage); empty = the authors' stages")


def kd_rows(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the last axis, averaged over rows
    (the batch for [B, K] inputs: KLDivLoss ``batchmean``)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def logit_kd(teacher: torch.Tensor, student: torch.Tensor, temperature: float, topk: int = 0) -> torch.Tensor:
    """KL_T over the teacher's ``topk`` most likely classes of each sample (0 or >= classes: all)."""
    if 0 < topk < teacher.shape[1]:
        idx = teacher.topk(topk, dim=1).indices
        teacher, student = teacher.gather(1, idx), student.gather(1, idx)
    return kd_rows(teacher, student, temperature)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """[B, C, ...] -> [B, C]: the mean over every position (global average pooling)."""
    return feature.float().flatten(2).mean(2)


def feature_kd(teacher: list[torch.Tensor], student: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Sum over the given stages of KL_T between the globally pooled features, over channels."""
    return sum(kd_rows(pooled(t), pooled(s), temperature) for t, s in zip(teacher, student))


def _net(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP wraps the network


def ddp_safe(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss``, plus 0 x every parameter when ``model`` is DDP built without
    find_unused_parameters: such DDP waits for a gradient of every parameter in each backward,
    and each ADN pass leaves some unused (super-net: the skip-aware norms; base-net: the skippable
    halves). The added term changes no gradient; with find_unused_parameters=True it is not added."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not model.find_unused_parameters:
        return loss + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
    return loss


@register_method("adn", ADNConfig, backbones=("adn_resnet", "adn_mobilenetv2", "adn_vit", "adn_swin"))
class ADN:
    """Super-net CE and base-net self-distillation, two backward calls; sub-network predictions."""

    soft_targets = True  # its CE takes probabilities (MixUp / CutMix / label smoothing); labels only for accuracies

    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg: ADNConfig = cfg.method_cfg

    def build_model(self, info: DatasetInfo) -> nn.Module:
        entry = get_backbone(self.cfg.backbone)
        model = entry.build(self.cfg.backbone_cfg, info, skip_aware_norms=self.mcfg.skip_aware_norms)
        self.subnets(model)  # unknown sub-network names fail here, before training
        self.feature_stages(model)  # and so do stages the network does not have
        return model

    def feature_stages(self, model: nn.Module) -> list[int]:
        """The stages (0-based) whose features the base-net distills (``feature_stages``, else the
        authors' choice for this backbone)."""
        n = _net(model).num_stages
        given = self.mcfg.feature_stages
        if any(s > n for s in given):
            raise ConfigError(f"{self.cfg.method}.feature_stages", list(given), f"stage numbers from 1 to {n} ({self.cfg.backbone} has {n} stages)")
        if given:
            return [s - 1 for s in given]
        return AUTHORS_FEATURE_STAGES.get(self.cfg.backbone, lambda _: [])(n)

    def init_kind(self, model: nn.Module, state, source: str) -> str:
        """``"adn"`` when ``state`` is a dynlab checkpoint of this very network (every key and
        shape), ``"torchvision"`` when it is a torchvision state dict of its architecture (see
        adn_base.load_torchvision); anything else is a ConfigError on ``run.init_from``."""
        net = _net(model)
        allowed = f"a dynlab ADN checkpoint of this {self.cfg.backbone} (same settings) or a torchvision state dict of its architecture"
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise ConfigError("run.init_from", source, f"{allowed}; it holds something else, not a state dict of tensors")
        own = net.state_dict()
        if state.keys() == own.keys() and all(v.shape == own[k].shape for k, v in state.items()):
            return "adn"
        if any(SKIP_NORMS in k for k in state):  # an ADN checkpoint, of other settings
            bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
            bad = [f"{k} ({'shape differs' if k in own and k in state else 'missing' if k in own else 'not in this model'})" for k in bad]
        else:
            bad = torchvision_mismatches(net, state)
            if not bad:
                return "torchvision"
        raise ConfigError("run.init_from", source, f"{allowed} ({len(bad)} tensor(s) differ, e.g. {bad[0]})")

    def load_init(self, model: nn.Module, state: dict, source: str) -> None:
        """``run.init_from`` into a new model (the training loop calls this before epoch 0 of a run
        that does not resume): a dynlab ADN checkpoint strictly; a torchvision state dict into the
        super-net, every skip-aware norm starting as a copy of its loaded norm."""
        if self.init_kind(model, state, source) == "adn":
            _net(model).load_state_dict(state)
        else:
            load_torchvision(_net(model), state)

    def subnets(self, model: nn.Module) -> list[str]:
        every = subnet_names(_net(model).num_stages)
        if self.mcfg.individual:  # an individually trained network is evaluated as itself only
            return [every[-1] if self.mcfg.individual == "super" else every[0]]
        alias = {"base": every[0], "super": every[-1]}  # names that hold whatever the stage count
        chosen = [alias.get(n, n) for n in self.mcfg.subnets] or every
        bad = [n for n in chosen if n not in every]
        if bad or len(set(chosen)) != len(chosen):
            raise ConfigError(f"{self.cfg.method}.subnets", self.mcfg.subnets, f"distinct names of {len(every[0])} letters T/F (one per stage, T = skipped), e.g. {every[0]},{every[-1]}, or base / super; empty = all")
        return chosen

    def train_macs(self, table) -> float:
        """MACs per image of a training step's forward passes (the plan's compute): the super-net and
        the base-net, or the one network trained alone."""
        base, full = float(table.macs[0]), float(table.macs[-1])
        return {"super": full, "base": base}.get(self.mcfg.individual, base + full)

    def train_step(self, model, batch, backward):
        images, targets = batch
        stages = _net(model).num_stages
        if self.mcfg.individual:
            return self.individual_step(model, images, targets, skip=[self.mcfg.individual == "base"] * stages, backward=backward)
        alpha = self.mcfg.alpha
        logits, feats = model(images, skip=[False] * stages, return_features=True)
        ce_super = F.cross_entropy(logits.float(), targets)
        loss_super = alpha * ce_super
        backward(ddp_safe(model, loss_super))
        teacher_logits, teacher_feats = logits.detach(), [f.detach() for f in feats]

        base, base_feats = model(images, skip=[True] * stages, return_features=True)
        base_term, terms = self.base_loss(model, base, base_feats, teacher_logits, teacher_feats, targets)
        loss_base = (1 - alpha) * base_term
        backward(ddp_safe(model, loss_base))
        return {
            "loss": (loss_super + loss_base).detach(),
            "loss_super": loss_super.detach(),
            "loss_base": loss_base.detach(),
            "ce_super": ce_super.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "acc_super": (logits.argmax(1) == hard_labels(targets)).float().mean().detach() * 100,
            "acc_base": (base.argmax(1) == hard_labels(targets)).float().mean().detach() * 100,
        }

    def individual_step(self, model, images, targets, skip, backward):
        logits = model(images, skip=skip)
        loss = F.cross_entropy(logits.float(), targets)
        backward(ddp_safe(model, loss))
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == hard_labels(targets)).float().mean().detach() * 100}

    def base_loss(self, model, logits, feats, teacher_logits, teacher_feats, targets) -> tuple[torch.Tensor, dict]:
        """The base-net's loss before its weight 1 - alpha, and its unweighted terms (for the log)."""
        c = self.mcfg
        if not c.distill:
            ce = F.cross_entropy(logits.float(), targets)
            return ce, {"ce_base": ce}
        kd_logit = logit_kd(teacher_logits, logits, c.temperature, c.topk)
        chosen = self.feature_stages(model) if c.feature_weight > 0 else []
        kd_feature = feature_kd([teacher_feats[i] for i in chosen], [feats[i] for i in chosen], c.temperature) if chosen else torch.zeros((), device=logits.device)
        return c.kd_lambda * (kd_logit + c.feature_weight * kd_feature), {"kd_logit": kd_logit, "kd_feature": kd_feature}

    @torch.no_grad()
    def predict_subnet(self, model, images, name: str) -> torch.Tensor:
        """Logits of one sub-network only (budgeted serving runs just the chosen one)."""
        return _net(model)(images, skip=name).float()

    def predict(self, model, images) -> SubnetPredictions:
        net = _net(model)
        names = self.subnets(net)
        table = net.cost_table
        costs = torch.tensor([table.macs[table.names.index(n)] for n in names], dtype=torch.float64)
        logits = torch.stack([net(images, skip=n).float() for n in names])
        return SubnetPredictions(logits, costs, names)


@torch.no_grad()
def subnet_latency(model: nn.Module, names: list[str], batch: int = 1, repeats: int = 5, warmup: int = 1):
    """Measured wall time per sub-network on a zero batch of the model's input size, beside its
    MACs (dynlab.subnets.latency: median of interleaved rounds). Columns: name, latency_s, min_s, macs."""
    from dynlab import subnets as sub

    net = _net(model)
    was_training = net.training
    net.eval()
    p = next(net.parameters())
    x = torch.zeros((batch, *net.input_shape[1:]), device=p.device, dtype=p.dtype)
    sync = torch.cuda.synchronize if p.is_cuda else (lambda: None)

    def run(name):
        net(x, skip=name)
        sync()  # GPU work is asynchronous: time it to completion

    try:
        frame = sub.latency(run, names, repeats=repeats, warmup=warmup)
    finally:
        net.train(was_training)
    table = net.cost_table
    frame["macs"] = [table.macs[table.names.index(n)] for n in names]
    return frame


__all__ = ["subnet_latency", "ADN", "ADNConfig", "adn_resnet", "adn_mobilenetv2", "adn_vit", "adn_swin", "logit_kd", "feature_kd", "kd_rows", "pooled"]
