"""DMNN presets: measured costs pinned to exact integers (from ``python -m pipelines.costs
preset=<name> --json`` when they were written), and the undivided network checked against
torchvision's ResNet-50. (tests/test_preset_costs.py pins the early-exit presets.)"""

from __future__ import annotations

import pytest
import torch
import torchvision

import methods  # noqa: F401  (registers backbones and presets)
from dynlab import registry
from dynlab.config import build_section
from dynlab.data import static_info
from tests.presets import preset_model

# preset -> (rows, fixed MACs, all sub-blocks' MACs, all controllers' MACs, dense total MACs, dense params)
# (controllers: their FCs before a BatchNorm have no bias, and BatchNorm is not counted)
PINNED = {
    "dmnn-resnet-small": (11, 754314, 9703936, 45612, 10458250, 61932),
    "dmnn-resnet50": (82, 32006244, 306346432, 899168, 338352676, 23795188),
    "dmnn-resnet50-n2": (50, 32006244, 300419552, 897056, 332425796, 23765722),
    "dmnn-resnet50-cifar32": (82, 121315428, 1225385728, 2275424, 1346701156, 23795188),
    "dmnn-resnet50-imagenet": (82, 487953384, 3752743792, 6060128, 4240697176, 25646968),
    "dmnn-resnet101-imagenet": (167, 491365352, 7481171824, 10052136, 7972537176, 44821880),
    "dmnn-mobilenetv2-imagenet": (32, 149359784, 157584000, 252872, 306943784, 3506456),
    "dmnn-mobilenetv2-cifar": (32, 38158436, 51456000, 107144, 89614436, 2353556),
}


def test_every_dmnn_preset_is_pinned():
    assert {n for n, p in registry.PRESETS.items() if p.backbone.startswith("dmnn_")} == set(PINNED)


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


def test_the_cifar_preset_costs_the_papers_033_gmacs():
    """Table 3: ResNet-50 on CIFAR-100 at 0.33 GFLOPs. An ImageNet-style bottleneck ResNet-50 whose
    first stage runs at 16x16 costs that without its stem convolution (as the paper's ImageNet
    3.96 / 7.67 G are torchvision's ResNet-50/101 without it); dmnn-resnet50 is that network."""
    p = registry.get_preset("dmnn-resnet50")
    entry = registry.get_backbone("dmnn_resnet")
    dense = entry.build(build_section("dmnn_resnet", entry.config_cls, {**p.values, "subblocks": 1, "gated": False}), static_info("cifar100"))
    total = dense.cost_table.macs[-1]
    stem_conv = 3 * 64 * 3 * 3 * 32 * 32  # 3x3 conv, 3 -> 64 channels, stride 1 on 32x32
    assert 0.31e9 < total < 0.34e9
    assert (total - stem_conv) / 1e9 == pytest.approx(0.33, abs=0.01)
    assert (total - stem_conv) == pytest.approx(325.15e6, rel=0.005)  # README "DMNN's CIFAR cost"
    gated = preset_model("dmnn-resnet50")
    macs = dict(zip(gated.cost_table.names, gated.cost_table.macs))
    assert sum(v for k, v in macs.items() if k.endswith(".controller")) / macs["dense total"] < 0.005


def _mobilenet(**values):
    entry = registry.get_backbone("dmnn_mobilenetv2")
    return entry.build(build_section("dmnn_mobilenetv2", entry.config_cls, values), static_info("imagenet"))


def test_mobilenetv2_split_keeps_torchvision_convolutions_and_one_subblock_is_torchvision():
    dense = _mobilenet(subblocks=1, gated=False)
    reference = torchvision.models.mobilenet_v2()  # definition only, no weights
    assert sum(q.numel() for q in dense.parameters()) == sum(q.numel() for q in reference.parameters()) == 3504872
    assert dense.num_blocks == 10  # the residual blocks of MobileNetV2: 1 + 2 + 3 + 2 + 2
    ref_convs = sum(m.weight.numel() for m in reference.modules() if isinstance(m, torch.nn.Conv2d))
    for n in (2, 3, 4):
        split = _mobilenet(subblocks=n, gated=False)
        convs = sum(m.weight.numel() for m in split.modules() if isinstance(m, torch.nn.Conv2d))
        assert convs == ref_convs  # 1x1 and depth-wise convolutions divide exactly
        assert split.cost_table.macs[-1] == dense.cost_table.macs[-1]  # the same dense MACs
    gated = _mobilenet(subblocks=2)
    assert gated.stage_of_block == [0, 1, 1, 2, 2, 2, 2, 2, 3, 3]  # 56, 28, 14 (x5), 7 pixels
    assert sum(n.endswith(".controller") for n in gated.cost_table.names) == 10
