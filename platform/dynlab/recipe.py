"""The training-recipe pieces that transformer recipes (DeiT's) need, for every method, each off by
default: AdamW without weight decay on norms, biases, embeddings and tokens (``optim.name``),
MixUp / CutMix and label smoothing as soft targets (``data.mixup``, ``data.cutmix``,
``optim.label_smoothing``) and an EMA of the weights (``run.ema_decay``). The cosine floor is in
``training.lr_factor``, the image augmentations in ``dynlab.data``, clipping is ``run.grad_clip``.
Built from torch / torchvision, not written here.

Soft targets: the loop turns a batch's class indices into [B, classes] probabilities here, in one
place, and the method's ``F.cross_entropy(logits, targets)`` takes them as they are (it accepts
probabilities); ``CE(z, (1 - e) onehot + e / C)`` is what ``label_smoothing=e`` computes. A method
that takes them says so with ``soft_targets = True`` and reads labels (for accuracies) through
:func:`hard_labels`; the config refuses these keys for any other method.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Parameters that DeiT / timm exempt from weight decay by name (their models' no_weight_decay()):
# position embeddings and class tokens (torchvision's ViT: class_token, encoder.pos_embedding),
# Swin's relative position bias tables.
NO_DECAY_NAMES = ("class_token", "cls_token", "dist_token", "pos_embed", "pos_embedding", "absolute_pos_embed", "relative_position_bias_table")
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices of a batch's targets: as given, or the most probable class of soft targets."""
    return targets.argmax(-1) if targets.is_floating_point() else targets


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW must not decay: those of norm layers and embeddings, biases,
    position embeddings and class tokens (and whatever ``model.no_weight_decay()`` names)."""
    names = set(getattr(model, "no_weight_decay", lambda: ())())
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, (*NORMS, nn.Embedding)) or p_name.endswith("bias") or any(k in p_name for k in NO_DECAY_NAMES):
                names.add(full)
    return names


def split_weight_decay(model: nn.Module, groups: list[dict], weight_decay: float) -> list[dict]:
    """Each parameter group split in two: its weights with ``weight_decay`` (or the group's own),
    and its no-decay parameters (:func:`no_weight_decay`) with 0. Empty halves are dropped."""
    exempt = {id(p) for n, p in model.named_parameters() if n in no_weight_decay(model)}
    out = []
    for g in groups:
        rest = {k: v for k, v in g.items() if k != "params"}
        decay = [p for p in g["params"] if id(p) not in exempt]
        flat = [p for p in g["params"] if id(p) in exempt]
        if decay:
            out.append({**rest, "params": decay, "weight_decay": rest.get("weight_decay", weight_decay)})
        if flat:
            out.append({**rest, "params": flat, "weight_decay": 0.0})
    return out


def batch_targets(cfg, num_classes: int) -> Callable | None:
    """``(images, labels) -> (images, targets)`` for training batches: MixUp and/or CutMix
    (torchvision.transforms.v2; with both, one of them per batch, as DeiT does), then label
    smoothing; targets are [B, classes] probabilities. None when every such key is off."""
    from torchvision.transforms import v2

    d, eps = cfg.data, cfg.optim.label_smoothing
    mixers = ([v2.MixUp(alpha=d.mixup, num_classes=num_classes)] if d.mixup > 0 else []) + ([v2.CutMix(alpha=d.cutmix, num_classes=num_classes)] if d.cutmix > 0 else [])
    if not mixers and eps == 0:
        return None
    mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers) if mixers else None

    def apply(images: torch.Tensor, labels: torch.Tensor):
        if mix is not None:
            images, targets = mix(images, labels)
        else:
            targets = F.one_hot(labels, num_classes).float()
        return images, targets * (1 - eps) + eps / num_classes if eps else targets

    return apply


def make_ema(model: nn.Module, decay: float):
    """An AveragedModel holding the EMA of ``model``'s parameters and buffers (BatchNorm statistics
    too, as timm's ModelEmaV2): the first update copies the weights, each later one moves the
    average ``1 - decay`` of the way to them."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
