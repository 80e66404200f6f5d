"""DMNN (issues 8, 17): binary gates with straight-through gradients, the paper's controller,
resource losses against hand-computed values, executed cost, dense equivalence, real skipping,
category mappings; and trained networks (in-process, no Ray) whose gates route per image and per
category, whose evaluation cost follows the target, and which at lambda = 0 train like the same
network with its gates held open. Tiny models; the trainings are shared by module fixtures."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlab import config, data, gating, training
from dynlab.costs import CostCounter
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo
from methods.backbones.dmnn_resnet import DMNNResNet, bottleneck_block, DMNNResNetConfig, build_dmnn_resnet, subblock_width
from benchmarks.gated import set_open_rate
from methods.backbones.dmnn_common import Controller, decisions, sample_gates
from methods.dmnn import DMNN, flops_loss, gate_schedule, rate_loss, resource_losses, warmup_epochs

INFO = DatasetInfo("synthetic", 5, 8)
# stem 3->4; block0: 4 -> width 2 -> 4 (stride 1, identity); block1: 4 -> width 4 -> 8 (stride 2, projection)
TINY = DMNNResNetConfig(layers=[1, 1], widths=[2, 4], stem_channels=4, expansion=2, subblocks=2, hidden=3)


def tiny(**kw) -> DMNNResNet:
    torch.manual_seed(0)
    cfg = DMNNResNetConfig(**{**TINY.__dict__, **kw})
    return build_dmnn_resnet(cfg, INFO)


def test_gates_are_exactly_0_or_1_and_the_controllers_still_get_gradients():
    model = tiny()
    model.train()
    out = model(torch.randn(16, 3, 8, 8))
    gates = out["gates"]
    assert gates.shape == (16, 4)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0 < gates.detach().mean() < 1  # Gumbel noise opens some, closes others (init P(open) = 0.85)
    assert set(out["decisions"].detach().unique().tolist()) <= {0.0, 1.0}
    rate, flops, _ = resource_losses(model, out["decisions"], 0.3)  # the resource loss counts the decisions
    (F.cross_entropy(out["logits"], torch.zeros(16, dtype=torch.long)) + rate + flops).backward()
    for b, block in enumerate(model.blocks):
        ctrl = block.controller
        assert ctrl.gate.weight.grad is not None and ctrl.gate.weight.grad.abs().sum() > 0, f"block {b} gate layer"
        assert ctrl.embed.weight.grad.abs().sum() > 0, f"block {b} embedding"
    assert model.blocks[1].controller.prev.weight.grad.abs().sum() > 0  # the state path h_prev -> h
    model.eval()
    assert set(model(torch.randn(16, 3, 8, 8))["gates"].unique().tolist()) <= {0.0, 1.0}


def test_eval_gates_have_no_noise_and_are_the_decisions():
    model = tiny()
    model.eval()
    x = torch.randn(32, 3, 8, 8)
    out = model(x)
    assert torch.equal(out["gates"], model(x)["gates"])  # deterministic at evaluation
    assert torch.equal(out["gates"], out["decisions"])
    assert torch.equal(model.forward_skipping(x)[1], out["gates"])


def test_gumbel_gates_open_with_probability_sigmoid_of_the_gap_and_decisions_have_its_gradient():
    # Gumbel-max: with logits (0, d), P(open) = e^d / (1 + e^d) whatever the temperature
    torch.manual_seed(0)
    d = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    logits = torch.stack([torch.zeros(4), d], -1).expand(20000, 4, 2)
    for tau in (1.0, 0.3):
        rate = sample_gates(logits, True, tau).mean(0)
        assert rate.tolist() == pytest.approx([1 / (1 + math.exp(-v)) for v in d.tolist()], abs=0.015), tau
    # noise s: the difference of two Gumbels times s is logistic with scale s, so P(open) = sigmoid(d / s)
    half = sample_gates(logits, True, 1.0, noise=0.5).mean(0)
    assert half.tolist() == pytest.approx([1 / (1 + math.exp(-v / 0.5)) for v in d.tolist()], abs=0.015)
    # no noise: the evaluation decisions; backward: d/dz sigmoid((z1 - z0) / tau) = s (1 - s) / tau
    z = torch.tensor([[[0.3, -0.2], [0.0, 1.5]]], requires_grad=True)
    tau = 0.5
    g = decisions(z, tau)
    assert g.tolist() == [[0.0, 1.0]] == sample_gates(z.detach(), False, tau).tolist()
    g.sum().backward()
    for i, (z0, z1) in enumerate([(0.3, -0.2), (0.0, 1.5)]):
        s = 1 / (1 + math.exp(-(z1 - z0) / tau))
        assert z.grad[0, i].tolist() == pytest.approx([-s * (1 - s) / tau, s * (1 - s) / tau])


def test_the_controller_is_the_papers_form():
    """e = ReLU(BN(W_e GAP(x))), h = e + ReLU(BN(W_h h_prev)), logits W_g h + b_g, computed by hand
    (eval mode, hand-set BN statistics, eps 0)."""
    ctrl = Controller(2, 2, 1, True, 0.5, norm="batch")
    with torch.no_grad():
        ctrl.embed.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        ctrl.prev.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        ctrl.gate.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))  # rows: closed, open
        ctrl.gate.bias.copy_(torch.tensor([0.0, -0.5]))
        ctrl.embed_norm.running_mean.copy_(torch.tensor([1.0, 0.0]))
        ctrl.embed_norm.running_var.copy_(torch.tensor([4.0, 1.0]))
        ctrl.prev_norm.running_mean.copy_(torch.tensor([-3.0, 0.0]))
    ctrl.embed_norm.eps = ctrl.prev_norm.eps = 0.0
    ctrl.eval()
    x = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 1.0)]).unsqueeze(0)  # GAP = (3, 1)
    h_prev = torch.tensor([[1.0, -3.0]])
    # W_e s = (3, -1) -> BN (3 - 1) / 2, (-1 - 0) / 1 = (1, -1) -> ReLU (1, 0)
    # W_h h_prev = (-2, -3) -> BN (-2 + 3, -3) = (1, -3) -> ReLU (1, 0);  h = (2, 0)
    # logits: closed 0, open 1 * 2 + 2 * 0 - 0.5 = 1.5   (the old ReLU(e + W_h h_prev) gives h = (0, 0))
    logits, h = ctrl(x, h_prev)
    assert h.tolist() == [[2.0, 0.0]]
    assert logits.tolist() == [[[0.0, 1.5]]]
    first = Controller(2, 2, 1, False, 0.5, norm="none")  # the first block: h = e; no BN, biases kept
    with torch.no_grad():
        first.embed.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        first.embed.bias.copy_(torch.tensor([0.5, 0.0]))
    assert first(x, None)[1].tolist() == [[3.5, 0.0]]


def test_controller_prev_false_drops_the_previous_state_from_every_controller():
    """Table 4's rows without PREV: every block's gates read only its own input, so changing the
    state passed in leaves them unchanged; with PREV (default) every block but the first reads it."""
    with_prev, without = tiny(), tiny(controller_prev=False)
    ctrls = [m for m in with_prev.modules() if isinstance(m, Controller)]  # in block order
    assert [c.prev is not None for c in ctrls] == [False] + [True] * (len(ctrls) - 1)
    alone = [m for m in without.modules() if isinstance(m, Controller)]
    assert len(alone) == len(ctrls) and all(c.prev is None for c in alone)
    alone[-1].eval()
    x = torch.randn(3, alone[-1].embed.in_features, 4, 4)
    assert torch.equal(alone[-1](x, torch.zeros(3, 3))[0], alone[-1](x, torch.randn(3, 3))[0])
    assert sum(p.numel() for p in without.parameters()) < sum(p.numel() for p in with_prev.parameters())


class ConstantPool(nn.Module):
    """A controller's input replaced by a constant: ones [B, C, 1, 1] whatever the image."""

    def forward(self, x):
        return torch.ones(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype, device=x.device)


def constant_controllers(model) -> None:
    for block in model.blocks:
        block.controller.pool = ConstantPool()


def _logit_gaps(model, x) -> torch.Tensor:
    """Open-minus-closed logit of every gate [B, blocks * N] in training mode (batch statistics)
    without noise, every sub-block running."""
    model.train()
    h, z, gaps = None, model.stem(x), []
    with torch.no_grad():
        for block in model.blocks:
            logits, h = block.controller(z, h)
            gaps.append(logits[..., 1] - logits[..., 0])
            z = block.masked(z, torch.ones(len(x), model.n))
    return torch.cat(gaps, 1)


def _digits_model(*overrides):
    cfg = config.cli_config(["method=dmnn", "preset=dmnn-resnet-small", *overrides])
    torch.manual_seed(0)
    return DMNN(cfg).build_model(data.dataset_info(cfg.data))


@pytest.mark.parametrize("constant_input", [False, True])
def test_gate_logits_differ_across_images_at_initialisation(constant_input):
    """The gap between open and closed logits must vary across images from the start, or the
    Gumbel noise (std 1.8) decides every gate alike. Measured on 128 digits: BN controller 0.25-0.74
    per gate; without BN 0.007-0.06 (the first version: 0.03-0.19 with its own init)."""
    bundle = data.build_datasets(config.cli_config(["method=dmnn", "preset=dmnn-resnet-small"]).data, 0)
    x = torch.stack([bundle.train[i][0] for i in range(128)])
    model = _digits_model()
    if constant_input:
        constant_controllers(model)
    spread = _logit_gaps(model, x).std(0)
    assert (spread > 0.15).all() != constant_input, spread.tolist()
    if not constant_input:
        assert (_logit_gaps(_digits_model("dmnn_resnet.controller_norm=none"), x).std(0) < 0.1).all()  # why the BN


# Hand-derived MACs for TINY on 8x8 inputs (conv: Cin*Cout*k*k*Hout*Wout; ReLU: elements;
# pool: C*Hout*Wout*k; linear: in*out + out). Sub-block widths: subblock_width -> 1 (block0), 3 (block1).
SUB0 = 4 * 1 * 64 + 1 * 64 + 9 * 1 * 1 * 64 + 1 * 64 + 1 * 4 * 64  # 1216
SUB1 = 4 * 3 * 64 + 3 * 64 + 9 * 3 * 3 * 16 + 3 * 16 + 3 * 8 * 16  # 2688
# controllers: BN is not counted (folds into the FC at inference) and its FCs have no bias
CTRL0 = 4 * 64 + 4 * 3 + 3 + (3 * 4 + 4)  # GAP, embed, ReLU, gate logits: 287
CTRL1 = 4 * 64 + 4 * 3 + 3 + 3 * 3 + 3 + (3 * 4 + 4)  # + the state FC and its ReLU: 299
FIXED = 3 * 4 * 9 * 64 + 4 * 64 + 4 * 64 + 4 * 8 * 16 + 8 * 16 + 8 * 16 + (8 * 5 + 5)  # stem, ReLUs, shortcut, GAP, fc: 8237


def test_executed_macs_are_fixed_plus_open_subblocks_plus_controllers():
    assert (subblock_width(4, 2, 4, 2), subblock_width(4, 4, 8, 2)) == (1, 3)
    model = tiny()
    table = dict(zip(model.cost_table.names, model.cost_table.macs))
    assert table == {
        "fixed": FIXED, "block0.sub0": SUB0, "block0.sub1": SUB0, "block0.controller": CTRL0,
        "block1.sub0": SUB1, "block1.sub1": SUB1, "block1.controller": CTRL1, "dense total": FIXED + 2 * SUB0 + 2 * SUB1,
    }
    gates = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = [FIXED + CTRL0 + CTRL1 + SUB0 + SUB1, FIXED + CTRL0 + CTRL1, FIXED + CTRL0 + CTRL1 + 2 * SUB0 + 2 * SUB1]
    assert model.executed_macs(gates).tolist() == expected


def test_executed_macs_match_what_real_skipping_runs_sample_by_sample():
    model = tiny()
    model.eval()
    x = torch.randn(12, 3, 8, 8)
    set_open_rate(model, x, 0.5)  # input-dependent gates
    _, gates = model.forward_skipping(x)
    assert 0 < gates.mean() < 1
    for j in range(len(x)):  # count what actually executes for one sample (hooks of dynlab.costs)
        with CostCounter(model) as counter:
            model.forward_skipping(x[j : j + 1])
        assert counter.macs == pytest.approx(float(model.executed_macs(gates[j : j + 1])[0]), rel=1e-12)


def _dense_reference(model: DMNNResNet, x: torch.Tensor) -> torch.Tensor:
    """The plain network: every sub-block's output summed onto the shortcut, no gates involved."""
    x = model.stem(x)
    for block in model.blocks:
        out = block.shortcut(x)
        for sub in block.subs:
            out = out + sub(x)
        x = torch.relu(out)
    return model.head[2](torch.flatten(x.mean((2, 3), keepdim=True), 1))


@pytest.mark.parametrize("subblocks", [2, 4])
def test_every_gate_open_equals_the_dense_forward_of_the_same_weights(subblocks):
    model = tiny(subblocks=subblocks)
    model.eval()
    x = torch.randn(8, 3, 8, 8)
    ref = _dense_reference(model, x)
    model.force_gates = 1.0
    torch.testing.assert_close(model(x)["logits"], ref, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_skipping(x)[0], ref, rtol=1e-6, atol=1e-6)
    dense = build_dmnn_resnet(DMNNResNetConfig(**{**TINY.__dict__, "subblocks": subblocks, "gated": False}), INFO)
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(".controller." in k for k in unexpected)
    dense.eval()
    torch.testing.assert_close(dense(x)["logits"], ref, rtol=0, atol=0)


def test_split_blocks_keep_the_parameter_count_of_resnet50_bottlenecks():
    from torchvision.models.resnet import Bottleneck

    for c_in, width in [(64, 64), (256, 64), (256, 128), (512, 128), (1024, 256), (2048, 512)]:
        base = sum(p.numel() for p in Bottleneck(c_in, width).parameters())  # torchvision's block, no shortcut
        for n in (2, 4):
            subs = bottleneck_block(c_in, width, 4 * width, 1, n, None).subs
            split = sum(p.numel() for p in subs.parameters())
            split_convs = sum(m.weight.numel() for m in subs.modules() if isinstance(m, nn.Conv2d))
            base_convs = c_in * width + 9 * width * width + width * 4 * width  # eq. 1 of the paper
            assert abs(split_convs - base_convs) / base_convs < 0.02, (c_in, width, n, split_convs, base_convs)
            assert abs(split - base) / base < 0.05, (c_in, width, n, split, base)  # + each sub-block's own BatchNorms


def test_real_skipping_equals_masked_logits_and_later_subblocks_see_fewer_samples():
    torch.manual_seed(1)
    cfg = DMNNResNetConfig(layers=[1, 1, 1], widths=[2, 4, 4], stem_channels=4, expansion=2, subblocks=2, hidden=8)
    model = build_dmnn_resnet(cfg, INFO)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(64, 3, 8, 8) * (0.2 + 2 * torch.rand(64, 1, 1, 1)) + torch.randn(64, 3, 1, 1)
    set_open_rate(model, x, [0.9, 0.6, 0.3])  # input-dependent gates, more often closed deeper down
    masked = model(x)
    logits, gates = model.forward_skipping(x)
    assert torch.equal(gates, masked["gates"])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, masked["logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.argmax(1), masked["logits"].argmax(1))
    counts = torch.tensor(model.last_counts)  # [blocks, N]: samples each sub-block ran on
    assert torch.equal(counts.flatten(), gates.sum(0).long())
    per_block = counts.sum(1).tolist()
    assert per_block[0] > per_block[1] > per_block[2], per_block
    assert counts[-1].max() < len(x)


def _resolve(*extra):
    return config.resolve(["method=dmnn", "backbone=dmnn_resnet", "dmnn_resnet.layers=[1,1]", "dmnn_resnet.widths=[8,16]", "dmnn_resnet.stem_channels=8", "dmnn_resnet.expansion=1", "dmnn_resnet.subblocks=2", *extra])


def test_rate_and_flops_losses_follow_eqs_11_to_14():
    model = tiny()
    # 2 samples, block 0 (sub0, sub1), block 1 (sub0, sub1)
    gates = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    # block: r_0 = 3/4, r_1 = 2/4 -> ((0.75 - 0.5)^2 + 0^2) / 2
    assert float(rate_loss(gates, 2, 2, 0.5, "block")) == pytest.approx(0.03125)
    # per sub-block: rates 1, 0.5, 0.5, 0.5 -> (0.5^2 + 0 + 0 + 0) / 4
    assert float(rate_loss(gates, 2, 2, 0.5, "subblock")) == pytest.approx(0.0625)
    # eqs. 13-14 with the hand-counted MACs: F_n = fixed + controllers + open sub-blocks
    dense = FIXED + 2 * SUB0 + 2 * SUB1
    f = [(FIXED + CTRL0 + CTRL1 + SUB0 + 2 * SUB1) / dense, (FIXED + CTRL0 + CTRL1 + 2 * SUB0) / dense]
    loss, per_sample = flops_loss(model, gates, 0.4)
    assert per_sample.tolist() == pytest.approx(f)
    assert float(loss) == pytest.approx(((f[0] + f[1]) / 2 - 0.4) ** 2)


def test_the_warm_up_trains_without_the_resource_loss():
    cfg = _resolve("dataset=digits", "dmnn.resource_weight=3")
    method = DMNN(cfg)
    model = method.build_model(DatasetInfo("digits", 10, 32))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model.train()
    model.train_open = True
    m = method.train_step(model, (x, y), lambda loss: None)
    assert m["gate_rate"] == 1.0  # every gate open
    assert float(m["loss"]) == pytest.approx(float(m["ce"] + m["category_loss"]))
    model.train_open = False
    m = method.train_step(model, (x, y), lambda loss: None)
    assert float(m["loss"]) == pytest.approx(float(m["ce"] + m["category_loss"] + 3 * (m["rate_loss"] + m["flops_loss"])))


def test_epoch_hook_warms_up_then_anneals_noise_and_temperature():
    cfg = config.cli_config(["method=dmnn", "preset=dmnn-resnet-small", "epochs=12"])  # gate_warmup 0.15: 2 epochs
    method = DMNN(cfg)
    model = method.build_model(data.dataset_info(cfg.data))
    seen = {}
    for epoch in range(12):
        method.on_epoch_start(model, epoch, 12)
        seen[epoch] = (model.train_open, model.noise_scale, model.tau)
    assert seen[0][0] and seen[1][0] and not seen[2][0]
    assert seen[2][1:] == pytest.approx((1.0, 1.0))  # the first gated epoch: full noise, tau 1
    assert seen[11][1:] == pytest.approx((0.0, 0.5))  # the last: no noise, tau 0.5
    # epoch 6: p = (6 - 2) / (12 - 2 - 1) = 4/9 of the way; noise on a half cosine, tau geometric
    assert gate_schedule(method.mcfg, 6, 12)[1:] == pytest.approx((0.5 * (1 + math.cos(math.pi * 4 / 9)), 0.5 ** (4 / 9)))
    assert [warmup_epochs(f, e) for f, e in [(0.15, 12), (0.15, 3), (0.15, 1), (0.0, 12), (1.0, 5), (0.9, 4)]] == [2, 1, 0, 0, 5, 3]


def test_method_wires_categories_and_stage_weights():
    cfg = _resolve("dataset=digits")
    method = DMNN(cfg)
    model = method.build_model(DatasetInfo("digits", 10, 32))
    assert method.category_of.tolist() == data.BUILTIN_CATEGORIES["digits"]
    assert len(model.category_heads) == 2 and model.category_heads[0].out_features == 3
    assert method.stage_weights.tolist() == pytest.approx([1e-4, 1e-3])  # paper: 1e-4, x10 per stage
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    assert [c.shape for c in out["categories"]] == [(4, 3), (4, 3)]
    model.eval()
    assert model(torch.randn(4, 3, 32, 32))["categories"] == []  # training only
    with pytest.raises(ConfigError, match="dmnn.category_weights"):
        DMNN(_resolve("dataset=digits", "dmnn.category_weights=[1,2,3]")).build_model(DatasetInfo("digits", 10, 32))


def test_a_mapping_file_with_a_missing_class_is_a_clear_error(tmp_path):
    csv = tmp_path / "groups.csv"
    csv.write_text("class,category\n" + "".join(f"{c},{c % 3}\n" for c in range(10) if c != 7))
    with pytest.raises(ConfigError) as err:
        data.load_categories(csv, 10, key="dmnn.categories")
    msg = str(err.value)
    assert "dmnn.categories" in msg and str(csv) in msg and "class(es) 7 missing" in msg and "10 classes" in msg

    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({str(c): (0 if c < 5 else 2) for c in range(10)}))
    with pytest.raises(ConfigError, match=r"contiguous categories 0..K-1.*missing \[1\]"):
        data.load_categories(gap, 10, key="dmnn.categories")

    named = tmp_path / "named.json"
    named.write_text(json.dumps({"cat": 1, "dog": 1, "car": 0}))
    assert data.load_categories(named, 3, ["car", "cat", "dog"]) == [0, 1, 1]
    assert data.load_categories(_write(tmp_path / "ok.csv", "0,1\n1,0\n2,1\n"), 3) == [1, 0, 1]  # no header

    cfg = _resolve("dataset=digits", f"dmnn.categories={csv}")
    with pytest.raises(ConfigError, match="dmnn.categories"):
        DMNN(cfg).build_model(DatasetInfo("digits", 10, 32))


def _write(path, text):
    path.write_text(text)
    return path


def test_builtin_groupings_are_valid_mappings():
    for name, mapping in data.BUILTIN_CATEGORIES.items():
        assert data.check_categories(mapping, 10, "categories", name) == mapping
    assert data.class_categories("none", config.DataConfig(name="digits"), 10) is None
    assert data.class_categories("auto", config.DataConfig(name="synthetic"), 10) is None


def test_mobilenetv2_gated_blocks_open_equal_the_dense_network_and_skipping_equals_masked():
    from methods.backbones.dmnn_common import GatedBlock
    from methods.backbones.dmnn_mobilenet import DMNNMobileNetV2Config, build_dmnn_mobilenetv2

    torch.manual_seed(0)
    model = build_dmnn_mobilenetv2(DMNNMobileNetV2Config(width_mult=0.25, stem="cifar", subblocks=2, dropout=0.0), DatasetInfo("cifar10", 10, 32))
    model.eval()
    x = torch.randn(16, 3, 32, 32) * (0.2 + 2 * torch.rand(16, 1, 1, 1))

    def dense(x):  # MobileNetV2: residual blocks add their sub-blocks to x, no activation after
        x = model.stem(x)
        for layer in model.layers:
            if isinstance(layer, GatedBlock):
                out = x
                for sub in layer.subs:
                    out = out + sub(x)
                x = out
            else:
                x = layer(x)
        return model.head(x)

    model.force_gates = 1.0
    torch.testing.assert_close(model(x)["logits"], dense(x), rtol=0, atol=0)
    model.force_gates = None
    set_open_rate(model, x, 0.5)
    masked = model(x)
    logits, gates = model.forward_skipping(x)
    assert torch.equal(gates, masked["gates"]) and 0.3 < float(gates.mean()) < 0.7
    torch.testing.assert_close(logits, masked["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.tensor(model.last_counts).flatten(), gates.sum(0).long())


def test_controllers_get_their_own_learning_rate_and_no_weight_decay():
    from dynlab import config, data, training
    from dynlab.registry import get_method

    cfg = config.cli_config(["method=dmnn", "preset=dmnn-resnet-small", "optim.lr=0.1", "optim.weight_decay=1e-4", "dmnn.gate_lr_scale=0.5"])
    method = get_method("dmnn").cls(cfg)
    model = method.build_model(data.dataset_info(cfg.data))
    opt = training.build_optimizer(model, cfg, method)
    named = {id(p): n for n, p in model.named_parameters()}
    main, gates = opt.param_groups
    assert main["lr"] == 0.1 and main["weight_decay"] == 1e-4
    assert gates["lr"] == 0.05 and gates["weight_decay"] == 0.0
    assert gates["params"] and all(".controller." in named[id(p)] for p in gates["params"])
    assert not any(".controller." in named[id(p)] for p in main["params"])
    assert len(main["params"]) + len(gates["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------- trained networks (in-process)

FIT = ["method=dmnn", "preset=dmnn-resnet-small", "workers=0", "eval.num_budgets=0", "eval.p_grid=false", "data.image_size=16", "data.augment=false"]
FIT_EPOCHS = 6


def _fit(root, name: str, *overrides) -> dict:
    """Train in this process (Ray Train's local mode: no Ray started) and predict the held-out and
    test splits with the kept (best.pt) weights; returns what the tests read."""
    cfg = config.cli_config([*FIT, f"run.storage_path={root}", f"epochs={FIT_EPOCHS}", *overrides])
    t0 = time.time()
    result = training.fit(cfg, name)
    bundle = data.build_datasets(cfg.data, cfg.run.seed)
    method, model = training.load_trained(cfg, result.checkpoint_dir, bundle.info)
    history = torch.load(f"{result.checkpoint_dir}/state.pt", weights_only=True)["history"]
    out = {"cfg": cfg, "method": method, "model": model, "metrics": result.metrics, "history": history, "seconds": time.time() - t0}
    for split in ("heldout", "test"):
        out[split] = training.predict_dataset(method, model, getattr(bundle, split), 256, torch.device("cpu"))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shared trainings: gated at targets 0.4 and 0.7, gated at lambda = 0, and the same network
    trained with every gate held open."""
    root = tmp_path_factory.mktemp("dmnn_fits")
    runs = {t: _fit(root, f"t{t}", f"dmnn.target_rate={t}") for t in (0.4, 0.7)}
    runs["lambda0"] = _fit(root, "lambda0", "dmnn.resource_weight=0")
    runs["open"] = _fit(root, "open", "dmnn.resource_weight=0", "dmnn.gate_warmup=1.0")
    return runs


def _cost_rate(preds) -> float:
    return float(preds.costs.double().mean() / preds.full_cost)


def _acc(preds_labels) -> float:
    preds, labels = preds_labels
    return float((preds.logits.argmax(1) == labels).double().mean())


@pytest.mark.parametrize("constant_input", [False, True])
def test_trained_gates_route_by_image_and_by_category(trained, constant_input):
    """The held-out decisions of a trained network differ across images and across the digits'
    3 categories; with the controllers' input replaced by a constant (same weights) they cannot."""
    run = trained[0.4]
    model, cfg = copy.deepcopy(run["model"]), run["cfg"]
    if constant_input:
        constant_controllers(model)
    held = data.build_datasets(cfg.data, cfg.run.seed).heldout
    preds, labels = training.predict_dataset(run["method"], model, held, 256, torch.device("cpu"))
    patterns = {}
    for row in preds.gates.long().tolist():
        patterns[tuple(row)] = patterns.get(tuple(row), 0) + 1
    off_common = 1 - max(patterns.values()) / len(labels)
    spread = gating.category_spread(gating.rates_by_category(preds.gates, model.n, labels, data.BUILTIN_CATEGORIES["digits"]))
    assert (spread >= 0.2) == (not constant_input), spread
    assert (off_common >= 0.1) == (not constant_input), off_common


@pytest.mark.parametrize("target", [0.4, 0.7])
def test_evaluation_cost_follows_the_target(trained, target):
    run = trained[target]
    cost = _cost_rate(run["heldout"][0])
    assert target - 0.10 <= cost <= target + 0.12, cost
    assert abs(run["history"][-1]["train/flops_rate"] - run["history"][-1]["heldout/cost_rate"]) <= 0.05  # what training pushes is what evaluation measures
    assert run["metrics"]["best_meets_target"] == 1.0
    assert run["metrics"]["best_cost_rate"] == pytest.approx(run["history"][int(run["metrics"]["best_epoch"])]["heldout/cost_rate"])
    assert run["history"][0]["train/gate_rate"] == 1.0 and run["history"][-1]["train/gate_rate"] < 0.9  # the loop ran the warm-up hook


def test_the_cost_rises_with_the_target(trained):
    assert _cost_rate(trained[0.7]["heldout"][0]) - _cost_rate(trained[0.4]["heldout"][0]) >= 0.2


def test_without_the_resource_loss_the_gated_network_trains_like_its_gates_held_open(trained):
    gated, held_open = trained["lambda0"], trained["open"]
    acc_gated = _acc(gated["test"])
    model = held_open["model"]
    model.force_gates = 1.0
    acc_open = _acc(training.predict_dataset(held_open["method"], model, data.build_datasets(held_open["cfg"].data, 0).test, 256, torch.device("cpu")))
    n = len(gated["test"][1])
    noise = 3 * math.sqrt(acc_gated * (1 - acc_gated) / n + acc_open * (1 - acc_open) / n)  # 3 standard errors of the difference
    assert abs(acc_gated - acc_open) <= noise, (acc_gated, acc_open, noise)
    assert _cost_rate(gated["test"][0]) >= 0.9


def test_selection_keeps_the_best_epoch_within_the_cost_band():
    band = (0.4, 0.62)
    epochs = [(90.0, 1.0), (80.0, 0.55), (85.0, 0.52), (95.0, 0.30)]  # (held-out accuracy, cost rate)
    scores = [training.selection_score(a, c, band) for a, c in epochs]
    assert max(range(4), key=scores.__getitem__) == 2  # the best accuracy among the in-band epochs
    assert scores[0] < 0 and scores[3] < 0
    outside = [training.selection_score(a, c, band) for a, c in [(90.0, 1.0), (50.0, 0.7), (95.0, 0.2)]]
    assert max(range(3), key=outside.__getitem__) == 1 and max(outside) < 0  # none in band: the closest (0.08 above)
    assert training.selection_score(70.0, 0.9, None) == 70.0


def test_a_run_whose_cost_never_meets_the_target_says_so_and_logs_the_held_out_cost(tmp_path, capfd):
    """Gates held open cannot meet a 0.3 target: the kept epoch is flagged and the line printed. The
    logged held-out cost rate equals the mean cost of the kept weights' held-out predictions."""
    run = _fit(tmp_path, "never", "epochs=1", "dmnn.target_rate=0.3", "dmnn.gate_warmup=1.0", "data.heldout=120")  # gates held open
    assert "no epoch's held-out cost was within [0.20, 0.42]" in capfd.readouterr().out
    m = run["metrics"]
    assert m["best_meets_target"] == 0.0 and m["heldout/meets_target"] == 0.0
    expected = _cost_rate(run["heldout"][0])
    assert 0.42 < expected <= 1.2
    assert m["heldout/cost_rate"] == pytest.approx(expected, rel=1e-6) == m["best_cost_rate"]
