"""ADN ViT: 4 groups of encoder blocks with the last of each skippable, torchvision equivalence,
skip-aware LayerNorm, attention counted, ViT-B/16 costs against the paper."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dynlab import config
from dynlab.data import static_info
from dynlab.registry import get_method
from methods.backbones.adn_vit import ADNViT
from tests.published import adn_release_macs


def executed(model, skip) -> list[int]:
    ran = []
    blocks = list(model.encoder.layers)
    handles = [b.mlp.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32), skip=skip)
    for h in handles:
        h.remove()
    return ran


def test_the_last_block_of_each_group_of_three_is_skippable_and_the_rest_equals_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(32, 8, 12, 2, 16, 32, num_classes=10).eval()
    model = ADNViT(32, 8, 12, 2, 16, 32, 10).eval()
    missing, unexpected = model.load_state_dict(tv.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".skip_norms." in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))
    assert executed(model, "FFFF") == list(range(12))
    assert executed(model, "TTTT") == [0, 1, 3, 4, 6, 7, 9, 10]  # 12 blocks in 4 groups of 3, the last of each skipped
    assert executed(model, "FTFT") == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_skip_aware_layer_norms_train_only_in_skipped_groups():
    model = ADNViT(32, 8, 8, 2, 16, 32, 10)
    block = model.encoder.layers[0]
    assert set(block.skip_norms) == {"ln_1", "ln_2"} and not hasattr(model.encoder.layers[1], "skip_norms")
    loss = model(torch.randn(2, 3, 32, 32), skip="TFFF").sum()
    loss.backward()
    assert block.skip_norms["ln_1"].weight.grad is not None and block.ln_1.weight.grad is None
    assert block.ln_1 is not block.skip_norms["ln_1"]  # swapped back after the forward


def test_vit_b16_super_and_base_net_costs_match_the_paper_within_2_percent():
    model = ADNViT(224, 16, 12, 12, 768, 3072, 1000)
    for name, paper in zip(("FFFF", "TTTT"), adn_release_macs("vit_b16")):  # the paper's v1 Table 1 and the release agree
        macs, _ = model.subnet_cost(name)
        assert abs(macs - paper) / paper < 0.02, (name, macs)
    # by hand, the attention part of one block over 197 tokens of 768: projections and the two products
    attn = model.encoder.layers[0].self_attention
    assert attn.macs((torch.zeros(1, 197, 768),), None) == 197 * (4 * 768 * 768 + 4 * 768) + 2 * 197 * 197 * 768


def test_the_adn_method_trains_a_small_vit():
    cfg = config.resolve(["method=adn", "backbone=adn_vit", "data.name=digits"])
    method = get_method("adn").cls(cfg)
    model = method.build_model(static_info("digits"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calls = []
    metrics = method.train_step(model.train(), (x, y), lambda loss: (calls.append(loss.item()), loss.backward()))
    # the authors distill no ViT features: the base-net learns from the logits only (0 at
    # initialisation, where torchvision's zero head makes both networks' logits equal)
    assert len(calls) == 2 and calls[0] > 0 and metrics["kd_feature"].item() == 0
    assert calls[1] == pytest.approx(0.5 * metrics["kd_logit"].item(), abs=1e-7)
    preds = method.predict(model.eval(), x)
    assert preds.logits.shape == (16, 4, 10) and preds.costs[0] < preds.costs[-1]
