"""DMNN (issue 8): binary gates with straight-through gradients, executed cost, dense equivalence,
real skipping, training towards the FLOPs target, category mappings. No Ray; tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlab import config, data, registry
from dynlab.costs import CostCounter
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo
from methods.backbones.dmnn_resnet import DMNNResNet, bottleneck_block, DMNNResNetConfig, build_dmnn_resnet, subblock_width
from benchmarks.gated import set_open_rate
from methods.dmnn import DMNN, resource_losses

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
    rate_loss, flops_loss, _ = resource_losses(model, gates, 0.3)
    (F.cross_entropy(out["logits"], torch.zeros(16, dtype=torch.long)) + rate_loss + flops_loss).backward()
    for b, block in enumerate(model.blocks):
        ctrl = block.controller
        assert ctrl.gate.weight.grad is not None and ctrl.gate.weight.grad.abs().sum() > 0, f"block {b} gate layer"
        assert ctrl.embed.weight.grad.abs().sum() > 0, f"block {b} embedding"
    assert model.blocks[1].controller.prev.weight.grad.abs().sum() > 0  # the state path h_prev -> h
    model.eval()
    assert set(model(torch.randn(16, 3, 8, 8))["gates"].unique().tolist()) <= {0.0, 1.0}


def test_eval_gates_have_no_noise_and_follow_the_gate_bias():
    model = tiny()
    model.eval()
    x = torch.randn(32, 3, 8, 8)
    assert torch.equal(model(x)["gates"], model(x)["gates"])  # deterministic at evaluation
    assert model(x)["gates"].mean() == 1.0  # bias log(0.85/0.15) > 0 and tiny weights: all open


# Hand-derived MACs for TINY on 8x8 inputs (conv: Cin*Cout*k*k*Hout*Wout; ReLU: elements;
# pool: C*Hout*Wout*k; linear: in*out + out). Sub-block widths: subblock_width -> 1 (block0), 3 (block1).
SUB0 = 4 * 1 * 64 + 1 * 64 + 9 * 1 * 1 * 64 + 1 * 64 + 1 * 4 * 64  # 1216
SUB1 = 4 * 3 * 64 + 3 * 64 + 9 * 3 * 3 * 16 + 3 * 16 + 3 * 8 * 16  # 2688
CTRL0 = 4 * 64 + (4 * 3 + 3) + 3 + (3 * 4 + 4)  # GAP, embed, ReLU, gate logits: 290
CTRL1 = 4 * 64 + (4 * 3 + 3) + 3 + (3 * 3 + 3) + 3 + (3 * 4 + 4)  # + the state FC and its ReLU: 305
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
    with torch.no_grad():
        for block in model.blocks:  # input-dependent gates
            nn.init.normal_(block.controller.gate.weight, 0.0, 3.0)
    model.eval()
    x = torch.randn(12, 3, 8, 8)
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


def _train_flops_rate(target: float, steps: int = 40) -> float:
    cfg = _resolve(f"dmnn.target_rate={target}", "dmnn.resource_weight=5", "dataset=digits")
    torch.manual_seed(0)
    bundle = data.build_datasets(cfg.data, 0)
    method = DMNN(cfg)
    model = method.build_model(bundle.info)
    params = [p for n, p in model.named_parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    step = 0
    model.train()
    while step < steps:
        for images, targets in loader:
            opt.zero_grad()
            method.train_step(model, (images, targets), lambda loss: loss.backward())
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()
    preds = method.predict(model, torch.stack([bundle.heldout[i][0] for i in range(200)]))
    return float(preds.costs.mean() / model.dense_macs)


def test_short_training_moves_the_flops_rate_towards_the_target():
    low, high = _train_flops_rate(0.2), _train_flops_rate(0.9)
    # measured (40 steps of 64 digits, evaluated without noise on 200 held-out images): low 0.17x
    # (every gate closed: the fixed part and controllers), high 1.01x (every gate open + controllers)
    assert low < 0.45, low
    assert high > 0.75, high
    assert high - low > 0.3, (low, high)


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


def test_the_loop_logs_the_held_out_cost_rate_of_a_gated_network(in_tmp):
    """Each epoch's held-out score of a gated network carries its executed share of the dense cost
    at evaluation (no gate noise): equal to the mean cost of the final weights' held-out predictions."""
    from dynlab import data, training

    cfg = config.cli_config(["method=dmnn", "preset=dmnn-resnet-small", "epochs=1", "workers=0", "data.heldout=120", "data.batch_size=64", "eval.num_budgets=0", "eval.p_grid=false"])
    result = training.fit(cfg, "rate")
    method = registry.get_method("dmnn").cls(cfg)
    model = method.build_model(data.dataset_info(cfg.data))
    model.load_state_dict(torch.load(f"{result.checkpoint_dir}/state.pt", weights_only=True)["model"])
    model.eval()
    held = data.build_datasets(cfg.data, cfg.run.seed).heldout
    preds = method.predict(model, torch.stack([held[i][0] for i in range(len(held))]))
    expected = float(preds.costs.double().mean() / preds.full_cost)
    assert 0.0 < expected <= 1.2
    assert result.metrics["heldout/cost_rate"] == pytest.approx(expected, rel=1e-6)
