"""DMNN around the platform: the sweep's trials, the cost listing, the benchmark (no Ray); the
pipeline end to end is tests/test_reproduce_dmnn.py's smoke test."""

import pytest

from benchmarks import gated
from dynlab import config
from dynlab.errors import ConfigError
from pipelines import costs as costs_pipeline
from pipelines import sweep_dmnn_flops as sweep


def test_sweep_trials_cover_targets_lambdas_and_the_dense_baseline():
    assert sweep.with_defaults([])[0] == ["method=dmnn", "preset=dmnn-resnet-small", "epochs=30", "data.augment=false"]
    assert "data.augment=false" not in sweep.with_defaults(["dataset=cifar10"])[0]  # digits only
    args, lambdas = sweep.with_defaults(["run.epochs=1", "lambdas=[0.5,2]"])
    assert args == ["method=dmnn", "preset=dmnn-resnet-small", "data.augment=false", "run.epochs=1"] and lambdas == [0.5, 2.0]
    base = config.cli_config(args)
    trials = sweep.make_trials(lambdas)(base)
    assert [t.label for t in trials] == [
        f"target_rate={t}, resource_weight={w}" for t in (0.4, 0.5, 0.6, 0.7) for w in (0.5, 2.0)  # Table 1's targets
    ] + ["gated=False, subblocks=1"]
    dense = trials[-1].cfg()
    assert (dense.backbone_cfg.gated, dense.backbone_cfg.subblocks) == (False, 1)
    assert len({t.train_key for t in trials}) == len(trials)
    only_targets = sweep.make_trials(None)(base.with_overrides(["sweep.values=[0.2,0.9]", "sweep.baseline=false"]))
    assert [t.label for t in only_targets] == ["target_rate=0.2", "target_rate=0.9"]
    with pytest.raises(ConfigError, match="lambdas"):
        sweep.with_defaults(["lambdas=[1,-2]"])
    assert sweep.with_defaults(["backbone=dmnn_resnet"])[0][0] == "method=dmnn"  # no preset forced on a backbone
    mobilenet = sweep.make_trials(None)(config.cli_config(["method=dmnn", "backbone=dmnn_mobilenetv2"]))[-1].cfg()
    assert (mobilenet.backbone_cfg.gated, mobilenet.backbone_cfg.subblocks) == (False, 1)  # its own baseline


def test_costs_pipeline_lists_fixed_part_subblocks_controllers_and_dense_total(capsys):
    assert costs_pipeline.main(["preset=dmnn-resnet50", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rep["exits"]]
    assert names[0] == "fixed" and names[-1] == "dense total"
    assert sum(n.endswith(".controller") for n in names) == 16  # 3+4+6+3 blocks
    assert sum(".sub" in n for n in names) == 64  # N = 4
    macs = {r["name"]: r["macs"] for r in rep["exits"]}
    assert macs["dense total"] == pytest.approx(macs["fixed"] + sum(m for n, m in macs.items() if ".sub" in n))
    controllers = sum(m for n, m in macs.items() if n.endswith(".controller"))
    # the paper: 16 controllers ~ 0.02% of ImageNet ResNet-50; here at 32x32, with their global
    # average pooling counted (C*H*W ops each), 0.90 M of 0.338 G MACs = 0.27%
    assert controllers / macs["dense total"] < 0.005
    # the paper's CIFAR ResNet-50 costs 0.33 GMACs (first stage at 16x16); the N=4 split adds ~3.5%
    assert 0.31e9 < macs["dense total"] < 0.35e9


def test_paper_settings_resolve_into_the_papers_training():
    def resolved(name):
        return config.cli_config(sweep.with_defaults([f"paper={name}", "data.root=/nowhere"])[0])

    cifar = resolved("cifar100")
    assert (cifar.data.name, cifar.run.epochs, cifar.data.batch_size) == ("cifar100", 200, 256)
    assert (cifar.optim.lr, cifar.optim.momentum, cifar.optim.weight_decay, cifar.optim.nesterov) == (0.1, 0.9, 1e-4, False)
    assert cifar.optim.schedule == "multistep" and cifar.optim.gamma == 0.1
    from dynlab.training import milestone_epochs

    assert milestone_epochs(cifar.optim.milestones, 200) == [100, 150]  # "divide by 10 at the 100th and 150th epoch"
    assert cifar.backbone_cfg.stem == "half" and cifar.backbone_cfg.layers == [3, 4, 6, 3]  # dmnn-resnet50: the paper's 0.33 G
    assert cifar.method_cfg.category_weights == []  # 1e-4 x 10 per stage
    imagenet = resolved("imagenet")
    assert (imagenet.run.epochs, imagenet.data.batch_size, imagenet.optim.schedule, imagenet.optim.nesterov) == (120, 256, "cosine", True)
    assert (imagenet.optim.lr, imagenet.optim.momentum, imagenet.optim.weight_decay) == (0.1, 0.9, 1e-4)
    mobile = resolved("imagenet-mobilenetv2")
    assert mobile.backbone == "dmnn_mobilenetv2" and mobile.optim.weight_decay == 4e-5
    assert config.cli_config(sweep.with_defaults(["paper=cifar100", "epochs=3"])[0]).run.epochs == 3  # later arguments win
    assert sweep.DEFAULT_TARGETS == [0.4, 0.5, 0.6, 0.7]
    with pytest.raises(ConfigError, match="'paper' = 'cifar10'.*one of cifar100, imagenet, imagenet-mobilenetv2"):
        sweep.with_defaults(["paper=cifar10"])


def test_gated_benchmark_reports_macs_and_time_ratios(capsys):
    rows = gated.main(["--preset", "dmnn-resnet-small", "--batch", "16", "--repeats", "1", "--rates", "0.25,1.0"])
    out = capsys.readouterr().out
    assert "agree: True" in out
    assert rows[0]["rate"] == pytest.approx(0.25, abs=0.1) and rows[1]["rate"] == 1.0
    assert rows[0]["macs"] < rows[1]["macs"] <= 1.0 + 1e-9


# The pipeline end to end (a gated and a dense trial, their gate reports): tests/test_reproduce_dmnn.py's smoke test.
