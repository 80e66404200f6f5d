"""ADN: the mandatory/skippable split, torchvision equivalence, skip-aware norms, the two-backward
training step (KD against a detached teacher) and sub-network predictions with measured costs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dynlab import config
from dynlab.errors import ConfigError
from dynlab.predictions import SubnetPredictions
from dynlab.registry import get_method
from methods.adn import feature_kd, logit_kd
from methods.backbones.adn_base import mandatory_count, subnet_names
from methods.backbones.adn_resnet import ADNResNet


def tiny(block="basic", layers=(2, 2, 2, 2), width=4, classes=10, **kw):
    torch.manual_seed(0)
    return ADNResNet(block, list(layers), classes, width=width, stem="cifar", image_size=16, **kw)


def executed_blocks(model, skip) -> list[int]:
    """How many residual blocks of each stage run, counted with hooks on each block's first conv."""
    counts = [0] * model.num_stages
    handles = [b.conv1.register_forward_pre_hook(lambda *_ , i=i: counts.__setitem__(i, counts[i] + 1)) for i, s in enumerate(model.stages) for b in s]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 16, 16), skip=skip)
    for h in handles:
        h.remove()
    return counts


def adn_cfg(*overrides):
    return config.resolve(["method=adn", "backbone=adn_resnet", "adn_resnet.width=4", "data.name=digits", *overrides])


# ------------------------------------------------------------------ architecture


def test_split_follows_the_paper_for_resnet50_and_resnet101():
    assert [mandatory_count(n) for n in (3, 4, 6, 3)] == [2, 2, 3, 2]  # paper: [2,2,3,2] of [3,4,6,3]
    assert [mandatory_count(n) for n in (3, 4, 23, 3)] == [2, 2, 12, 2]
    model = tiny("bottleneck", (3, 4, 6, 3))
    # executed blocks counted by hooks, not read from the model's own bookkeeping
    assert executed_blocks(model, "FFFF") == [3, 4, 6, 3]
    assert executed_blocks(model, "TTTT") == [2, 2, 3, 2]
    assert executed_blocks(model, "TFTF") == [2, 4, 3, 3]
    names = subnet_names(4)
    assert len(names) == 16 == len(set(names)) and names[0] == "TTTT" and names[-1] == "FFFF"


@pytest.mark.parametrize("arch,layers", [("resnet50", [3, 4, 6, 3]), ("resnet18", [2, 2, 2, 2])])
def test_super_net_equals_torchvision_with_the_same_weights(arch, layers):
    torch.manual_seed(1)
    tv = getattr(torchvision.models, arch)(num_classes=7).eval()  # random init, no download
    block = "bottleneck" if arch == "resnet50" else "basic"
    model = ADNResNet(block, layers, 7, width=64, stem="imagenet").eval()
    assert set(tv.state_dict()) <= set(model.state_dict())  # torchvision's layout, plus the skip-aware norms
    model.load_torchvision(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))
        assert torch.equal(model(x, skip=[False] * 4), tv(x))
        assert not torch.allclose(model(x, skip="TTTT"), tv(x))


def test_skip_aware_norms_keep_separate_running_statistics():
    model = tiny()
    block = model.layer2[0]  # mandatory, with a downsample
    main, alt = block.bn1, block.skip_norms["bn1"]
    assert set(block.skip_norms) == {"bn1", "bn2", "downsample"} and not hasattr(model.layer2[1], "skip_norms")
    model.train()
    model(torch.randn(8, 3, 16, 16), skip="TTTT")
    assert torch.equal(main.running_mean, torch.zeros_like(main.running_mean)) and main.num_batches_tracked == 0
    assert alt.num_batches_tracked == 1 and alt.running_mean.abs().sum() > 0
    alt_mean = alt.running_mean.clone()
    model(torch.randn(8, 3, 16, 16), skip="FFFF")
    assert main.num_batches_tracked == 1 and torch.equal(alt.running_mean, alt_mean)
    # the skipped stage in eval mode reads the second set: changing it changes only skipped outputs
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before_t, before_f = model(x, skip="FTFF"), model(x, skip="FFFF")
        alt.running_mean += 1.0
        assert torch.equal(model(x, skip="FFFF"), before_f) and not torch.allclose(model(x, skip="FTFF"), before_t)
    plain = tiny(skip_aware_norms=False)
    assert not any(".skip_norms." in k for k in plain.state_dict())


# ------------------------------------------------------------------ distillation losses, hand-computed


def test_logit_kd_matches_hand_computed_values():
    t = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [1/4, 3/4]
    s = torch.zeros(1, 2)  # [1/2, 1/2]
    assert logit_kd(t, s, 1.0).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]  # softmax(t / 2)
    assert logit_kd(t, s, 2.0).item() == pytest.approx(4 * sum(pi * math.log(pi / 0.5) for pi in p), rel=1e-6)
    # top-2 of three classes: the third (the teacher's least likely) is left out
    t3, s3 = torch.tensor([[0.0, math.log(3.0), -9.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    assert logit_kd(t3, s3, 1.0, topk=2).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_feature_kd_is_the_channel_distribution_kl_at_every_position_summed_over_stages():
    # one sample, 2 channels, 1x2 positions; at position 0 teacher [0, ln3] vs student [0, 0], at position 1 equal
    t = torch.tensor([[[[0.0, 1.0]], [[math.log(3.0), 2.0]]]])
    s = torch.tensor([[[[0.0, 1.0]], [[0.0, 2.0]]]])
    per_position = (0.25 * math.log(0.5) + 0.75 * math.log(1.5) + 0.0) / 2
    assert feature_kd([t], [s], 1.0).item() == pytest.approx(per_position, rel=1e-6)
    assert feature_kd([t, t], [s, t], 1.0).item() == pytest.approx(per_position, rel=1e-6)


# ------------------------------------------------------------------ the training step


def run_step(method, model, x, y):
    """train_step with a backward that keeps each call's loss and gradients apart."""
    losses, grads = [], []

    def backward(loss):
        losses.append(loss.detach())
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    metrics = method.train_step(model, (x, y), backward)
    return metrics, losses, grads


def test_step_calls_backward_twice_and_its_losses_equal_a_direct_computation():
    cfg = adn_cfg("adn.kd_lambda=0.7", "adn.temperature=2", "adn.topk=4")
    method = get_method("adn").cls(cfg)
    model = method.build_model(config_info())
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    model.train()
    metrics, losses, grads = run_step(method, model, x, y)
    assert len(losses) == 2

    # direct computation (train-mode outputs do not depend on running statistics)
    t_logits, t_feats = model(x, skip="FFFF", return_features=True)
    s_logits, s_feats = model(x, skip="TTTT", return_features=True)
    assert losses[0].item() == pytest.approx(F.cross_entropy(t_logits, y).item(), rel=1e-5)
    T = 2.0
    top = t_logits.topk(4, dim=1).indices
    kl_logits = F.kl_div(F.log_softmax(s_logits.gather(1, top) / T, 1), F.log_softmax(t_logits.gather(1, top) / T, 1), log_target=True, reduction="batchmean") * T * T
    kl_feats = 0.0
    for a, b in zip(t_feats, s_feats):
        rows = a.shape[0] * a.shape[2] * a.shape[3]
        kl_feats = kl_feats + F.kl_div(F.log_softmax(b / T, 1), F.log_softmax(a / T, 1), log_target=True, reduction="sum") / rows * T * T
    direct = 0.7 * (0.5 * kl_logits + 0.5 * kl_feats)
    assert losses[1].item() == pytest.approx(direct.item(), rel=1e-4)
    assert metrics["loss"].item() == pytest.approx(losses[0].item() + losses[1].item(), rel=1e-5)

    # KD gradients do not reach the teacher: the second backward's gradients equal those of the
    # direct loss with the teacher held constant, and leave the skippable blocks untouched
    model.zero_grad(set_to_none=True)
    t_const = [v.detach() for v in (t_logits, *t_feats)]
    kl_l = F.kl_div(F.log_softmax(s_logits.gather(1, top) / T, 1), F.log_softmax(t_const[0].gather(1, top) / T, 1), log_target=True, reduction="batchmean") * T * T
    kl_f = sum(F.kl_div(F.log_softmax(b / T, 1), F.log_softmax(a / T, 1), log_target=True, reduction="sum") / (a.shape[0] * a.shape[2] * a.shape[3]) * T * T for a, b in zip(t_const[1:], s_feats))
    (0.7 * (0.5 * kl_l + 0.5 * kl_f)).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads[1]) == set(expected)
    for n in expected:
        torch.testing.assert_close(grads[1][n], expected[n], rtol=1e-4, atol=1e-7)
    assert not any(n.startswith("layer1.1.") or n.startswith("layer4.1.") for n in grads[1])  # skippable halves
    assert "layer1.0.skip_norms.bn1.weight" in grads[1] and "layer1.0.bn1.weight" not in grads[1]
    assert "layer1.0.skip_norms.bn1.weight" not in grads[0]


def test_without_distillation_the_base_net_is_trained_with_cross_entropy():
    cfg = adn_cfg("adn.distill=false")
    method = get_method("adn").cls(cfg)
    model = method.build_model(config_info())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.train()
    _, losses, _ = run_step(method, model, x, y)
    assert losses[1].item() == pytest.approx(F.cross_entropy(model(x, skip="TTTT"), y).item(), rel=1e-5)


# ------------------------------------------------------------------ predictions and costs


def config_info():
    from dynlab.data import static_info

    return static_info("digits")


def test_predict_returns_every_sub_network_with_its_measured_cost():
    cfg = adn_cfg()
    method = get_method("adn").cls(cfg)
    model = method.build_model(config_info()).eval()
    x = torch.randn(3, 3, 32, 32)
    preds = method.predict(model, x)
    assert isinstance(preds, SubnetPredictions) and preds.logits.shape == (16, 3, 10)
    assert preds.names == subnet_names(4)
    i = preds.names.index("TFFT")
    with torch.no_grad():
        torch.testing.assert_close(preds.logits[i], model(x, skip=[True, False, False, True]))
    # cost: the stem, every block that runs and the head, counted by hand for width 4 at 32x32
    def conv(cin, cout, k, side):
        return cin * cout * k * k * side * side

    def block(cin, cout, side, down):  # BasicBlock: 2 convs (+1x1 downsample), 3 ReLU calls
        return conv(cin, cout, 3, side) + conv(cout, cout, 3, side) + (conv(cin, cout, 1, side) if down else 0) + 2 * cout * side * side

    stem = conv(3, 4, 3, 32) + 4 * 32 * 32
    head = 32 * 1 * 4 * 4 + 32 * 10 + 10  # adaptive avg pool over 4x4, then fc
    stages = [(4, 4, 32), (4, 8, 16), (8, 16, 8), (16, 32, 4)]
    def cost(name):
        total = stem + head
        for (cin, cout, side), letter in zip(stages, name):
            total += block(cin, cout, side, cin != cout) + (0 if letter == "T" else block(cout, cout, side, False))
        return total
    assert preds.costs.tolist() == [float(cost(n)) for n in preds.names]

    sub = get_method("adn").cls(adn_cfg("adn.subnets=[TTTT,FFFF]"))
    p2 = sub.predict(model, x)
    assert p2.names == ["TTTT", "FFFF"] and p2.costs.tolist() == [cost("TTTT"), cost("FFFF")]


def test_bad_sub_network_names_fail_at_build_naming_the_key():
    method = get_method("adn").cls(adn_cfg("adn.subnets=[TTT]"))
    with pytest.raises(ConfigError, match="adn.subnets"):
        method.build_model(config_info())
    with pytest.raises(ConfigError, match="adn_resnet.layers"):
        adn_cfg("adn_resnet.layers=[2,1,2,2]")


def test_resnet50_super_and_base_net_costs_match_the_paper_within_2_percent():
    from tests.presets import preset_model
    from tests.published import adn_release_macs

    model = preset_model("adn-resnet50")
    assert model.input_shape == (1, 3, 224, 224)
    for name, paper in zip(("FFFF", "TTTT"), adn_release_macs("resnet50")):  # the paper's v1 Table 1 and the release agree
        macs, _ = model.subnet_cost(name)
        assert abs(macs - paper) / paper < 0.02, (name, macs)


def test_latency_is_measured_for_every_requested_sub_network_beside_its_cost():
    from methods.adn import subnet_latency

    model = tiny()
    model.train()
    out = subnet_latency(model, ["TTTT", "FFFF"], batch=2, repeats=2)
    assert out["name"].tolist() == ["TTTT", "FFFF"] and (out["latency_s"] > 0).all()
    assert out["macs"].tolist() == [model.subnet_cost("TTTT")[0], model.subnet_cost("FFFF")[0]]
    assert model.training  # mode restored


@pytest.mark.parametrize("which,name", [("super", "FFFF"), ("base", "TTTT")])
def test_individual_baselines_train_one_network_with_cross_entropy(which, name):
    method = get_method("adn").cls(adn_cfg(f"adn.individual={which}"))
    model = method.build_model(config_info())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.train()
    _, losses, grads = run_step(method, model, x, y)
    assert len(losses) == 1 and losses[0].item() == pytest.approx(F.cross_entropy(model(x, skip=name), y).item(), rel=1e-5)
    assert any(n.startswith("layer1.1.") for n in grads[0]) == (which == "super")  # the skippable half trains only in the super-net
    preds = method.predict(model.eval(), x)
    assert preds.names == [name]


def test_resnet101_super_and_base_net_costs_are_torchvisions_resnet101_and_its_halved_stages():
    """The paper gives no ResNet-101-ADN costs; measured with the same counter, the super-net
    costs exactly torchvision's ResNet-101 (torchvision documents 7.8 GFLOPs, i.e. GMACs, at
    224x224) and the base-net exactly a torchvision ResNet with the mandatory [2,2,12,2] blocks."""
    from torchvision.models.resnet import Bottleneck, ResNet

    from dynlab import costs
    from tests.presets import preset_model
    from tests.test_adn_presets import PINNED

    model = preset_model("adn-resnet101")
    super_net, base_net = model.subnet_cost("FFFF"), model.subnet_cost("TTTT")
    shape = (1, 3, 224, 224)
    assert super_net == costs.measure_total(torchvision.models.resnet101(), shape)  # weights=None: no download
    assert base_net == costs.measure_total(ResNet(Bottleneck, [2, 2, 12, 2]), shape)
    assert abs(super_net[0] - 7.8e9) / 7.8e9 < 0.02 and abs(base_net[0] - 4.54e9) / 4.54e9 < 0.01
    assert (super_net[0], base_net[0]) == (PINNED["adn-resnet101"][0][-1], PINNED["adn-resnet101"][0][0])
