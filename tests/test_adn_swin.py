"""ADN Swin: the [1,1,3,1]-of-[2,2,6,2] split, torchvision equivalence, skip-aware LayerNorm,
window attention counted, Swin-T costs against the paper."""

from __future__ import annotations

import torch
import torchvision

from dynlab import config
from dynlab.data import static_info
from dynlab.registry import get_method
from methods.backbones.adn_swin import ADNSwin
from tests.published import adn_release_macs


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


def test_swin_t_super_and_base_net_costs_match_the_paper_within_2_percent():
    model = ADNSwin(4, 96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 1000)
    # our split is the authors' release's (base-net 2.34); the paper's v1 Table 1 prints 2.69 for another split
    for name, paper in zip(("FFFF", "TTTT"), adn_release_macs("swin_t")):
        macs, _ = model.subnet_cost(name)
        assert abs(macs - paper) / paper < 0.02, (name, macs)
    attn = model.features[1][0].attn  # 56x56 tokens of 96 in 7x7 windows, by hand
    assert attn.macs((torch.zeros(1, 56, 56, 96),), None) == 3136 * (4 * 96 * 96 + 4 * 96) + 2 * 3136 * 49 * 96


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
