"""RANet backbone: presets, stream layout, channel rules, costs, training and use under BoostNet."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods  # noqa: F401  (registers backbones and presets)
from dynlab import config, registry
from dynlab.config import build_section
from dynlab.costs import measure_total
from dynlab.data import static_info
from dynlab.errors import ConfigError
from dynlab.predictions import ExitPredictions
from dynlab.registry import DatasetInfo
from tests.presets import preset_model
from methods.backbones.ranet import (
    FusionBlock,
    FusionLayer,
    PlainBlock,
    RANet,
    RANetConfig,
    block_layers,
    build_ranet,
    down_blocks,
    plan_streams,
    transition_blocks,
)

ROOT = Path(__file__).resolve().parents[1]
RANET_PRESETS = sorted(n for n, p in registry.PRESETS.items() if p.backbone == "ranet")
DIGITS = static_info("digits")


def test_presets_registered():
    expected = {"ranet-cifar100-anytime", "ranet-imagenet-c32", "ranet-imagenet-c64"}
    expected |= {f"ranet-cifar100-budgeted{k}" for k in (1, 2, 3)}
    assert expected <= set(RANET_PRESETS)
    for name in expected:
        p = registry.get_preset(name)
        assert p.dataset == ("imagenet" if "imagenet" in name else "cifar100")
        assert p.description
        assert p.values["compress_factor"] == 0.25 and p.values["reduction"] == 0.5 and p.values["block_step"] == 2
    assert registry.get_backbone("ranet").build is build_ranet


@pytest.mark.parametrize("name", RANET_PRESETS)
def test_preset_builds_forwards_and_costs_increase(name):
    p = registry.get_preset(name)
    info = static_info(p.dataset)
    model = preset_model(name)
    cfg = model.cfg
    assert model.num_exits == cfg.n_blocks + cfg.block_step * (len(cfg.scale_list) - 1) == len(model.heads)
    assert model.variant == ("imagenet" if p.dataset == "imagenet" else "cifar")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, info.image_size, info.image_size))
    assert len(out) == model.num_exits
    assert all(o.shape == (2, info.num_classes) and torch.isfinite(o).all() for o in out)

    t = model.cost_table
    assert len(t) == model.num_exits
    assert all(b > a for a, b in zip(t.macs, t.macs[1:])), t.macs
    assert all(b > a for a, b in zip(t.params, t.params[1:])), t.params
    assert t.params[-1] == sum(q.numel() for q in model.parameters())  # every module runs once
    # orders of magnitude of the published RANet curves: CIFAR ~1e7..1e8 MACs, ImageNet ~1e8..1e9..
    if p.dataset == "cifar100":
        assert 3e6 < t.macs[0] < 3e7 and 3e7 < t.macs[-1] < 5e8
        assert 1e5 < t.params[0] and t.params[-1] < 2e7
    else:
        assert 1e8 < t.macs[0] < 1e9 and 1e9 < t.macs[-1] < 1e10


def test_anytime_preset_layout():
    model = preset_model("ranet-cifar100-anytime")
    assert model.num_exits == 8
    # exits: 2 on the lowest-resolution stream, then block_step = 2 on each later one
    assert model.exit_blocks == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 6), (3, 7)]
    assert model.stream_sizes == [8, 16, 32, 32]  # levels 1-2-3-3: repeated level -> stride-1 base conv
    assert model.first.strides == [1, 1, 2, 2]  # finest first
    plan = model.plan
    assert [len(s) for s in plan] == [2, 4, 6, 8]
    assert [sum(b.fusion for b in s) for s in plan] == [0, 2, 4, 6]
    # downsampling fusion blocks (1-based) where the level-1 earlier streams end; transitions at floor(j*n/level)
    assert [{b.index + 1 for b in s if b.down} for s in plan] == [set(), {2}, {2, 4}, {4, 6}]
    assert [{b.index + 1 for b in s if b.transition} for s in plan] == [set(), {2}, {2, 4}, {2, 5}]
    assert all(b.layers == 4 for s in plan for b in s)

    # every exit reads the lowest resolution; the streams really run lowest-resolution first
    seen: list[tuple[int, ...]] = []
    hooks = [h.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[1:]))) for h in model.heads]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert [s[1:] for s in seen] == [(8, 8)] * 8
    assert [s[0] for s in seen] == [h.features[0][0].in_channels for h in model.heads]


def test_layout_rules():
    assert [block_layers(k, "even", 4) for k in range(4)] == [4, 4, 4, 4]
    assert [block_layers(k, "lin_grow", 2) for k in range(4)] == [2, 4, 6, 8]
    assert transition_blocks(8, 3) == {2, 5} and transition_blocks(6, 3) == {2, 4} and transition_blocks(4, 1) == set()
    cfg = RANetConfig(n_blocks=2, block_step=2, scale_list=[1, 2, 3, 4], gr_factor=[4, 2, 2, 1], bn_factor=[4, 2, 2, 1])
    assert [down_blocks(cfg, i) for i in range(4)] == [set(), {2}, {2, 4}, {2, 4, 6}]
    # a repeated level downsamples as often as the level says, at the latest stream ends
    cfg = RANetConfig(n_blocks=2, block_step=2, scale_list=[1, 2, 2, 3], gr_factor=[4, 2, 2, 1], bn_factor=[4, 2, 2, 1])
    assert [down_blocks(cfg, i) for i in range(4)] == [set(), {2}, {4}, {4, 6}]
    # a level-1 stream after stream 0 never downsamples (the reference's [-0:] slice would pick every end)
    cfg = RANetConfig(scale_list=[1, 1, 2], gr_factor=[2, 2, 1], bn_factor=[2, 2, 1])
    assert down_blocks(cfg, 1) == set()
    model = build_ranet(cfg, DIGITS)
    assert model.stream_sizes == [16, 16, 32]
    assert [o.shape for o in model(torch.randn(2, 3, 32, 32))] == [(2, 10)] * model.num_exits
    # budgeted presets: lin_grow, block k has 2*(k+1) layers in every stream
    b1 = preset_model("ranet-cifar100-budgeted1")
    assert [[b.layers for b in s] for s in b1.plan] == [[2, 4], [2, 4, 6, 8], [2, 4, 6, 8, 10, 12]]
    assert b1.num_exits == 6


def test_defaults_are_tiny_and_channels():
    cfg = build_section("ranet", RANetConfig, {})
    model = build_ranet(cfg, DIGITS)
    assert model.num_exits == 4 and model.variant == "cifar"
    assert model.cost_table.macs[-1] < 2e7
    assert sum(q.numel() for q in model.parameters()) < 1.5e6
    assert [o.shape for o in model(torch.randn(3, 3, 32, 32))] == [(3, 10)] * 4

    # n_channels 8, growth 4, gr [4,2,1]: streams start with 32/16/8 channels and grow by 16/8/4
    p = plan_streams(cfg)
    assert [s[0].c_in for s in p] == [32, 16, 8] and [s[0].growth for s in p] == [16, 8, 4]
    assert [b.c_out for b in p[0]] == [48, 64]  # stream 0: no transitions (level 1)
    s1 = p[1][0]  # fusion block: 16 + 8 = 24 dense, + floor(24/4) = 6 fused, transition floor(30/2)
    assert (s1.fusion, s1.c_dense, s1.c_cat, s1.c_out, s1.c_low_in, s1.c_low_dense) == (True, 24, 30, 15, 32, 48)

    block = model.streams[1][1]
    assert isinstance(block, FusionBlock) and block.plan.down
    layer = block.layers[0]
    assert isinstance(layer, FusionLayer) and layer.down
    # growth 8: floor(8*0.25) = 2 channels from the lower stream (bottleneck of the lower stream, 4)
    assert layer.up.c_out == 2 and layer.up.c_in == 48 and layer.up.c_mid == min(48, 4 * 2)
    assert layer.own.c_out == 6 and layer.own.c_mid == min(15, 2 * 6)
    assert layer.own[-1][0].stride == (2, 2) and layer.up[-1][0].stride == (1, 1)
    assert block.fuse_last[0].in_channels == 64 and block.fuse_last[0].out_channels == 23 // 4
    assert isinstance(model.streams[1][2], PlainBlock) and model.streams[1][2].plan.exit

    shapes: list[tuple] = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o[0].shape[1:]))) for s in model.streams for b in s]
    try:
        model(torch.zeros(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert shapes == [(48, 8, 8), (64, 8, 8), (15, 16, 16), (28, 8, 8), (36, 8, 8), (7, 32, 32), (6, 16, 16), (12, 8, 8), (16, 8, 8)]


def test_exit_cost_is_cumulative_in_execution_order():
    """Exit 0 pays for the whole first layer (the finest stem included), its block and its head;
    the last exit pays for everything (all streams and all earlier heads)."""
    model = build_ranet(RANetConfig(), DIGITS)
    t = model.cost_table
    first, _ = measure_total(model.first, (1, 3, 32, 32))
    block, _ = measure_total(model.streams[0][0], (1, 32, 8, 8))
    head, _ = measure_total(model.heads[0], (1, 48, 8, 8))
    assert t.macs[0] == first + block + head
    stem, _ = measure_total(model.first.layers[0], (1, 3, 32, 32))
    assert stem == 3 * 8 * 9 * 32 * 32 + 8 * 32 * 32  # 3x3 conv + ReLU at full resolution
    assert measure_total(model, (1, 3, 32, 32)) == (t.macs[-1], t.params[-1])
    head_macs = [measure_total(h, (1, h.features[0][0].in_channels, 8, 8))[0] for h in model.heads]
    assert t.macs[-1] > sum(head_macs) + first


def test_bottleneck_off_and_imagenet_variant():
    model = build_ranet(build_section("ranet", RANetConfig, {"bottleneck": False}), DIGITS)
    unit = next(m for m in model.modules() if isinstance(m, FusionLayer)).own
    assert len(unit) == 1  # only the 3x3 conv-BN-ReLU

    info = DatasetInfo("x", 7, 64)
    model = build_ranet(RANetConfig(), info)
    assert model.variant == "imagenet"  # auto: image_size >= 64
    stem = model.first.layers[0]
    assert stem[0].kernel_size == (7, 7) and stem[0].bias is not None and isinstance(stem[3], nn.MaxPool2d)
    assert model.stream_sizes == [4, 8, 16]
    head = model.heads[0]
    assert head.width == head.features[0][0].in_channels  # keeps the channel count
    assert [o.shape for o in model(torch.zeros(2, 3, 64, 64))] == [(2, 7)] * 4
    assert RANet(RANetConfig(variant="cifar"), DatasetInfo("y", 3, 64)).heads[0].width == 128


def test_init():
    model = preset_model("ranet-cifar100-anytime")
    big = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 20000]
    assert big
    for conv in big[:5]:
        expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        assert abs(conv.weight.std().item() / expected - 1) < 0.1
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


def test_tiny_default_trains():
    torch.manual_seed(0)
    model = build_ranet(RANetConfig(), DIGITS)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(6):
        loss = sum(F.cross_entropy(o, y) for o in model(x))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    logits, feats = model.forward_with_features(x)
    assert len(logits) == len(feats) == 4 and feats[0].shape == (16, 128)


def test_config_validation():
    cases = [
        ({"gr_factor": [4, 2]}, "ranet.gr_factor"),
        ({"bn_factor": [4, 2, 1, 1]}, "ranet.bn_factor"),
        ({"gr_factor": [4, 0, 1]}, "ranet.gr_factor"),
        ({"scale_list": [2, 3, 4]}, "ranet.scale_list"),
        ({"scale_list": [1, 3, 4]}, "ranet.scale_list"),
        ({"scale_list": [1, 2, 1]}, "ranet.scale_list"),
        ({"scale_list": [], "gr_factor": [], "bn_factor": []}, "ranet.scale_list"),
        ({"compress_factor": 0.0}, "ranet.compress_factor"),
        ({"compress_factor": 0.1}, "ranet.compress_factor"),  # floor(4*1*0.1) = 0 fused channels
        ({"block_type": "zigzag"}, "ranet.block_type"),
        ({"n_blocks": 0}, "ranet.n_blocks"),
        ({"block_step": 0}, "ranet.block_step"),
        ({"reduction": 0.01}, "ranet.reduction"),
        ({"depth": 3}, "ranet.depth"),
    ]
    for values, key in cases:
        with pytest.raises(ConfigError) as e:
            build_section("ranet", RANetConfig, values)
        assert e.value.key == key, (values, e.value)
    with pytest.raises(ConfigError) as e:
        config.cli_config(["backbone=ranet", "ranet.bn_factor=4,2"])
    assert e.value.key == "ranet.bn_factor" and "scale_list" in str(e.value)
    cfg = build_section("ranet", RANetConfig, {"scale_list": "1,2,2,3", "gr_factor": "[4,2,2,1]", "bn_factor": [4, 2, 2, 1]})
    assert cfg.n_streams == 4 and cfg.gr_factor == [4, 2, 2, 1] and cfg.num_exits == 2 + 1 * 3
    assert build_section("ranet", RANetConfig, {"reduction": 0.0}).reduction == 0.0  # no transitions
    assert not any(b.transition for s in plan_streams(RANetConfig(reduction=0.0)) for b in s)


# ---- methods on RANet -----------------------------------------------------------------------------


def test_boostnet_on_ranet_end_to_end():
    torch.manual_seed(0)
    cfg = config.cli_config(["backbone=ranet", "boostnet.gradient_rescale=false"])
    assert cfg.method == "boostnet" and isinstance(cfg.backbone_cfg, RANetConfig)
    method = registry.get_method("boostnet").cls(cfg)
    model = method.build_model(DIGITS)
    assert model.num_exits == 4 and isinstance(model.backbone, RANet)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    metrics = method.train_step(model, (x, y), lambda loss: loss.backward())
    assert torch.isfinite(metrics["loss"]) and "acc_exit3" in metrics
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    preds = method.predict(model, x)
    assert isinstance(preds, ExitPredictions) and preds.logits.shape == (4, 4, 10)
    assert torch.all(preds.costs[1:] > preds.costs[:-1])

    # BoostNet's default config on RANet builds the same network (RANet takes no gradient_rescale)
    default = registry.get_method("boostnet").cls(config.cli_config(["backbone=ranet"])).build_model(DIGITS)
    default.load_state_dict(model.state_dict())
    default.eval()
    with torch.no_grad():
        for a, b in zip(default(x), model(x)):
            assert torch.equal(a, b)


def test_joint_on_ranet_preset():
    cfg = config.cli_config(["method=joint", "preset=ranet-cifar100-budgeted1", "dataset=cifar100"])
    assert cfg.backbone == "ranet" and cfg.backbone_cfg.block_type == "lin_grow"
    method = registry.get_method("joint").cls(cfg)
    model = method.build_model(static_info("cifar100"))
    assert model.num_exits == 6 and model.cost_table.macs == preset_model("ranet-cifar100-budgeted1").cost_table.macs


# ---- pipelines.costs -------------------------------------------------------------------------------


@pytest.mark.slow  # a pipeline process
def test_costs_pipeline_json():
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.costs", "preset=ranet-cifar100-anytime", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["preset"] == "ranet-cifar100-anytime" and rep["backbone"] == "ranet" and rep["dataset"] == "cifar100"
    assert rep["input"] == [1, 3, 32, 32]
    mm = [e["mmacs"] for e in rep["exits"]]
    assert len(mm) == 8 and all(b > a for a, b in zip(mm, mm[1:]))
    assert mm == pytest.approx(preset_model("ranet-cifar100-anytime").cost_table.mmacs)

    from pipelines import costs as cmd

    assert cmd.main(["backbone=ranet", "ranet.gr_factor=[4,2]"]) == 2


def test_ranet_implements_only_the_paper_gradient_equilibrium():
    """gradient_rescale (the reference's coarsest-scale form) is MSDNet-only: RANet declares only the
    paper's gradient_equilibrium, so the config layer can refuse or turn off the other option and the
    hash follows what is trained (tests/test_imta_ge.py checks the gradients)."""
    assert registry.get_backbone("ranet").method_options == ("gradient_equilibrium",)
    for method in ("boostnet", "joint"):
        cfg = config.cli_config([f"method={method}", "backbone=ranet"])
        reasons = registry.unsupported_options("ranet", cfg.method_cfg)
        assert set(reasons) == {"gradient_rescale"}
        assert "ranet" in reasons["gradient_rescale"] and "msdnet" in reasons["gradient_rescale"]
        assert registry.backbone_options("ranet", cfg.method_cfg) == {"gradient_equilibrium": False}
    with pytest.raises(TypeError):  # RANet's builder takes no gradient_rescale at all
        build_ranet(RANetConfig(), DIGITS, gradient_rescale=True)
