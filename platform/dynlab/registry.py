"""The one seam between the platform and the methods: a Protocol and three small registries.

``methods`` fills these registries when it is imported; the platform looks names up here and never
imports a method module itself.

A *backbone* is an ``nn.Module`` factory with a typed config dataclass (MSDNet, RANet, ...).
A *preset* is a named standard backbone config (REFERENCE.md "Presets").
A *method* is a training/prediction recipe with a typed config dataclass (joint, BoostNet, ...).

Some method options act on the backbone (``gradient_rescale`` rescales the gradients between an
MSDNet's blocks). Those are listed in :data:`METHOD_OPTIONS` with their "off" value; a backbone
declares the ones it implements (``register_backbone(..., method_options=(...))``) and receives only
those. :func:`unsupported_options` tells the config layer which fields of a method config mean
nothing on a backbone, so that they cannot change what is trained nor its hash.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

from dynlab.errors import ConfigError
from dynlab.predictions import Predictions

Backward = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder needs to know about the data."""

    name: str
    num_classes: int
    image_size: int  # square input side, pixels
    channels: int = 3
    num_coarse_classes: int | None = None  # CIFAR-100 superclasses, kept for later methods


@runtime_checkable
class Method(Protocol):
    """A training recipe. Instances are built as ``cls(cfg)`` from the resolved
    :class:`dynlab.config.Config`: ``cfg.method_cfg`` is the method's own dataclass, ``cfg.backbone``
    and ``cfg.backbone_cfg`` name and configure the backbone.

    ``train_step`` computes its losses and calls ``backward(loss)`` once or more; the platform owns
    optimisers, AMP, DDP, clipping and logging. ``predict`` returns one of the three prediction
    shapes of :mod:`dynlab.predictions`, costs included.
    """

    def build_model(self, info: DatasetInfo) -> nn.Module: ...

    def train_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], backward: Backward) -> dict[str, Any]: ...

    def predict(self, model: nn.Module, images: torch.Tensor) -> Predictions: ...


@dataclass
class MethodEntry:
    name: str
    cls: type  # implements Method; constructed as cls(cfg)
    config_cls: type
    backbones: tuple[str, ...] = ()  # backbones it supports; empty = any
    description: str = ""


# Method options that act on the backbone -> their "off" value (what a backbone without them trains).
METHOD_OPTIONS: dict[str, Any] = {"gradient_rescale": False, "gradient_equilibrium": False}


@dataclass
class BackboneEntry:
    name: str
    build: Callable[..., nn.Module]  # build(config, info, **supported method options) -> nn.Module
    config_cls: type
    description: str = ""
    method_options: tuple[str, ...] = ()  # the names of METHOD_OPTIONS that build() implements


@dataclass
class Preset:
    name: str
    backbone: str
    values: dict[str, Any]
    dataset: str  # the dataset whose classes and input size the preset is defined for
    description: str = ""
    # the training keys its authors used with this network (dotted: ``optim.lr``, ``run.epochs``,
    # ...): not applied by ``preset=`` (a preset is a network); a reproduction's paper scale applies them
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)


METHODS: dict[str, MethodEntry] = {}
BACKBONES: dict[str, BackboneEntry] = {}
PRESETS: dict[str, Preset] = {}


def register_method(name: str, config_cls: type, backbones: tuple[str, ...] = (), description: str = ""):
    """Class decorator: ``@register_method("boostnet", BoostNetConfig)``."""

    def deco(cls):
        METHODS[name] = MethodEntry(name, cls, config_cls, tuple(backbones), description or (cls.__doc__ or "").strip().split("\n")[0])
        return cls

    return deco


def register_backbone(name: str, config_cls: type, description: str = "", method_options: tuple[str, ...] = ()):
    """Function decorator for a backbone builder ``build(config, info, **options) -> nn.Module``;
    ``method_options`` names the backbone-dependent method options (:data:`METHOD_OPTIONS`) that
    ``build`` takes as keyword arguments."""
    unknown = [o for o in method_options if o not in METHOD_OPTIONS]
    if unknown:
        raise ValueError(f"register_backbone({name!r}): method_options {unknown} are not allowed: expected names from {sorted(METHOD_OPTIONS)}")

    def deco(fn):
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        BACKBONES[name] = BackboneEntry(name, fn, config_cls, doc, tuple(method_options))
        return fn

    return deco


def register_preset(name: str, backbone: str, dataset: str, description: str = "", recipe: dict[str, Any] | None = None, **values):
    PRESETS[name] = Preset(name, backbone, values, dataset, description, dict(recipe or {}))


def _lookup(table: dict, key: str, value: str):
    if value not in table:
        raise ConfigError(key, value, "one of " + ", ".join(sorted(table)) if table else "a registered name (none registered: import methods)")
    return table[value]


def get_method(name: str) -> MethodEntry:
    return _lookup(METHODS, "method", name)


def get_backbone(name: str) -> BackboneEntry:
    return _lookup(BACKBONES, "backbone", name)


def get_preset(name: str) -> Preset:
    return _lookup(PRESETS, "backbone.preset", name)


def _option_fields(method_cfg) -> list[str]:
    """The fields of a method config that are backbone-dependent options."""
    if not dataclasses.is_dataclass(method_cfg):
        return []
    return [f.name for f in dataclasses.fields(method_cfg) if f.name in METHOD_OPTIONS]


def unsupported_options(backbone: str, method_cfg) -> dict[str, str]:
    """Field name -> reason, for each backbone-dependent option of ``method_cfg`` that
    ``backbone`` does not implement (whatever its value; the config layer decides what to do)."""
    entry = get_backbone(backbone)
    out = {}
    for name in _option_fields(method_cfg):
        if name not in entry.method_options:
            have = sorted(b.name for b in BACKBONES.values() if name in b.method_options)
            out[name] = f"backbone '{backbone}' does not implement it (only {', '.join(have) or 'none'} does); on {backbone} it is always {METHOD_OPTIONS[name]!r}"
    return out


def backbone_options(backbone: str, method_cfg) -> dict[str, Any]:
    """The keyword arguments for ``get_backbone(backbone).build``: the backbone-dependent options
    of ``method_cfg`` that the backbone implements (the others are left out: the config layer
    has set them to their off value, see :func:`unsupported_options`)."""
    entry = get_backbone(backbone)
    return {name: getattr(method_cfg, name) for name in _option_fields(method_cfg) if name in entry.method_options}
