"""Starting ADN from torchvision weights: a torchvision state dict loads into every ADN super-net
(ResNet, MobileNetV2, ViT, Swin), which then computes exactly torchvision's forward, with every
skip-aware norm a copy of its loaded norm; anything else is a clear error naming a key. Through the
method: ``run.init_from`` = a torchvision .pt file (``ADN.load_init``, as the training loop calls it),
refused before training when it does not fit. Small random-init models, no downloads."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from dynlab import config, data, preflight, training
from dynlab.errors import ConfigError
from dynlab.registry import get_method
from methods.backbones.adn_base import NORMS, SKIP_NORMS, skip_norm_pairs
from methods.backbones.adn_mobilenetv2 import ADNMobileNetV2
from methods.backbones.adn_resnet import ADNResNet
from methods.backbones.adn_swin import ADNSwin
from methods.backbones.adn_vit import ADNViT

CLASSES = 7

# architecture -> (torchvision model, ADN super-net of the same architecture (skip_aware_norms=...))
ARCHS = {
    "resnet": (lambda: torchvision.models.ResNet(Bottleneck, [2, 2, 2, 2], num_classes=CLASSES),
               lambda **kw: ADNResNet("bottleneck", [2, 2, 2, 2], CLASSES, width=64, stem="imagenet", image_size=32, **kw)),
    "mobilenetv2": (lambda: torchvision.models.MobileNetV2(num_classes=CLASSES, width_mult=0.25),
                    lambda **kw: ADNMobileNetV2(CLASSES, width_mult=0.25, image_size=32, **kw)),
    "vit": (lambda: torchvision.models.VisionTransformer(32, 8, 8, 2, 16, 32, num_classes=CLASSES),
            lambda **kw: ADNViT(32, 8, 8, 2, 16, 32, CLASSES, **kw)),
    "swin": (lambda: torchvision.models.SwinTransformer([2, 2], 8, [2, 2, 2, 2], [1, 1, 2, 2], [4, 4], stochastic_depth_prob=0.0, num_classes=CLASSES),
             lambda **kw: ADNSwin(2, 8, [2, 2, 2, 2], [1, 1, 2, 2], 4, CLASSES, image_size=32, **kw)),
}


def pretrained(arch: str) -> nn.Module:
    torch.manual_seed(3)
    return looks_trained(ARCHS[arch][0]())


def looks_trained(tv: nn.Module) -> nn.Module:
    """``tv`` with weights that look trained: every parameter moved by noise (ViT's head and class
    token start at zero) and random norms (scales, shifts and running statistics; fresh norms are
    all ones and zeros, which a fresh skip-aware norm would equal by chance)."""
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in tv.modules():
            if isinstance(m, NORMS):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(123)
    return tv.eval()


def adn(arch: str, **kw) -> nn.Module:
    torch.manual_seed(4)
    return ARCHS[arch][1](**kw).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchvision_weights_load_into_the_super_net_and_seed_the_skip_aware_norms(arch):
    tv = pretrained(arch)
    model = adn(arch)
    sd = tv.state_dict()
    assert set(sd) == {k for k in model.state_dict() if SKIP_NORMS not in k}  # torchvision's layout, same prefixes
    model.load_torchvision(sd)
    x = torch.randn(2, 3, 32, 32)
    stages = model.num_stages
    with torch.no_grad():
        assert torch.equal(model(x), tv(x)) and tv(x).abs().min() > 0
        assert torch.equal(model(x, skip="F" * stages), tv(x))
    # every skip-aware norm is a copy of its main norm: weights, biases, running statistics
    pairs = list(skip_norm_pairs(model))
    assert {f"{n}.{k}" for n, skip, _ in pairs for k in skip.state_dict()} == {k for k in model.state_dict() if SKIP_NORMS in k}
    for name, skip, main in pairs:
        assert skip is not main
        for k, v in main.state_dict().items():
            assert torch.equal(skip.state_dict()[k], v), f"{name}.{k}"
    # so the base-net starts from the loaded norms: it computes what a network without skip-aware
    # norms computes with the same weights
    plain = adn(arch, skip_aware_norms=False)
    plain.load_state_dict(sd)  # no skip-aware norms: the torchvision keys exactly
    with torch.no_grad():
        assert torch.equal(model(x, skip="T" * stages), plain(x, skip="T" * stages))
        assert not torch.allclose(model(x, skip="T" * stages), model(x))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_state_dict_of_another_shape_is_a_clear_error_and_loads_nothing(arch):
    sd = pretrained(arch).state_dict()
    model = adn(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = [k for k, v in sd.items() if v.dim() >= 1][len(sd) // 2]  # one in the middle of the network
    wrong = dict(sd)
    wrong[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    with pytest.raises(ValueError, match=rf"not a torchvision state dict of this {type(model).__name__}: 1 key\(s\) differ, e.g. {re.escape(key)} \(shape"):
        model.load_torchvision(wrong)
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ValueError, match=rf"{re.escape(key)} \(missing\)"):
        model.load_torchvision(missing)
    with pytest.raises(ValueError, match=r"extra\.weight \(not in this"):
        model.load_torchvision({**sd, "extra.weight": torch.zeros(1)})
    adn_checkpoint = model.state_dict()  # holds skip-aware norms: not torchvision's
    with pytest.raises(ValueError, match=r"skip_norms.* \(a skip-aware norm"):
        model.load_torchvision(adn_checkpoint)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


# ------------------------------------------------------------------ through the method

SMALL = ["dataset=synthetic", "data.synthetic_train=64", "data.synthetic_test=32", f"data.synthetic_classes={CLASSES}", "data.batch_size=16", "workers=0", "optim.lr=0.05"]
RESNET18 = ["method=adn", "backbone=adn_resnet", "adn_resnet.block=basic", "adn_resnet.layers=[2,2,2,2]", "adn_resnet.width=64", "adn_resnet.stem=imagenet"]


def resnet18_pt(tmp_path):
    torch.manual_seed(5)
    tv = looks_trained(torchvision.models.resnet18(num_classes=CLASSES))  # weights=None: random init
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    return tv, str(path)


def test_load_init_takes_a_torchvision_file_or_an_adn_checkpoint_and_refuses_the_rest(tmp_path):
    tv, path = resnet18_pt(tmp_path)
    cfg = config.cli_config([*RESNET18, *SMALL, f"run.init_from={path}"])
    method = get_method("adn").cls(cfg)
    model = method.build_model(data.dataset_info(cfg.data)).eval()
    method.load_init(model, training.read_weights(path), path)  # as training.init_from calls it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))
    assert all(torch.equal(s.running_var, m.running_var) for _, s, m in skip_norm_pairs(model))
    # a dynlab checkpoint of this network loads strictly, skip-aware norms as saved
    with torch.no_grad():
        model.layer1[0].skip_norms["bn1"].running_mean.fill_(0.25)
    torch.save(model.state_dict(), tmp_path / "adn.pt")
    again = method.build_model(data.dataset_info(cfg.data))
    method.load_init(again, training.read_weights(str(tmp_path / "adn.pt")), "adn.pt")
    assert torch.equal(again.layer1[0].skip_norms["bn1"].running_mean, torch.full((64,), 0.25))
    # anything else: one ConfigError line naming the source and what is allowed
    wrong = {**tv.state_dict(), "fc.weight": torch.zeros(3, 512)}
    with pytest.raises(ConfigError, match=r"'run.init_from' = 'w.pt' .*a dynlab ADN checkpoint of this adn_resnet .* or a torchvision state dict of its architecture \(1 tensor\(s\) differ, e.g. fc.weight \(shape"):
        method.load_init(model, wrong, "w.pt")
    with pytest.raises(ConfigError, match=r"run.init_from.*holds something else"):
        method.load_init(model, {"epoch": 3}, "e.pt")
    small = config.cli_config([*RESNET18[:-2], "adn_resnet.width=8", *SMALL])  # another ADN network's checkpoint
    ckpt = get_method("adn").cls(small).build_model(data.dataset_info(small.data)).state_dict()
    with pytest.raises(ConfigError, match=r"run.init_from.*tensor\(s\) differ, e.g. \S+ \(shape differs\)"):
        method.load_init(model, ckpt, "small.pt")


def test_preflight_refuses_a_bad_init_file_and_passes_a_torchvision_one(tmp_path):
    _, good = resnet18_pt(tmp_path)
    cfg = config.cli_config([*RESNET18, *SMALL, f"run.init_from={good}"])
    preflight.check_config(cfg)
    preflight.check_init_from(cfg)  # read once, through the method's load_init
    torch.save(torchvision.models.resnet34(num_classes=CLASSES).state_dict(), tmp_path / "r34.pt")
    bad = config.cli_config([*RESNET18, *SMALL, f"run.init_from={tmp_path / 'r34.pt'}"])
    preflight.check_config(bad)  # building the model does not read the file (predicting later must not need it)
    with pytest.raises(ConfigError, match=r"run.init_from.*r34.pt.*torchvision state dict of its architecture \(\d+ tensor\(s\) differ, e.g. layer1.2"):
        preflight.check_init_from(bad)
    gone = config.cli_config([*RESNET18, *SMALL, f"run.init_from={tmp_path / 'nothing.pt'}"])
    with pytest.raises(ConfigError, match=r"run.init_from.*nothing.pt.*a readable .pt file"):
        preflight.check_init_from(gone)


def test_a_run_starts_from_torchvision_weights(in_tmp, capfd):
    tv, path = resnet18_pt(in_tmp)
    cfg = config.cli_config([*RESNET18, *SMALL, "epochs=1", "optim.lr=0", f"run.init_from={path}"])
    result = training.fit(cfg, "t-adn-init")
    out = capfd.readouterr()
    assert f"initialised from {path}" in out.out + out.err and result.metrics["epoch"] == 0
    trained = torch.load(in_tmp / "dynlab_runs" / "t-adn-init" / "epoch_0000" / training.STATE_FILE, weights_only=True)["model"]
    # lr 0: the weights are still torchvision's (only running statistics moved), and the skip-aware
    # norms' weights and biases are still copies of torchvision's norms
    for k, v in tv.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(trained[k], v), k
    assert torch.equal(trained["layer3.0.skip_norms.downsample.weight"], tv.layer3[0].downsample[1].weight)
    assert torch.equal(trained["layer4.0.skip_norms.bn2.bias"], tv.layer4[0].bn2.bias)
