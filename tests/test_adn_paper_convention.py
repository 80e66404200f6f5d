"""Why ADN-MobileNetV2's measured cost is 4% below the paper's: the paper's counter also counts
normalisation layers (two ops per element: scale and shift, as ptflops does), which the project's
convention (the early-exit references') leaves out. Counted that way, our models give the paper's
numbers within 2% (super-net 0.32, base-net 0.22 GMACs at 224x224) while ResNet-50 stays within
2% of its 4.11 / 2.58 too: the architecture is right, only the convention differs."""

import pytest
import torch
from torch import nn

from dynlab import config, data
from dynlab.registry import get_method


def _norm_ops(model: nn.Module, x: torch.Tensor, skip: str) -> int:
    """Two ops per output element of every normalisation layer that runs (per sample)."""
    total = [0]
    hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + 2 * o[0].numel())) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(x, skip=skip)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


@pytest.mark.parametrize("preset, paper", [("adn-mobilenetv2", (0.32e9, 0.22e9)), ("adn-resnet50", (4.11e9, 2.58e9))])
def test_paper_costs_within_two_percent_when_normalisation_is_counted(preset, paper):
    cfg = config.resolve({"method": "adn", "preset": preset})
    model = get_method("adn").cls(cfg).build_model(data.static_info("imagenet")).eval()  # 1000 classes, 224x224
    table = model.cost_table
    x = torch.randn(1, 3, 224, 224)
    for name, expected in zip((table.names[-1], table.names[0]), paper):  # super-net (all F), base-net (all T)
        macs = table.macs[table.names.index(name)] + _norm_ops(model, x, name)
        assert abs(macs - expected) / expected < 0.02, (preset, name, macs / 1e9)
