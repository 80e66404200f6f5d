"""The one seam between the platform and the methods: a Protocol and three small registries.

``methods`` fills these registries when it is imported; the platform looks names up here and never
imports a method module itself.

A *backbone* is an ``nn.Module`` factory with a typed config dataclass (MSDNet, RANet, ...).
A *preset* is a named standard backbone config (REFERENCE.md "Presets").
A *method* is a training/prediction recipe with a typed config dataclass (joint, BoostNet, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class BackboneEntry:
    name: str
    build: Callable[..., nn.Module]  # build(config, info, **method_options) -> nn.Module
    config_cls: type
    description: str = ""


@dataclass
class Preset:
    name: str
    backbone: str
    values: dict[str, Any]
    dataset: str  # the dataset whose classes and input size the preset is defined for
    description: str = ""
    info: DatasetInfo | None = field(default=None, compare=False)


METHODS: dict[str, MethodEntry] = {}
BACKBONES: dict[str, BackboneEntry] = {}
PRESETS: dict[str, Preset] = {}


def register_method(name: str, config_cls: type, backbones: tuple[str, ...] = (), description: str = ""):
    """Class decorator: ``@register_method("boostnet", BoostNetConfig)``."""

    def deco(cls):
        METHODS[name] = MethodEntry(name, cls, config_cls, tuple(backbones), description or (cls.__doc__ or "").strip().split("\n")[0])
        return cls

    return deco


def register_backbone(name: str, config_cls: type, description: str = ""):
    """Function decorator for a backbone builder ``build(config, info, **options) -> nn.Module``."""

    def deco(fn):
        BACKBONES[name] = BackboneEntry(name, fn, config_cls, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def register_preset(name: str, backbone: str, dataset: str, description: str = "", **values):
    PRESETS[name] = Preset(name, backbone, values, dataset, description)


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
