"""IMTA: ISC (gradient path, costs), OFA (loss, teacher), phase II (init, freezing), bad input.
Expected values are derived by hand or computed from the formulas, never by the method's own code."""

from __future__ import annotations

import math

import pytest
import torch

import methods  # noqa: F401  (registers backbones and methods)
from dynlab import config, registry, steps, training
from dynlab.data import static_info
from dynlab.errors import ConfigError
from methods.imta import ofa_loss

DIGITS = static_info("digits")  # 10 classes, 32x32: MSDNet's CIFAR heads, 128-wide pooled features
C, W = 10, 128


def build(*args: str, info=DIGITS):
    cfg = config.cli_config(["method=imta", *args])
    method = registry.get_method("imta").cls(cfg)
    return cfg, method, method.build_model(info)


@pytest.fixture
def phase1(tmp_path):
    """A phase-I network (default tiny MSDNet, 4 exits) saved as best.pt in a checkpoint folder."""
    torch.manual_seed(0)
    _, _, model = build()
    with torch.no_grad():  # weights that are not the defaults, so that loading is visible
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "phase1"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "best.pt")
    return folder, model


def phase2(folder, *args):
    cfg, method, model = build("imta.phase=2", f"run.init_from={folder}", *args)
    method.load_init(model, training.read_weights(str(folder)), str(folder))
    return cfg, method, model


# ---- ISC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False])
def test_isc_detach_stops_the_gradient_into_the_earlier_exit(phase1, detach):
    # fresh classifiers: with the default (phase I's, ISC columns at zero) the ISC module is silent on step one
    _, _, model = phase2(phase1[0], "imta.isc=true", f"imta.isc_detach={detach}", "imta.freeze=none", "imta.classifier_init=fresh")
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x)[1], y).backward()  # exit 1's loss only
    g = model.classifiers[0].weight.grad  # exit 0's classifier reaches exit 1 only through ISC
    if detach:
        assert g is None or not g.any()
    else:
        assert g is not None and g.abs().sum() > 0
    assert model.isc[0][0].weight.grad.abs().sum() > 0  # the ISC module itself learns either way


def test_exit_costs_include_isc(phase1):
    _, _, base = build()  # phase I: the same backbone, its own heads
    _, _, plain2 = phase2(phase1[0])  # phase II without ISC: new classifiers of the old Linear's size
    _, _, isc2 = phase2(phase1[0], "imta.isc=true")
    assert plain2.cost_table.macs == base.cost_table.macs and plain2.cost_table.params == base.cost_table.params
    # per ISC module (exits 1..3): Linear(C -> W) = C*W + W, ReLU = W ops (BN not counted), and the
    # classifier reading 2W instead of W inputs: W*C more weights
    per_isc_macs = (C * W + W) + W + W * C
    per_isc_params = (C * W + W) + 2 * W + W * C  # Linear, BN1d weight and bias, wider classifier
    for k in range(4):
        assert isc2.cost_table.macs[k] - base.cost_table.macs[k] == k * per_isc_macs
        assert isc2.cost_table.params[k] - base.cost_table.params[k] == k * per_isc_params


# ---- OFA ----------------------------------------------------------------------------------------


def _direct_ofa(z, y, alpha, T, per_class: bool, t2: bool = False):
    """The paper's Eq. 7-8 written out: L_i = alpha CE_i + (1 - alpha) KLD_i for every exit but the
    last (plain CE), KLD_i = sum_c q_K,c log(q_K,c / q_i,c) with q = softmax(z / T), the teacher z_K
    detached, averaged over the batch. No T^2 factor (``t2``: Hinton et al.'s scaling instead)."""
    t = torch.exp(z[-1].detach() / T)
    t = t / t.sum(1, keepdim=True)
    total = 0.0
    for i, zi in enumerate(z):
        p = torch.exp(zi) / torch.exp(zi).sum(1, keepdim=True)
        ce = -torch.log(p[torch.arange(len(y)), y]).mean()
        if i == len(z) - 1:
            total = total + ce
            continue
        q = torch.exp(zi / T) / torch.exp(zi / T).sum(1, keepdim=True)
        kl = (t * (torch.log(t) - torch.log(q))).sum(1).mean()
        if per_class:
            kl = kl / zi.shape[1]  # element-wise mean over batch and classes
        total = total + alpha * ce + (1 - alpha) * (T * T if t2 else 1.0) * kl
    return total


@pytest.mark.parametrize("alpha, T, reduction, t2", [(0.9, 1.0, "batchmean", False), (0.1, 3.0, "batchmean", False), (0.3, 2.0, "mean", False), (0.1, 3.0, "batchmean", True)])
def test_ofa_loss_equals_the_papers_equation(alpha, T, reduction, t2):
    torch.manual_seed(0)
    z = [torch.randn(5, 7, dtype=torch.float64) * 2 for _ in range(3)]
    y = torch.tensor([0, 3, 6, 2, 2])
    loss, metrics = ofa_loss([t.float() for t in z], y, torch.ones(3), alpha, T, reduction, t2=t2)
    assert loss.item() == pytest.approx(_direct_ofa(z, y, alpha, T, reduction == "mean", t2).item(), rel=1e-5)
    assert set(metrics) >= {"loss", "kd_exit0", "kd_exit1", "loss_exit2", "acc_exit2"}


def test_the_default_ofa_term_has_no_t_squared_factor(phase1):
    """The method's default is the paper's form: at T = 3 a T^2 factor would make the KL term 9 x
    stronger, and the loss would equal the Hinton form instead."""
    folder, _ = phase1
    cfg, method, model = phase2(folder, "imta.ofa=true", "imta.alpha=0.5", "imta.temperature=3")
    assert cfg.method_cfg.kd_t2 is False
    model.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    metrics = method.train_step(model, (x, y), lambda loss: None)
    with torch.no_grad():
        z = [o.double() for o in model(x)]
    paper, hinton = _direct_ofa(z, y, 0.5, 3.0, False), _direct_ofa(z, y, 0.5, 3.0, False, t2=True)
    assert abs(paper.item() - hinton.item()) > 1e-3  # the two forms differ here
    assert metrics["loss"].item() == pytest.approx(paper.item(), rel=1e-4)


def test_ofa_teacher_gets_no_gradient_from_the_kd_terms():
    torch.manual_seed(0)
    z = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    y = torch.tensor([1, 0, 4, 2])
    ofa_loss(z, y, torch.ones(3), alpha=0.0, T=2.0)[0].backward()  # early exits: KD only
    teacher = z[-1].detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(teacher, y).backward()
    assert torch.allclose(z[-1].grad, teacher.grad)  # exactly its own CE's gradient
    assert z[0].grad.abs().sum() > 0  # the students do learn from it


# ---- phase II ------------------------------------------------------------------------------------


def _one_sgd_step(cfg, method, model):
    opt = training.build_optimizer(model, cfg)
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt.zero_grad()
    method.train_step(model, (x, y), lambda loss: loss.backward())
    opt.step()


@pytest.mark.parametrize("freeze", ["phase1", "none"])
def test_phase2_changes_exactly_the_trainable_parameters(phase1, freeze):
    folder, p1 = phase1
    # fresh classifiers, so that every new part moves on the first step (the default, phase I's
    # classifiers, is test_phase2_last_layer_of_each_classifier_trains_exactly_the_new_parts)
    cfg, method, model = phase2(folder, "imta.isc=true", "imta.ofa=true", f"imta.freeze={freeze}", "imta.classifier_init=fresh")
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in p1.state_dict().items():  # phase I's weights are in
        assert torch.equal(loaded[k], v)
    _one_sgd_step(cfg, method, model)
    after = model.state_dict()
    changed = {k for k in loaded if not torch.equal(loaded[k], after[k])}
    params = {k for k, _ in model.named_parameters()}
    new = {k for k in params if k.startswith(("classifiers.", "isc."))}
    old_linear = {k for k in params if ".linear." in k}  # phase I's Linear layers: not run in phase II
    assert new and new <= changed
    if freeze == "phase1":  # the whole phase-I network, its BatchNorm statistics included
        assert all(k.startswith(("classifiers.", "isc.")) for k in changed)
    else:
        assert (params - old_linear) <= changed and not (old_linear & changed)


def test_phase2_last_layer_of_each_classifier_trains_exactly_the_new_parts(phase1):
    """The paper's phase II ("fine-tune only the last layer of each classifier"): classifier_init=phase1
    with freeze=phase1. The new classifiers start as phase I's Linear layers (ISC columns at zero);
    the first step moves the classifiers only (the ISC path reaches the loss through those zero
    columns: zero gradient; its BatchNorm statistics do move, in train mode), the second also the
    ISC modules; nothing of phase I ever changes, BatchNorm statistics included. No weight decay, so
    that a parameter moves only by its gradient."""
    folder, p1 = phase1
    cfg, method, model = phase2(folder, "imta.isc=true", "imta.ofa=true", "imta.classifier_init=phase1", "imta.freeze=phase1", "optim.weight_decay=0")
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in p1.state_dict().items():
        assert torch.equal(loaded[k], v)
    for k, head in enumerate(p1.backbone.heads):  # each new classifier = phase I's Linear of its exit
        w = model.classifiers[k].weight
        assert w.shape == (C, W * (2 if k else 1))
        assert torch.equal(w[:, :W], head.linear.weight) and torch.equal(model.classifiers[k].bias, head.linear.bias)
        assert not w[:, W:].any()  # ISC columns start at zero
    params = {k for k, _ in model.named_parameters()}
    classifiers = {k for k in params if k.startswith("classifiers.")}
    isc_params = {k for k in params if k.startswith("isc.")}
    isc_stats = {k for k in loaded if k.startswith("isc.") and k not in params}  # BN1d running statistics
    assert {k for k, p in model.named_parameters() if p.requires_grad} == classifiers | isc_params
    assert len(classifiers) == 8 and len(isc_params) == 3 * 4 and len(isc_stats) == 3 * 3

    _one_sgd_step(cfg, method, model)
    after = model.state_dict()
    assert {k for k in loaded if not torch.equal(loaded[k], after[k])} == classifiers | isc_stats
    for k, p in model.named_parameters():
        if k in isc_params:  # trainable, but silent on the first step
            assert p.grad is not None and not p.grad.any(), k
        elif k in classifiers:
            assert p.grad is not None and p.grad.abs().sum() > 0, k
        else:
            assert p.grad is None, k

    _one_sgd_step(cfg, method, model)  # the ISC columns are non-zero now: the ISC modules learn too
    after = model.state_dict()
    changed = {k for k in loaded if not torch.equal(loaded[k], after[k])}
    # the bias of ISC's Linear feeds a training-mode BatchNorm, which subtracts it again: its
    # gradient is zero but for rounding, so it may or may not move (by ~1e-9)
    pre_bn_bias = {f"isc.{i}.0.bias" for i in range(3)}
    assert classifiers | (isc_params - pre_bn_bias) | isc_stats <= changed <= classifiers | isc_params | isc_stats
    assert all((after[k] - loaded[k]).abs().max() < 1e-6 for k in pre_bn_bias)


def test_by_default_phase2_starts_at_phase_one_predictions_so_the_ofa_teacher_is_trained(phase1):
    """The paper's phase II fine-tunes the classifiers' last layer, and its OFA teacher is "the last
    classifier", which already has "the best accuracy": by default (no imta.classifier_init given)
    every exit of the phase-II network, the teacher among them, predicts what phase I's does from
    the first step. The reference code's fresh classifiers (a switch) do not."""
    folder, p1 = phase1
    cfg, _, model = phase2(folder, "imta.isc=true", "imta.ofa=true")
    assert (cfg.method_cfg.classifier_init, cfg.method_cfg.ofa_teacher) == ("phase1", "last_exit")
    p1.eval(), model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(p1(x), model(x)):
            assert torch.allclose(a, b, atol=1e-5)
        _, _, fresh = phase2(folder, "imta.isc=true", "imta.ofa=true", "imta.classifier_init=fresh")
        fresh.eval()
        assert not torch.allclose(p1(x)[-1], fresh(x)[-1], atol=1e-3)


def test_phase2_real_early_exit_matches_forward(phase1):
    from dynlab.early_exit import early_exit

    _, method, model = phase2(phase1[0], "imta.isc=true")
    model.eval()
    torch.manual_seed(3)
    x = torch.randn(6, 3, 32, 32)
    preds = method.predict(model, x)
    res = early_exit(model, x, torch.zeros(4, dtype=torch.float64))  # threshold 0: all leave at exit 0
    assert torch.equal(res.pred, preds.logits[0].argmax(1))
    res = early_exit(model, x, torch.full((4,), 2.0, dtype=torch.float64))  # nobody confident: last exit
    assert torch.equal(res.pred, preds.logits[-1].argmax(1)) and torch.equal(res.exit, torch.full((6,), 3))
    # thresholds between the samples' confidences: the engine (ISC state carried along) exits where
    # the simulated rule does, with the same predictions
    from dynlab.evaluation import confidence, exit_indices

    conf, pred = confidence(preds.logits)
    t = conf.median(dim=1).values.double()
    res = early_exit(model, x, t)
    want = exit_indices(conf, t)
    assert torch.equal(res.exit, want) and torch.equal(res.pred, pred[want, torch.arange(6)])
    assert len(set(want.tolist())) > 1  # samples leave at different exits


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, key, fragment",
    [
        (["imta.alpha=1.5"], "imta.alpha", "<= 1.0"),
        (["imta.alpha=-0.1"], "imta.alpha", ">= 0.0"),
        (["imta.temperature=0"], "imta.temperature", "> 0"),
        (["imta.temperature=-1"], "imta.temperature", ">= 0.0"),
        (["imta.isc=true"], "imta.isc", "phase=2"),
    ],
)
def test_bad_distillation_settings_fail_in_the_config(args, key, fragment):
    with pytest.raises(ConfigError) as info:
        config.cli_config(["method=imta", *args])
    assert info.value.key == key and fragment in str(info.value)


def test_phase2_inputs_are_checked_by_the_preflight(phase1, tmp_path):
    """The model build refuses phase 2 without weights; preflight.check_init_from reads the file
    once, through the method's load_init (a model built later, to predict, does not read it)."""
    from dynlab import preflight

    cfg = config.cli_config(["method=imta", "imta.phase=2"])
    with pytest.raises(ConfigError, match=r"'run.init_from' = '' .*phase-I checkpoint"):
        steps.check_model(cfg, DIGITS)
    cfg = config.cli_config(["method=imta", "imta.phase=2", f"run.init_from={tmp_path / 'nothing'}"])
    steps.check_model(cfg, DIGITS)  # the build does not read the file
    with pytest.raises(ConfigError, match=r"run.init_from.*best.pt"):
        preflight.check_init_from(cfg)
    other = config.cli_config(["method=imta", "imta.phase=2", "msdnet.n_blocks=3", f"run.init_from={phase1[0]}"])
    with pytest.raises(ConfigError, match=r"run.init_from.*checkpoint of this msdnet \(\d+ tensor\(s\) differ"):
        preflight.check_init_from(other)
    torch.save({"epoch": 3}, tmp_path / "not-weights.pt")
    with pytest.raises(ConfigError, match=r"run.init_from.*a state dict .*this file holds 'epoch' -> int"):
        preflight.check_init_from(config.cli_config(["method=imta", "imta.phase=2", f"run.init_from={tmp_path / 'not-weights.pt'}"]))
    preflight.check_init_from(config.cli_config(["method=imta", "imta.phase=2", f"run.init_from={phase1[0]}"]))  # fine
    assert math.isclose(config.cli_config(["method=imta"]).method_cfg.alpha, 0.9)


def test_phase2_from_a_joint_checkpoint_and_on_ranet(tmp_path):
    """A bare backbone's checkpoint (method=joint) is phase I without GE: its keys map under backbone."""
    torch.manual_seed(0)
    joint_cfg = config.cli_config(["method=joint", "backbone=ranet"])
    joint = registry.get_method("joint").cls(joint_cfg).build_model(DIGITS)
    torch.save(joint.state_dict(), tmp_path / "joint.pt")
    _, method, model = build("backbone=ranet", "imta.phase=2", "imta.isc=true", f"run.init_from={tmp_path / 'joint.pt'}")
    method.load_init(model, training.read_weights(str(tmp_path / "joint.pt")), "joint.pt")
    for k, v in joint.state_dict().items():
        assert torch.equal(model.state_dict()[f"backbone.{k}"], v)
    # RANet's exits: same per-ISC cost as MSDNet's (128-wide CIFAR heads)
    per_isc = (C * W + W) + W + W * C
    assert [b - a for a, b in zip(joint.cost_table.macs, model.cost_table.macs)] == [k * per_isc for k in range(4)]


def test_ofa_teacher_phase1_is_the_frozen_phase_one_head(phase1):
    folder, p1 = phase1
    cfg, method, model = phase2(folder, "imta.ofa=true", "imta.ofa_teacher=phase1", "imta.alpha=0.3", "imta.temperature=2")
    model.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    metrics = method.train_step(model, (x, y), lambda loss: None)
    p1.eval()
    with torch.no_grad():
        teacher = p1(x)[-1]  # phase I's own last exit (its BatchNorm frozen, as in the phase-II model)
        outputs = model(x)
    expected = _direct_ofa([*(o.double() for o in outputs[:-1]), teacher.double()], y, 0.3, 2.0, False)
    last_ce = torch.nn.functional.cross_entropy(outputs[-1].double(), y) - torch.nn.functional.cross_entropy(teacher.double(), y)
    assert metrics["loss"].item() == pytest.approx((expected + last_ce).item(), rel=1e-4)
    with pytest.raises(ConfigError, match="imta.ofa_teacher"):
        config.cli_config(["method=imta", "imta.ofa_teacher=phase1"])
