"""Datasets, held-out split and transforms. (Being written; static_info is the stable part.)"""

from __future__ import annotations

from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo

# Classes and input size of the datasets the presets are defined for (no data needed to know them).
STATIC_INFO = {
    "digits": DatasetInfo("digits", 10, 32),
    "cifar10": DatasetInfo("cifar10", 10, 32),
    "cifar100": DatasetInfo("cifar100", 100, 32, num_coarse_classes=20),
    "imagenet": DatasetInfo("imagenet", 1000, 224),
}


def static_info(name: str) -> DatasetInfo:
    if name not in STATIC_INFO:
        raise ConfigError("dataset", name, "one of " + ", ".join(STATIC_INFO))
    return STATIC_INFO[name]
