"""Shared early-exit backbones; importing this package registers them (and their presets)."""

from methods.backbones import msdnet  # noqa: F401
from methods.backbones import ranet  # noqa: F401
