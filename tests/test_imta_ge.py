"""Gradient Equilibrium (IMTA section 3.1) on MSDNet and RANet, both forms.

Expected gradients are derived by hand: with GE every block's gradient is the plain gradient of the
summed exit losses divided by the number of exits that depend on that block (the average of those
losses); heads keep their plain gradients (the rescaling sits on the head's input, not inside it).
"""

from __future__ import annotations

import pytest
import torch

import methods  # noqa: F401  (registers backbones and methods)
from dynlab import config, registry
from dynlab.data import static_info
from dynlab.errors import ConfigError
from methods.backbones.msdnet import MSDNet, MSDNetConfig
from methods.backbones.ranet import RANet, RANetConfig

DIGITS = static_info("digits")


def _grads(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of sum_j <w_j, logits_j> (a fixed random loss per exit) for every parameter."""
    model.zero_grad()
    logits = model(x)
    gen = torch.Generator().manual_seed(1)
    sum((z * torch.randn(z.shape, generator=gen)).sum() for z in logits).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _pair(cls, cfg, **ge):
    torch.manual_seed(0)
    plain = cls(cfg, DIGITS).eval()
    scaled = cls(cfg, DIGITS, **ge).eval()
    scaled.load_state_dict(plain.state_dict())
    return plain, scaled


def _check(plain, scaled, divisor_of) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain(x), scaled(x)))  # identity forward
    g_plain, g_scaled = _grads(plain, x), _grads(scaled, x)
    checked = 0
    for name, g in g_plain.items():
        d = divisor_of(name)
        tol = 1e-5 * float(g.abs().max()) + 1e-12  # float32 sums in another order
        assert torch.allclose(g_scaled[name], g / d, rtol=1e-4, atol=tol), (name, d)
        checked += g.abs().sum() > 0
    assert checked > len(g_plain) // 2  # the comparison is not between zeros


def _msdnet_divisor(N: int):
    """Block n (1-based; its index in ``blocks`` is n-1) has N-n+1 dependent exits; heads 1."""

    def divisor(name: str) -> int:
        part, index = name.split(".")[:2]
        return 1 if part == "heads" else N - int(index)

    return divisor


def test_msdnet_paper_form_is_the_average_over_dependent_exits():
    plain, scaled = _pair(MSDNet, MSDNetConfig(), gradient_equilibrium=True)  # 4 blocks, 3 scales
    _check(plain, scaled, _msdnet_divisor(4))  # blocks: /4, /3, /2, /1


def test_msdnet_reference_form_equals_it_on_one_scale_only():
    one_scale = MSDNetConfig(gr_factor=[1], bn_factor=[1], n_blocks=3)
    plain, scaled = _pair(MSDNet, one_scale, gradient_rescale=True)
    _check(plain, scaled, _msdnet_divisor(3))  # coarsest = only scale: the reference form is exact
    # with three scales the reference leaves the finer continuing scales unscaled: block 1 (0-based 0)
    # no longer gets the average (it gets more than 1/4 of the plain gradient)
    plain, scaled = _pair(MSDNet, MSDNetConfig(), gradient_rescale=True)
    x = torch.randn(2, 3, 32, 32)
    g_plain, g_scaled = _grads(plain, x), _grads(scaled, x)
    name = next(n for n in g_plain if n.startswith("blocks.0.") and g_plain[n].abs().sum() > 0)
    assert not torch.allclose(g_scaled[name], g_plain[name] / 4, rtol=1e-2, atol=1e-3 * float(g_plain[name].abs().max()))


def test_ranet_paper_form_is_the_average_over_dependent_exits():
    # default tiny RANet: streams of 2, 3, 4 blocks; exits at (0,0), (0,1), (1,2), (2,3)
    plain, scaled = _pair(RANet, RANetConfig(), gradient_equilibrium=True)
    assert scaled.exit_blocks == [(0, 0), (0, 1), (1, 2), (2, 3)]
    # block (0,0): all 4 exits; (0,1): exits 1-3; stream 1 (fused into stream 2): exits 2-3; stream 2: exit 3
    hand = [[4, 3], [2, 2, 2], [1, 1, 1, 1]]
    assert scaled.dependants == hand

    def divisor(name: str) -> int:
        parts = name.split(".")
        if parts[0] == "first":
            return 4  # every exit depends on the first layer
        if parts[0] == "heads":
            return 1
        return hand[int(parts[1])][int(parts[2])]  # streams.<i>.<k>.

    _check(plain, scaled, divisor)


def test_backbones_declare_the_forms_they_implement():
    assert registry.get_backbone("msdnet").method_options == ("gradient_rescale", "gradient_equilibrium")
    assert registry.get_backbone("ranet").method_options == ("gradient_equilibrium",)
    for backbone in ("msdnet", "ranet"):
        cfg = config.cli_config(["method=joint", f"backbone={backbone}", "joint.gradient_equilibrium=true"])
        model = registry.get_method("joint").cls(cfg).build_model(DIGITS)
        assert model.gradient_equilibrium is True  # the option reaches the network
    # the two forms are alternatives: both on is refused at the model build (the driver's preflight)
    both = config.cli_config(["method=joint", "joint.gradient_equilibrium=true", "joint.gradient_rescale=true"])
    with pytest.raises(ConfigError, match=r"joint.gradient_equilibrium.*gradient_rescale=true"):
        registry.get_method("joint").cls(both).build_model(DIGITS)
    # BoostNet on RANet: its default reference rescaling is set off, so the paper's form is accepted
    cfg = config.cli_config(["backbone=ranet", "boostnet.gradient_equilibrium=true"])
    assert cfg.method_cfg.gradient_rescale is False
    assert registry.get_method("boostnet").cls(cfg).build_model(DIGITS).backbone.gradient_equilibrium is True
