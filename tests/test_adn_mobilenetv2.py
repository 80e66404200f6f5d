"""ADN MobileNetV2: the split of torchvision's inverted-residual groups, torchvision equivalence,
skip-aware norms swapped in without touching the block's own forward, costs against the paper."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dynlab import config
from dynlab.data import static_info
from dynlab.registry import get_method
from methods.backbones.adn_mobilenetv2 import ADNMobileNetV2
from tests.published import adn_release_macs


def small(**kw):
    torch.manual_seed(0)
    return ADNMobileNetV2(10, width_mult=0.25, image_size=32, cifar_stem=True, **kw)


def executed(model, skip) -> list[int]:
    """Inverted-residual blocks run per feature index, counted by hooks on each block's first conv."""
    ran = []
    handles = [model.features[i].conv[0].register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i in range(1, 18)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32), skip=skip)
    for h in handles:
        h.remove()
    return ran


def test_groups_of_two_or_more_blocks_are_stages_with_their_second_half_skippable():
    model = small()
    assert model.num_stages == 5  # groups of n = 2, 3, 4, 3, 3 blocks (n = 1 groups are not stages)
    assert executed(model, "FFFFF") == list(range(1, 18))
    # skipped: block i >= (n+1)//2 of each group: index 3 (n=2), 6 (n=3), 9, 10 (n=4), 13 (n=3), 16 (n=3)
    assert executed(model, "TTTTT") == [1, 2, 4, 5, 7, 8, 11, 12, 14, 15, 17]
    assert executed(model, "FFTFF") == [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17]


def test_super_net_equals_torchvision_and_skip_norms_keep_their_own_statistics():
    torch.manual_seed(2)
    tv = torchvision.models.mobilenet_v2(num_classes=5).eval()
    model = ADNMobileNetV2(5).eval()
    missing, unexpected = model.load_state_dict(tv.state_dict(), strict=False)
    assert unexpected == [] and all(".skip_norms." in k for k in missing)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))
    block = model.features[2]  # the mandatory block of the first stage
    main, alt = block.conv[0][1], block.skip_norms["conv_0_1"]
    model.train()
    model(torch.randn(4, 3, 64, 64), skip="TFFFF")
    assert main.num_batches_tracked == 0 and alt.num_batches_tracked == 1
    assert block.conv[0][1] is main  # the swap is undone after the forward
    model(torch.randn(4, 3, 64, 64), skip="FTTTT")
    assert main.num_batches_tracked == 1 and alt.num_batches_tracked == 1


def test_costs_against_the_paper():
    model = ADNMobileNetV2(1000)
    sup, base = model.subnet_cost("FFFFF")[0], model.subnet_cost("TTTTT")[0]
    # our split is the authors' release's (0.32 / 0.22; the paper's v1 Table 1 prints base-net 0.25
    # for another split). Our convention (convs, ReLU6, pooling, linear) counts 0.307 / 0.210 GMACs;
    # the authors' counter also counts the norms (about 4% on both: test_adn_paper_convention), so
    # the absolute numbers agree within 5% and the base/super ratio within 2%
    paper_sup, paper_base = adn_release_macs("mobilenetv2")
    assert abs(sup - paper_sup) / paper_sup < 0.05 and abs(base - paper_base) / paper_base < 0.05
    assert abs(base / sup - paper_base / paper_sup) / (paper_base / paper_sup) < 0.02


def test_the_adn_method_trains_and_predicts_every_sub_network():
    cfg = config.resolve(["method=adn", "backbone=adn_mobilenetv2", "data.name=digits"])
    method = get_method("adn").cls(cfg)
    model = method.build_model(static_info("digits"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calls = []
    model.train()
    metrics = method.train_step(model, (x, y), lambda loss: (calls.append(loss.item()), loss.backward()))
    assert len(calls) == 2 and metrics["loss"].item() == pytest.approx(sum(calls), rel=1e-5)
    preds = method.predict(model.eval(), x)
    assert preds.logits.shape == (32, 4, 10) and preds.names[0] == "TTTTT" and preds.names[-1] == "FFFFF"
    assert preds.costs[0] < preds.costs[-1]
