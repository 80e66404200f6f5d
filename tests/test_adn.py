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


# ------------------------------------------------------------------ distillation losses
# The expected values below are the authors' definitions (wchkang/depth train_adn.py,
# train_one_epoch_twobackward; models/_utils_fpn.py), written here with torch's own KLDivLoss and
# adaptive_avg_pool2d, or computed by hand: never with methods.adn's functions.


def authors_kl(student, teacher, T):
    """criterion_kd(log_softmax(student/T), softmax(teacher/T)) * T * T, criterion_kd = KLDivLoss(batchmean)."""
    return torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1)) * T * T


def authors_pool(feature):
    """IntermediateLayerGetter's feature: adaptive_avg_pool2d to 1x1, squeezed to [B, C]."""
    return torch.squeeze(F.adaptive_avg_pool2d(feature, (1, 1)))


def test_logit_kd_matches_hand_computed_values():
    t = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [1/4, 3/4]
    s = torch.zeros(1, 2)  # [1/2, 1/2]
    assert logit_kd(t, s, 1.0).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]  # softmax(t / 2)
    assert logit_kd(t, s, 2.0).item() == pytest.approx(4 * sum(pi * math.log(pi / 0.5) for pi in p), rel=1e-6)
    # top-2 of three classes: the third (the teacher's least likely) is left out
    t3, s3 = torch.tensor([[0.0, math.log(3.0), -9.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    assert logit_kd(t3, s3, 1.0, topk=2).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    # a batch is averaged over its samples: a second, identical pair halves the value
    assert logit_kd(torch.cat([t, s]), torch.cat([s, s]), 1.0).item() == pytest.approx((0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2, rel=1e-6)


def test_logit_kd_is_the_authors_top_k_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 40) * 3, torch.randn(5, 40) * 3
    top_t, idx = teacher.topk(7, 1, largest=True, sorted=True)  # the authors' outputs_full.topk(500, 1, ...)
    assert logit_kd(teacher, student, 2.0, topk=7).item() == pytest.approx(authors_kl(student.gather(1, idx), top_t, 2.0).item(), rel=1e-5)
    for k in (0, 40, 500):  # every class: no top-k, or k reaching the number of classes
        assert logit_kd(teacher, student, 1.0, topk=k).item() == pytest.approx(authors_kl(student, teacher, 1.0).item(), rel=1e-5)


def test_feature_kd_pools_each_stage_globally_then_compares_channel_distributions():
    # sample 0: 2 channels at 1x2 positions; pooled, the teacher's channels are [0, ln3] (softmax
    # [1/4, 3/4]) and the student's [0, 0]; sample 1 is equal in both. batchmean: half the KL.
    t = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0) - 1, math.log(3.0) + 1]]], [[[1.0, 2.0]], [[3.0, 4.0]]]])
    s = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]], [[[1.0, 2.0]], [[3.0, 4.0]]]])
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert feature_kd([t], [s], 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert feature_kd([t, t], [s, t], 1.0).item() == pytest.approx(expected, rel=1e-6)  # summed over stages
    # the per-position KL (the form this replaced) is another number on the same input
    per_position = sum(authors_kl(s[:1, :, 0, j], t[:1, :, 0, j], 1.0).item() for j in range(2)) / 4
    assert abs(per_position - expected) > 0.01  # 0.087 against 0.065
    torch.manual_seed(1)
    ta, sa = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    assert feature_kd([ta], [sa], 3.0).item() == pytest.approx(authors_kl(authors_pool(sa), authors_pool(ta), 3.0).item(), rel=1e-5)


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


def stage_outputs(model, x, skip):
    """Logits and the output of every stage of sub-network ``skip``, taken by hooks (not from the
    model's return_features): a block's output is its ReLU's last output."""
    outs = {}
    last = [stage[m - 1] if letter == "T" else stage[-1] for stage, m, letter in zip(model.stages, model.mandatory, skip)]
    handles = [b.relu.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o)) for k, b in enumerate(last)]
    try:
        logits = model(x, skip=skip)
    finally:
        for h in handles:
            h.remove()
    return logits, [outs[k] for k in range(len(last))]


def step_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize("overrides,T,k", [((), 1.0, 500), (("adn.temperature=2", "adn.topk=4"), 2.0, 4)])
def test_step_losses_are_the_authors_two_backward_step(overrides, T, k):
    """Defaults: 0.5 x CE(super-net), then 0.5 x (top-500 logit KD + feature KD on layer1-layer3),
    each stage output pooled to [B, C]; the teacher detached."""
    method = get_method("adn").cls(adn_cfg(*overrides))
    model = method.build_model(config_info())
    model.train()
    x, y = step_batch()
    metrics, losses, grads = run_step(method, model, x, y)
    assert len(losses) == 2

    # train-mode outputs do not depend on running statistics: recomputing them gives the same values
    t_logits, t_stages = stage_outputs(model, x, "FFFF")
    s_logits, s_stages = stage_outputs(model, x, "TTTT")
    loss_full = 0.5 * torch.nn.CrossEntropyLoss()(t_logits, y)
    top_t, idx = t_logits.topk(min(k, 10), 1, largest=True, sorted=True)
    loss_softmax_kd = authors_kl(s_logits.gather(1, idx), top_t.detach(), T)
    loss_feature_kd = sum(authors_kl(authors_pool(s), authors_pool(t).detach(), T) for t, s in zip(t_stages[:3], s_stages[:3]))  # layer1-layer3
    loss_kd = 0.5 * (loss_softmax_kd + loss_feature_kd)
    assert losses[0].item() == pytest.approx(loss_full.item(), rel=1e-5)
    assert losses[1].item() == pytest.approx(loss_kd.item(), rel=1e-4)
    assert metrics["loss"].item() == pytest.approx(loss_full.item() + loss_kd.item(), rel=1e-4)

    # the second backward's gradients are those of loss_kd with the teacher held constant, and
    # leave the skippable blocks untouched
    model.zero_grad(set_to_none=True)
    loss_kd.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads[1]) == set(expected)
    for n in expected:
        torch.testing.assert_close(grads[1][n], expected[n], rtol=1e-4, atol=1e-7)
    assert not any(n.startswith("layer1.1.") or n.startswith("layer4.1.") for n in grads[1])  # skippable halves
    assert "layer1.0.skip_norms.bn1.weight" in grads[1] and "layer1.0.bn1.weight" not in grads[1]
    assert "layer1.0.skip_norms.bn1.weight" not in grads[0]


def test_feature_stages_and_weight_choose_what_the_base_net_distills():
    method = get_method("adn").cls(adn_cfg("adn.feature_stages=[4]", "adn.alpha=0.25"))
    model = method.build_model(config_info())
    model.train()
    x, y = step_batch()
    _, losses, _ = run_step(method, model, x, y)
    t_logits, t_stages = stage_outputs(model, x, "FFFF")
    s_logits, s_stages = stage_outputs(model, x, "TTTT")
    assert losses[0].item() == pytest.approx(0.25 * F.cross_entropy(t_logits, y).item(), rel=1e-5)
    expected = 0.75 * (authors_kl(s_logits, t_logits, 1.0) + authors_kl(authors_pool(s_stages[3]), authors_pool(t_stages[3]), 1.0))
    assert losses[1].item() == pytest.approx(expected.item(), rel=1e-4)
    logits_only = get_method("adn").cls(adn_cfg("adn.feature_weight=0"))
    _, losses, _ = run_step(logits_only, model, x, y)
    assert losses[1].item() == pytest.approx(0.5 * authors_kl(s_logits, t_logits, 1.0).item(), rel=1e-4)
    with pytest.raises(ConfigError, match="adn.feature_stages"):
        get_method("adn").cls(adn_cfg("adn.feature_stages=[5]")).build_model(config_info())
    with pytest.raises(ConfigError, match="adn.feature_stages"):
        adn_cfg("adn.feature_stages=[0,1]")


def test_without_distillation_the_base_net_is_trained_with_cross_entropy():
    cfg = adn_cfg("adn.distill=false")
    method = get_method("adn").cls(cfg)
    model = method.build_model(config_info())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.train()
    _, losses, _ = run_step(method, model, x, y)
    # the authors' no-KD step: 0.5 x CE(super-net), then 0.5 x CE(base-net)
    assert losses[0].item() == pytest.approx(0.5 * F.cross_entropy(model(x, skip="FFFF"), y).item(), rel=1e-5)
    assert losses[1].item() == pytest.approx(0.5 * F.cross_entropy(model(x, skip="TTTT"), y).item(), rel=1e-5)


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
    aliased = get_method("adn").cls(adn_cfg("adn.subnets=[base,super]")).predict(model, x)
    assert aliased.names == ["TTTT", "FFFF"] and torch.equal(aliased.logits, p2.logits)


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
