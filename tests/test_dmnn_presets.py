"""DMNN presets: measured costs pinned to exact integers (from ``python -m pipelines.costs
preset=<name> --json`` when they were written), and the undivided network checked against
torchvision's ResNet-50. (tests/test_preset_costs.py pins the early-exit presets.)"""

from __future__ import annotations

import pytest
import torchvision

import methods  # noqa: F401  (registers backbones and presets)
from dynlab import registry
from dynlab.config import build_section
from dynlab.data import static_info
from tests.presets import preset_model

# preset -> (rows, fixed MACs, all sub-blocks' MACs, all controllers' MACs, dense total MACs, dense params)
PINNED = {
    "dmnn-resnet-small": (11, 754314, 9703936, 45772, 10458250, 61932),
    "dmnn-resnet50": (82, 121315428, 1225385728, 2276416, 1346701156, 23795188),
    "dmnn-resnet50-n2": (50, 121315428, 1201678208, 2274304, 1322993636, 23765722),
    "dmnn-resnet50-imagenet": (82, 487953384, 3752743792, 6061120, 4240697176, 25646968),
    "dmnn-resnet101-imagenet": (167, 491365352, 7481171824, 10054216, 7972537176, 44821880),
}


def test_every_dmnn_preset_is_pinned():
    assert {n for n, p in registry.PRESETS.items() if p.backbone == "dmnn_resnet"} == set(PINNED)


@pytest.mark.parametrize("name", list(PINNED))
def test_dmnn_preset_costs_are_pinned(name):
    table = preset_model(name).cost_table
    macs, params = dict(zip(table.names, table.macs)), dict(zip(table.names, table.params))
    got = (
        len(table),
        int(macs["fixed"]),
        int(sum(v for k, v in macs.items() if ".sub" in k)),
        int(sum(v for k, v in macs.items() if k.endswith(".controller"))),
        int(macs["dense total"]),
        int(params["dense total"]),
    )
    assert got == PINNED[name]


def test_one_subblock_without_controllers_is_torchvision_resnet50():
    p = registry.get_preset("dmnn-resnet50-imagenet")
    entry = registry.get_backbone("dmnn_resnet")
    cfg = build_section("dmnn_resnet", entry.config_cls, {**p.values, "subblocks": 1, "gated": False})
    model = entry.build(cfg, static_info("imagenet"))
    reference = torchvision.models.resnet50()  # definition only, no weights
    assert sum(q.numel() for q in model.parameters()) == sum(q.numel() for q in reference.parameters()) == 25557032
    assert [n for n in model.cost_table.names if n != "fixed" and n != "dense total"] == [f"block{b}.sub0" for b in range(16)]
