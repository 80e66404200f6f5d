"""Building preset backbones in tests: CIFAR presets are built once per session (ImageNet ones are
large, so they are built on demand and not kept)."""

from dynlab import registry
from dynlab.config import build_section
from dynlab.data import static_info

_BUILT: dict = {}


def preset_model(name: str):
    if name in _BUILT:
        return _BUILT[name]
    p = registry.get_preset(name)
    entry = registry.get_backbone(p.backbone)
    model = entry.build(build_section(p.backbone, entry.config_cls, p.values), static_info(p.dataset))
    if p.dataset != "imagenet":
        _BUILT[name] = model
    return model
