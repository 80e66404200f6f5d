"""ADN MobileNetV2: the split of torchvision's inverted-residual groups, torchvision equivalence,
skip-aware norms swapped in without touching the block's own forward, costs against the paper."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dynlab import config, costs
from dynlab.data import static_info
from dynlab.errors import ConfigError
from dynlab.registry import get_method
from methods.backbones.adn_mobilenetv2 import ADNMobileNetV2
from tests.presets import preset_model
from tests.published import ADN_PAPER_V1, ADN_RELEASE, adn_macs


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


@pytest.mark.parametrize("preset,source", [("adn-mobilenetv2", ADN_RELEASE), ("adn-mobilenetv2-v1", ADN_PAPER_V1)], ids=["release", "v1"])
def test_each_split_costs_what_its_own_source_prints(preset, source):
    """The release (0.32 / 0.22 GMACs) and arXiv v1 (0.32 / 0.25) split MobileNetV2 differently; each
    preset against its own source, counted as the authors count (norms included: the "adn-paper"
    convention, test_adn_paper_convention; our default convention is about 4% lower)."""
    model = preset_model(preset)
    n = model.num_stages
    with costs.convention("adn-paper"):
        for name, paper in zip(("F" * n, "T" * n), adn_macs("mobilenetv2", source)):
            macs = model.subnet_cost(name)[0]
            assert abs(macs - paper) / paper < 0.02, (preset, name, macs)


def test_the_v1_split_keeps_the_two_block_group_whole_and_has_four_stages():
    model = small(mandatory=[2, 2, 2, 2, 2])
    assert model.num_stages == 4  # v1: "all base models except ViT have 4 residual stages"
    assert executed(model, "FFFF") == list(range(1, 18))
    assert executed(model, "TTTT") == [1, 2, 3, 4, 5, 7, 8, 11, 12, 14, 15, 17]  # as the release's, block 3 kept
    with pytest.raises(ConfigError, match="adn_mobilenetv2.mandatory"):
        config.resolve(["method=adn", "backbone=adn_mobilenetv2", "adn_mobilenetv2.mandatory=[2,3,4,3,3]"])  # nothing to skip


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
