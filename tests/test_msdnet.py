"""MSDNet backbone: presets, layout, pruning, channel rules, costs and gradient rescaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import methods  # noqa: F401  (registers backbones and presets)
from dynlab import config, registry
from dynlab.config import build_section
from dynlab.costs import measure_total
from dynlab.data import static_info
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo
from tests.presets import preset_model
from methods.backbones.common import block_layer_counts, scale_grad
from methods.backbones.msdnet import DenseLayer, MSDNet, MSDNetConfig, Transition, build_msdnet, layer_scales

MSDNET_PRESETS = sorted(n for n, p in registry.PRESETS.items() if p.backbone == "msdnet")
DIGITS = static_info("digits")
_COSTS: dict = {}  # preset -> CostTable


def preset_costs(name: str):
    if name not in _COSTS:
        _COSTS[name] = preset_model(name).cost_table
    return _COSTS[name]



def test_presets_registered():
    expected = {"msdnet-cifar100-b7", "msdnet-cifar100-b10", "msdnet-cifar100-b6", "msdnet-cifar100-lingrow5"}
    expected |= {f"msdnet-imagenet-s{s}" for s in (4, 5, 6, 7)}
    assert expected <= set(MSDNET_PRESETS)
    for name in expected:
        p = registry.get_preset(name)
        assert p.dataset == ("imagenet" if "imagenet" in name else "cifar100")
        assert p.description
    assert registry.get_backbone("msdnet").build is build_msdnet


@pytest.mark.parametrize("name", MSDNET_PRESETS)
def test_preset_builds_forwards_and_costs_increase(name):
    p = registry.get_preset(name)
    info = static_info(p.dataset)
    model = preset_model(name)
    assert model.num_exits == p.values["n_blocks"] == len(model.heads)
    assert model.variant == ("imagenet" if p.dataset == "imagenet" else "cifar")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, info.image_size, info.image_size))
    assert len(out) == model.num_exits
    assert all(o.shape == (1, info.num_classes) and torch.isfinite(o).all() for o in out)

    t = model.cost_table
    _COSTS[name] = t
    assert len(t) == model.num_exits
    assert all(b > a for a, b in zip(t.macs, t.macs[1:])), t.macs
    assert all(b > a for a, b in zip(t.params, t.params[1:])), t.params
    assert t.params[-1] == sum(q.numel() for q in model.parameters())  # every module runs once
    # orders of magnitude of the published curves: CIFAR ~1e7..1e8 MACs, ImageNet ~1e8..1e9
    if p.dataset == "cifar100":
        assert 3e6 < t.macs[0] < 3e7 and 3e7 < t.macs[-1] < 5e8
        assert 1e6 < t.params[-1] < 1e7
    else:
        assert 1e8 < t.macs[0] < 1e9 and 1e9 < t.macs[-1] < 1e10
        assert 1e7 < t.params[-1] < 1e8


def test_preset_costs_match_whole_forward_and_anytime_sizes():
    b7, b10 = preset_model("msdnet-cifar100-b7"), preset_model("msdnet-cifar100-b10")
    assert measure_total(b7, (1, 3, 32, 32)) == (b7.cost_table.macs[-1], b7.cost_table.params[-1])
    # same first block in both (their pruning intervals differ, so later exits do not match)
    assert b10.cost_table.macs[0] == b7.cost_table.macs[0]
    assert 0.5e8 < b7.cost_table.macs[-1] < b10.cost_table.macs[-1] < 3e8
    s = [preset_costs(f"msdnet-imagenet-s{k}").macs[-1] for k in (4, 5, 6, 7)]
    assert s == sorted(s) and len(set(s)) == 4


def test_defaults_are_tiny():
    cfg = build_section("msdnet", MSDNetConfig, {})
    model = build_msdnet(cfg, DIGITS)
    assert model.num_exits == 4 and model.variant == "cifar"
    assert model.cost_table.macs[-1] < 2e7
    assert sum(q.numel() for q in model.parameters()) < 1.5e6
    out = model(torch.randn(3, 3, 32, 32))
    assert [o.shape for o in out] == [(3, 10)] * 4


def test_layer_counts_even_and_lin_grow():
    assert block_layer_counts(7, "even", 2, 4) == [4, 2, 2, 2, 2, 2, 2]
    assert block_layer_counts(5, "lin_grow", 1, 1) == [1, 2, 3, 4, 5]
    assert block_layer_counts(3, "lin_grow", 2, 3) == [3, 3, 5]
    for block_type, expected in (("even", [1, 2, 2, 2]), ("lin_grow", [1, 3, 5, 7])):
        cfg = build_section("msdnet", MSDNetConfig, {"block_type": block_type, "step": 2, "base": 1, "n_blocks": 4})
        model = MSDNet(cfg, DIGITS)
        per_block = [sum(isinstance(m, DenseLayer) for m in block.modules()) for block in model.blocks]
        assert per_block == expected == cfg.layers_per_block


def test_pruning_rule_known_cases():
    # L = 16 (b7), S = 3: interval 6; drops after layer 7 and layer 13
    got = layer_scales(16, 3)
    assert got == [(3, 3)] * 6 + [(3, 2)] + [(2, 2)] * 5 + [(2, 1)] + [(1, 1)] * 3
    # L = 4, S = 3: interval 2
    assert layer_scales(4, 3) == [(3, 3), (3, 3), (3, 2), (2, 2)]
    assert layer_scales(4, 3, "none") == [(3, 3)] * 4
    for L in range(1, 40):
        for S in range(1, 5):
            sc = layer_scales(L, S)
            assert all(1 <= o <= i <= S and i - o <= 1 for i, o in sc)
            assert all(sc[k][1] == sc[k + 1][0] for k in range(L - 1))  # outputs feed the next layer


def test_channels_transitions_and_two_halves_on_default_net():
    # defaults: n_channels 8, growth 4, gr = bn = 1-2-4, layers [2,1,1,1] -> L = 5, S = 3, interval 2
    cfg = MSDNetConfig()
    model = MSDNet(cfg, DIGITS)
    assert model.scales == [(3, 3), (3, 3), (3, 2), (2, 2), (2, 1)]
    # c: 8 -> 12 -> 16 | -> 20 -> 10 (transition) | -> 14 | -> 18 -> 9 (transition)
    assert model.block_channels == [16, 10, 14, 9]
    assert [h.features[0][0].in_channels for h in model.heads] == [64, 40, 56, 36]
    assert [sum(isinstance(m, Transition) for m in b.modules()) for b in model.blocks] == [0, 1, 0, 1]
    tr = next(m for m in model.blocks[1].modules() if isinstance(m, Transition))
    assert [(u[0].in_channels, u[0].out_channels) for u in tr.m] == [(40, 20), (80, 40)]  # scales 1, 2

    layers = [m for b in model.blocks for m in b.modules() if isinstance(m, DenseLayer)]
    first = layers[0].units
    # layer 1, scale 0: no finer input -> one unit, all growth*gr[0] = 4 channels; bottleneck min(8, 1*4)
    assert first[0].down is None and first[0].normal.c_out == 4 and first[0].normal.c_mid == 4
    # scale 1: halves of 8 from scale 0 (stride 2, bn 1) and scale 1 (stride 1, bn 2)
    assert first[1].down.c_out == first[1].normal.c_out == 4
    assert first[1].down.c_mid == min(8, 1 * 4) and first[1].normal.c_mid == min(16, 2 * 4)
    assert first[1].down[-1][0].stride == (2, 2) and first[1].normal[-1][0].stride == (1, 1)
    # layer 3 drops scale 0: its first output (scale 1) still takes a half from the dropped scale
    third = layers[2]
    assert (third.in_scales, third.out_scales) == (3, 2) and len(third.units) == 2
    assert third.units[0].down is not None and third.units[0].down.c_in == 16 * 1
    # layer 4 keeps scales 1, 2: scale 1 has no finer input any more
    assert layers[3].units[0].down is None and layers[3].units[0].normal.c_out == 8

    shapes: list[list[tuple]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append([tuple(t.shape[1:]) for t in o])) for b in model.blocks]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == [
        [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
        [(20, 16, 16), (40, 8, 8)],
        [(28, 16, 16), (56, 8, 8)],
        [(36, 8, 8)],
    ]


def test_no_bottleneck_and_no_pruning():
    cfg = build_section("msdnet", MSDNetConfig, {"bottleneck": False, "prune": "none", "n_blocks": 2})
    model = build_msdnet(cfg, DIGITS)
    assert not any(isinstance(m, Transition) for m in model.modules())
    unit = next(m for m in model.modules() if isinstance(m, DenseLayer)).units[0].normal
    assert len(unit) == 1  # only the 3x3 conv-BN-ReLU
    assert [h.features[0][0].in_channels for h in model.heads] == [(8 + 4 * 2) * 4, (8 + 4 * 3) * 4]  # layers [2, 1]


def test_imagenet_variant_structure():
    info = DatasetInfo("x", 7, 64)
    cfg = build_section("msdnet", MSDNetConfig, {"gr_factor": [1, 2, 4, 4], "bn_factor": [1, 2, 4, 4], "n_blocks": 2})
    model = build_msdnet(cfg, info)
    assert model.variant == "imagenet"  # auto: image_size >= 64
    stem = model.blocks[0][0].layers[0]
    assert stem[0].kernel_size == (7, 7) and stem[0].bias is not None and isinstance(stem[3], nn.MaxPool2d)
    head = model.heads[0]
    assert head.width == head.features[0][0].in_channels  # keeps the channel count
    assert [o.shape for o in model(torch.zeros(2, 3, 64, 64))] == [(2, 7)] * 2
    assert build_msdnet(MSDNetConfig(n_blocks=1), DatasetInfo("y", 3, 32)).variant == "cifar"
    assert MSDNet(MSDNetConfig(n_blocks=1, variant="cifar"), DatasetInfo("y", 3, 64)).heads[0].width == 128


def test_init():
    model = preset_model("msdnet-cifar100-b7")
    big = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 20000]
    for conv in big[:5]:
        expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        assert abs(conv.weight.std().item() / expected - 1) < 0.1
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.Conv2d) and m.kernel_size != (7, 7):
            assert m.bias is None


def test_config_validation():
    with pytest.raises(ConfigError) as e:
        build_section("msdnet", MSDNetConfig, {"bn_factor": [1, 2]})
    assert e.value.key == "msdnet.bn_factor"
    with pytest.raises(ConfigError) as e:
        build_section("msdnet", MSDNetConfig, {"growth_rate": 3, "gr_factor": [1, 1, 2], "bn_factor": [1, 1, 2]})
    assert e.value.key == "msdnet.growth_rate"
    with pytest.raises(ConfigError):
        build_section("msdnet", MSDNetConfig, {"block_type": "zigzag"})
    with pytest.raises(ConfigError):
        build_section("msdnet", MSDNetConfig, {"gr_factor": []})
    with pytest.raises(ConfigError):
        build_section("msdnet", MSDNetConfig, {"n_blocks": 0})
    cfg = build_section("msdnet", MSDNetConfig, {"gr_factor": "1,2,2,4", "bn_factor": [1, 1, 2, 2]})
    assert cfg.n_scales == 4 and cfg.gr_factor == [1, 2, 2, 4]


# ---- gradient rescaling -------------------------------------------------------------------------


def test_scale_grad_function():
    x = torch.randn(4, 3, requires_grad=True)
    w1, w2 = torch.randn(4, 3), torch.randn(4, 3)
    y1, y2 = scale_grad(x, 0.25), scale_grad(x, 0.75)
    assert torch.equal(y1, x) and torch.equal(y2, x)
    ((y1 * w1).sum() + (y2**2 * w2).sum()).backward()
    expected = 0.25 * w1 + 0.75 * 2 * x.detach() * w2
    assert torch.allclose(x.grad, expected)
    z = torch.ones(2, requires_grad=True)
    scale_grad(z, 0.0).sum().backward()
    assert torch.equal(z.grad, torch.zeros(2))


def _coarse_grads(model: MSDNet, x: torch.Tensor, exit_index: int) -> list[torch.Tensor]:
    """Gradient of exit ``exit_index``'s loss w.r.t. the coarsest features output by every block."""
    kept: list[torch.Tensor] = []

    def hook(_m, _i, out):
        out[-1].retain_grad()
        kept.append(out[-1])

    hs = [b.register_forward_hook(hook) for b in model.blocks]
    try:
        logits = model(x)
        torch.manual_seed(1)
        w = torch.randn_like(logits[exit_index])
        (logits[exit_index] * w).sum().backward()
    finally:
        for h in hs:
            h.remove()
    return [t.grad for t in kept[: exit_index + 1]]


def test_gradient_rescaling_in_model():
    torch.manual_seed(0)
    cfg = MSDNetConfig()  # 4 blocks
    plain = MSDNet(cfg, DIGITS).eval()
    scaled = MSDNet(cfg, DIGITS, gradient_rescale=True).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(plain(x), scaled(x)):
            assert torch.equal(a, b)  # identity forward
    N = plain.num_exits
    for e in range(N):  # exit e (0-based) = exit n = e+1
        g_plain = _coarse_grads(plain, x, e)
        g_scaled = _coarse_grads(scaled, x, e)
        plain.zero_grad(), scaled.zero_grad()
        n = e + 1
        # head n reads block n's coarse features through a 1/(N-n+1) factor
        assert torch.allclose(g_scaled[e], g_plain[e] / (N - n + 1), rtol=1e-4, atol=1e-7)
        if e >= 1:
            # exit n seen from block n-1: continuing copy (N-n+1)/(N-n+2), then head factor 1/(N-n+1)
            assert torch.allclose(g_scaled[e - 1], g_plain[e - 1] / (N - n + 2), rtol=1e-4, atol=1e-7)
        assert g_plain[e].abs().sum() > 0


def test_msdnet_implements_gradient_rescale_and_receives_it():
    assert registry.get_backbone("msdnet").method_options == ("gradient_rescale", "gradient_equilibrium")
    for value in (True, False):
        cfg = config.cli_config(["method=joint", "msdnet.n_blocks=2", f"joint.gradient_rescale={value}"])
        assert registry.unsupported_options("msdnet", cfg.method_cfg) == {}
        assert registry.backbone_options("msdnet", cfg.method_cfg) == {"gradient_rescale": value, "gradient_equilibrium": False}
        model = registry.get_method("joint").cls(cfg).build_model(DIGITS)
        assert model.gradient_rescale is value  # the option reaches the network
    with pytest.raises(ValueError, match=r"method_options \['dropout'\] are not allowed: expected names from \['gradient_equilibrium', 'gradient_rescale'\]"):
        registry.register_backbone("x", MSDNetConfig, method_options=("dropout",))
