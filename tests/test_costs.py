"""The cost counter (dynlab.costs) against hand-computed numbers, and the pipelines.costs command."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynlab import costs
from dynlab.costs import CostTable, measure_exits, measure_total

ROOT = Path(__file__).resolve().parents[1]


def tiny_model() -> nn.Sequential:
    # 1x3x8x8 -> conv 4x8x8 -> BN -> ReLU -> maxpool 4x4x4 -> avgpool 4x2x2 -> flatten 16 -> linear 5
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


TINY_MACS = (
    3 * 4 * 3 * 3 * 8 * 8  # conv: Cin*Cout*k*k*Hout*Wout, bias not counted
    + 4 * 8 * 8  # ReLU: one per input element
    + 4 * 4 * 4 * 2 * 2  # max pool: C*Hout*Wout*k*k
    + 4 * 2 * 2 * 2 * 2  # avg pool
    + 16 * 5 + 5  # linear: weights + bias
)
TINY_PARAMS = (3 * 4 * 9 + 4) + (4 + 4) + (16 * 5 + 5)  # conv, BN (weight+bias; buffers excluded), linear


def test_hand_computed_tiny_model():
    assert TINY_MACS == 6912 + 256 + 256 + 64 + 85
    macs, params = measure_total(tiny_model(), (1, 3, 8, 8))
    assert macs == TINY_MACS
    assert params == TINY_PARAMS


def test_input_shape_forms_and_batch_are_per_sample():
    m = tiny_model()
    assert measure_total(m, (3, 8, 8)) == measure_total(m, (1, 3, 8, 8)) == measure_total(m, (4, 3, 8, 8))


def test_grouped_conv_and_no_bias():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), nn.Conv2d(8, 2, 1, stride=2))
    macs, params = measure_total(m, (1, 4, 6, 6))
    assert macs == 4 * 8 * 9 * 6 * 6 / 2 + 8 * 2 * 1 * 3 * 3
    assert params == 8 * 2 * 9 + (8 * 2 + 2)


def test_adaptive_pool_and_relu6():
    m = nn.Sequential(nn.ReLU6(), nn.AdaptiveAvgPool2d(1))
    macs, params = measure_total(m, (1, 5, 4, 4))
    assert macs == 5 * 16 + 5 * 1 * 1 * 16
    assert params == 0


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        x = self.conv(self.conv(x))
        return self.fc(x.flatten(1))


def test_module_run_twice_counts_macs_twice_params_once():
    macs, params = measure_total(Twice(), (1, 2, 4, 4))
    assert macs == 2 * (2 * 2 * 9 * 16) + (32 * 3 + 3)
    assert params == (2 * 2 * 9 + 2) + (32 * 3 + 3)


class TwoExits(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk1 = nn.Conv2d(1, 2, 1)  # 1x4x4 -> 2x4x4: 2*16 = 32 MACs, 4 params
        self.head1 = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))  # 99 MACs, 99 params
        self.trunk2 = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 1))  # 32 + 4*16 = 96 MACs, 6 params
        self.head2 = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x):
        h = self.trunk1(x)
        out1 = self.head1(h)
        h = self.trunk2(h)
        return [out1, self.head2(h)]


def test_exits_are_cumulative_and_include_earlier_heads():
    m = TwoExits()
    table = measure_exits(m, (1, 1, 4, 4), [m.head1, m.head2])
    assert table.macs == [32 + 99, 32 + 99 + 96 + 99]
    assert table.params == [4 + 99, 4 + 99 + 6 + 99]
    assert table.names == ["head1", "head2"]
    assert measure_total(m, (1, 1, 4, 4)) == (table.macs[-1], table.params[-1])


def test_exit_that_never_runs_or_wrong_order_is_an_error():
    m = TwoExits()
    orphan = nn.Linear(2, 2)
    with pytest.raises(ValueError):
        measure_exits(m, (1, 1, 4, 4), [m.head1, orphan])
    with pytest.raises(ValueError, match="order"):
        measure_exits(m, (1, 1, 4, 4), [m.head2, m.head1])


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        self.conv(x)
        raise RuntimeError("boom")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_modes_restored():
    m = tiny_model()
    m.train()
    m[1].eval()  # a frozen BN stays frozen, the rest stays in training mode
    before = [x.training for x in m.modules()]
    measure_total(m, (1, 3, 8, 8))
    assert [x.training for x in m.modules()] == before
    assert _hooks(m) == 0

    b = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        measure_total(b, (1, 1, 2, 2))
    assert _hooks(b) == 0
    assert b.training and b.conv.training


def test_no_grad_and_no_change_to_weights():
    m = tiny_model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    measure_total(m, (1, 3, 8, 8))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode: BN running stats untouched


class Norms(nn.Module):
    """One of each normalisation layer on a 1x4x6x6 input (144 elements per sample)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(6)
        self.bare = nn.BatchNorm2d(4, affine=False)  # no scale and shift: one op per element
        self.conv = nn.Conv2d(4, 2, 1, bias=False)  # 4*2*36 = 288 MACs in every convention

    def forward(self, x):
        return self.conv(self.bare(self.ln(self.gn(self.bn(x)))))


NORM_ELEMENTS = 4 * 6 * 6  # output elements of each norm layer, per sample


def test_adn_paper_convention_adds_two_ops_per_norm_output_element():
    assert list(costs.CONVENTIONS) == ["reference", "adn-paper"]
    assert costs.current_convention() == "reference"
    m = Norms()
    reference = measure_total(m, (2, 4, 6, 6))  # batch 2: still per sample
    assert reference == measure_total(m, (1, 4, 6, 6), convention="reference") == (288, 8 + 8 + 12 + 8)
    paper = measure_total(m, (2, 4, 6, 6), convention="adn-paper")
    assert paper[0] - reference[0] == 2 * NORM_ELEMENTS * 3 + NORM_ELEMENTS  # bn, gn, ln affine; bare not
    assert paper[1] == reference[1]  # parameters do not depend on the convention

    # the tiny model: its one BatchNorm (4x8x8 outputs) adds 2 x 256 ops to the hand count
    assert measure_total(tiny_model(), (1, 3, 8, 8), convention="adn-paper") == (TINY_MACS + 2 * 4 * 8 * 8, TINY_PARAMS)
    # per exit too: TwoExits has no norm layer, so nothing moves
    t = TwoExits()
    assert measure_exits(t, (1, 1, 4, 4), [t.head1, t.head2], convention="adn-paper") == measure_exits(t, (1, 1, 4, 4), [t.head1, t.head2])


def test_convention_context_reaches_every_measurement_and_is_restored():
    m = Norms()
    reference, paper = measure_total(m, (4, 6, 6)), measure_total(m, (4, 6, 6), convention="adn-paper")
    with costs.convention("adn-paper") as name:
        assert name == "adn-paper" == costs.current_convention()
        assert measure_total(m, (4, 6, 6)) == paper  # no argument: the block's convention
        assert measure_total(m, (4, 6, 6), convention="reference") == reference  # an argument wins
        assert costs.module_macs(m.bn, (), torch.zeros(1, 4, 6, 6)) == 2 * NORM_ELEMENTS
        counter = costs.CostCounter(m)  # fixed when made
        with costs.convention("reference"):
            assert measure_total(m, (4, 6, 6)) == reference
            assert counter.convention == "adn-paper"
        assert costs.current_convention() == "adn-paper"
    assert costs.current_convention() == "reference"
    assert costs.module_macs(m.bn, (), torch.zeros(1, 4, 6, 6)) == 0

    with pytest.raises(RuntimeError, match="boom"), costs.convention("adn-paper"):
        raise RuntimeError("boom")
    assert costs.current_convention() == "reference"  # restored after an error too
    for bad in (lambda: costs.convention("ptflops").__enter__(), lambda: measure_total(m, (4, 6, 6), convention="paper")):
        with pytest.raises(ValueError, match="reference, adn-paper"):
            bad()
    assert costs.current_convention() == "reference"


def test_cost_table_frame_and_dict():
    t = CostTable(macs=[1e6, 3e6], params=[10, 25], names=["a", "b"])
    df = t.to_frame()
    assert list(df.columns) == ["exit", "name", "macs", "mmacs", "params"]
    assert df["mmacs"].tolist() == [1.0, 3.0]
    assert df["exit"].tolist() == [0, 1]
    assert CostTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert CostTable([1.0], [1]).names == ["exit0"]
    with pytest.raises(ValueError):
        CostTable([1.0, 2.0], [1])


def test_costs_module_imports_no_methods_or_pipelines():
    tree = ast.parse((ROOT / "platform" / "dynlab" / "costs.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"methods", "pipelines"}
    assert costs.__name__ == "dynlab.costs"


# ---- pipelines.costs --------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.costs", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow  # a pipeline process
def test_pipeline_list_and_json():
    r = _run("--list")
    assert r.returncode == 0, r.stderr
    assert "msdnet-cifar100-b7" in r.stdout and "msdnet-imagenet-s4" in r.stdout

    r = _run("preset=msdnet-cifar100-b7", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["preset"] == "msdnet-cifar100-b7" and rep["dataset"] == "cifar100"
    assert rep["input"] == [1, 3, 32, 32]
    exits = rep["exits"]
    assert len(exits) == 7
    mm = [e["mmacs"] for e in exits]
    assert all(b > a for a, b in zip(mm, mm[1:]))
    assert all(abs(e["mmacs"] - e["macs"] / 1e6) < 1e-9 for e in exits)


def test_pipeline_in_process(capsys):
    from pipelines import costs as cmd

    assert cmd.main(["preset=nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "msdnet-cifar100-b7" in err and "Traceback" not in err

    assert cmd.main(["backbone=msdnet", "msdnet.n_blocks=2", "dataset=cifar10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("msdnet") and "cifar10" in out[0]
    assert len(out) == 2 + 2  # title, header, two exits

    assert cmd.main(["msdnet.bn_factor=[1,2]"]) == 2
    assert "msdnet.bn_factor" in capsys.readouterr().err
    assert cmd.main(["ranet.n_blocks=2"]) == 2
    assert cmd.main(["preset=msdnet-cifar100-b7", "backbone=other"]) == 2
    assert cmd.main(["--bogus"]) == 2


def test_pipeline_convention_flag(capsys):
    from pipelines import costs as cmd

    # default: the table and its title are today's; the JSON names the convention
    assert cmd.main(["preset=adn-resnet-cifar"]) == 0
    default_text = capsys.readouterr().out.splitlines()
    assert "convention" not in default_text[0]
    assert cmd.main(["preset=adn-resnet-cifar", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["convention"] == "reference"

    assert cmd.main(["preset=adn-resnet-cifar", "convention=adn-paper", "--json"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert paper["convention"] == "adn-paper"
    assert [e["name"] for e in paper["exits"]] == [e["name"] for e in default["exits"]]
    assert all(p["macs"] > d["macs"] and p["params"] == d["params"] for p, d in zip(paper["exits"], default["exits"]))
    assert cmd.main(["preset=adn-resnet-cifar", "convention=adn-paper"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert "convention adn-paper" in text[0] and "normalisation" in text[0]
    assert costs.current_convention() == "reference"  # the command's block does not leak

    # early-exit backbones measure at build, inside the block too
    assert cmd.main(["backbone=msdnet", "msdnet.n_blocks=2", "dataset=cifar10", "convention=adn-paper", "--json"]) == 0
    msd_paper = json.loads(capsys.readouterr().out)
    assert cmd.main(["backbone=msdnet", "msdnet.n_blocks=2", "dataset=cifar10", "--json"]) == 0
    msd = json.loads(capsys.readouterr().out)
    assert all(p["macs"] > d["macs"] for p, d in zip(msd_paper["exits"], msd["exits"]))

    assert cmd.main(["preset=adn-resnet-cifar", "convention=ptflops"]) == 2
    err = capsys.readouterr().err
    assert "convention" in err and "adn-paper" in err and "Traceback" not in err
