"""ADN Swin: the [1,1,3,1]-of-[2,2,6,2] split, torchvision equivalence, skip-aware LayerNorm,
window attention counted, Swin-T costs against the paper."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dynlab import config
from dynlab.data import static_info
from dynlab.errors import ConfigError
from dynlab.registry import get_method
from methods.backbones.adn_swin import ADNSwin
from tests.presets import preset_model
from tests.published import ADN_PAPER_V1, ADN_RELEASE, adn_macs


def small(depths=(2, 2, 6, 2), **kw):
    torch.manual_seed(0)
    return ADNSwin(2, 8, list(depths), [1, 1, 2, 2], 4, 10, image_size=32, **kw)


def executed(model, skip) -> list[int]:
    """Blocks run per stage, counted by hooks on each block's MLP."""
    counts = [0] * model.num_stages
    handles = [b.mlp.register_forward_pre_hook(lambda *_, s=s: counts.__setitem__(s, counts[s] + 1)) for s, i in enumerate(model.stage_index) for b in model.features[i]]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32), skip=skip)
    for h in handles:
        h.remove()
    return counts


def test_swin_t_split_and_equality_with_torchvision():
    model = small()
    assert executed(model, "FFFF") == [2, 2, 6, 2]
    assert executed(model, "TTTT") == [1, 1, 3, 1]  # paper: mandatory [1,1,3,1] of [2,2,6,2]
    torch.manual_seed(1)
    tv = torchvision.models.SwinTransformer([2, 2], 8, [2, 2, 6, 2], [1, 1, 2, 2], [4, 4], stochastic_depth_prob=0.0, num_classes=10).eval()
    missing, unexpected = model.load_state_dict(tv.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".skip_norms." in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), tv(x))


def test_skip_aware_layer_norms_train_only_in_skipped_stages():
    model = small((2, 2, 2, 2))
    block = model.features[1][0]
    model(torch.randn(2, 3, 32, 32), skip="TFFF").sum().backward()
    assert block.skip_norms["norm1"].weight.grad is not None and block.norm1.weight.grad is None
    assert block.norm1 is not block.skip_norms["norm1"]


@pytest.mark.parametrize("preset,source", [("adn-swin-t", ADN_RELEASE), ("adn-swin-t-v1", ADN_PAPER_V1)], ids=["release", "v1"])
def test_each_split_costs_what_its_own_source_prints(preset, source):
    """The release (4.49 / 2.34 GMACs, mandatory [1,1,3,1]) and arXiv v1 (4.49 / 2.69) split Swin-T
    differently; each preset against its own source."""
    model = preset_model(preset)
    n = model.num_stages
    for name, paper in zip(("F" * n, "T" * n), adn_macs("swin_t", source)):
        macs, _ = model.subnet_cost(name)
        assert abs(macs - paper) / paper < 0.02, (preset, name, macs)
    attn = model.features[1][0].attn  # 56x56 tokens of 96 in 7x7 windows, by hand
    assert attn.macs((torch.zeros(1, 56, 56, 96),), None) == 3136 * (4 * 96 * 96 + 4 * 96) + 2 * 3136 * 49 * 96


def test_a_stage_whose_blocks_are_all_mandatory_is_not_skippable():
    model = small(mandatory=[1, 2, 3, 1])  # the v1 preset's split
    assert model.num_stages == 3
    ran = [0] * 4
    handles = [b.mlp.register_forward_pre_hook(lambda *_, s=s: ran.__setitem__(s, ran[s] + 1)) for s in range(4) for b in model.features[1 + 2 * s]]
    with torch.no_grad():
        logits, feats = model.eval()(torch.zeros(1, 3, 32, 32), skip="TTT", return_features=True)
    assert ran == [1, 2, 3, 1] and len(feats) == 3
    for h in handles:
        h.remove()
    assert not hasattr(model.features[3][0], "skip_norms") and hasattr(model.features[5][0], "skip_norms")
    with pytest.raises(ConfigError, match="adn_swin.mandatory"):
        config.resolve(["method=adn", "backbone=adn_swin", "adn_swin.mandatory=[1,1,3]"])


def test_the_adn_method_trains_a_small_swin():
    cfg = config.resolve(["method=adn", "backbone=adn_swin", "data.name=digits"])
    method = get_method("adn").cls(cfg)
    model = method.build_model(static_info("digits"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calls = []
    method.train_step(model.train(), (x, y), lambda loss: (calls.append(loss.item()), loss.backward()))
    assert len(calls) == 2
    preds = method.predict(model.eval(), x)
    assert preds.logits.shape == (16, 4, 10) and preds.costs[0] < preds.costs[-1]


def test_stochastic_depth_drops_blocks_of_the_super_net_only():
    """The paper turns stochastic depth off for the base-net only: in train mode two passes of the
    base-net give the same output, two of the super-net do not (blocks randomly dropped)."""
    model = small(stochastic_depth_prob=0.9).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        base = model(x, skip="TTTT")
        assert torch.equal(model(x, skip="TTTT"), base)
        assert not torch.equal(model(x, skip="FFFF"), model(x, skip="FFFF"))
        # in a mixed sub-network only the skipped stage runs without it: the kept stages still drop
        assert not torch.equal(model(x, skip="TTTF"), model(x, skip="TTTF"))
    last = model.features[model.stage_index[-1]][0]
    assert last.stochastic_depth.p > 0.8  # restored after every skipped pass
    assert config.resolve(["method=adn", "preset=adn-swin-t"]).backbone_cfg.stochastic_depth_prob == 0.1  # the authors' swin_t
