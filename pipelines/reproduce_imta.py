"""Reproduce IMTA (Li et al., "Improved Techniques for Training Adaptive Deep Networks";
../shared/papers/001_*.txt): Table 1 (CIFAR-100, the 7-exit MSDNet: its baseline against IMTA),
Table 2 (the ablation on CIFAR-100, 5-exit MSDNet: none, GE, ISC, OFA, GE+ISC+OFA) and Table 3 (the
same ablation on ImageNet), each with our phase-II control (phase II with neither ISC nor OFA: the
paper compares its phase-II rows with "none", which had no phase II). Then the paper's numbers
beside ours and one verdict per claim (pipelines/published/imta.yaml holds the paper's numbers).

    python -m pipelines.reproduce_imta scale=smoke     # the whole DAG on synthetic data: 9 one-epoch trainings
    python -m pipelines.reproduce_imta scale=laptop    # CIFAR-10 copy, 3 seeds, 2-core CPU: see README
    python -m pipelines.reproduce_imta scale=paper --plan repro.throughput=4e12   # the plan, no training
Paper scale, on a GPU cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.reproduce_imta scale=paper \\
        repro.cifar100_root=/data/cifar100 repro.imagenet_root=/data/imagenet sweep.cache_dir=/shared/cache

IMTA trains in two stages (``pipelines.imta_common``): phase I (GE or none) trains the network,
phase II (ISC, OFA, the control) trains new classifiers on a phase-I row's published weights (a
row's ``start``), so each phase I is trained once per seed and serves every row that starts from
it. ``repro.only=[table2-cifar100-ablation]`` runs some experiments; any key (``epochs=``,
``imta.alpha=``, ``sweep.repeats=``) overrides the scale's, not what a row compares (its GE, ISC, OFA).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynlab import reproduce
from dynlab.reproduce import Claim, Experiment, Row, Scale
from pipelines import imta_common

EXPERIMENT = "reproduce_imta"
PUBLISHED = Path(__file__).resolve().parent / "published" / "imta.yaml"

# Phase I: none = plain MSDNet joint training, GE = with gradient equilibrium (IMTA's phase I).
# Phase II (start: the phase-I row whose weights it trains on): the paper's rows and our control.
_NO_GE = {"imta.gradient_equilibrium": False, "imta.gradient_rescale": False}
NONE, GE = Row("none", _NO_GE), Row("GE", {})  # GE: imta's default (imta.gradient_rescale=true: the reference's form)
ISC = Row("ISC", {"imta.isc": True, "imta.ofa": False}, start="none")
OFA = Row("OFA", {"imta.isc": False, "imta.ofa": True}, start="none")
ALL = Row("GE+ISC+OFA", {"imta.isc": True, "imta.ofa": True}, start="GE")
CONTROL = Row("control", {"imta.isc": False, "imta.ofa": False}, start="none")
ABLATION = [NONE, GE, ISC, OFA, ALL, CONTROL]
TABLE1 = [Row("baseline", _NO_GE), GE, Row("IMTA", {"imta.isc": True, "imta.ofa": True}, start="GE")]  # Table 1's MSDNet and "Ours"

# The paper's settings (published/imta.yaml "settings"): Nesterov SGD, wd 1e-4, x0.1 steps, both phases
# (imta.* keys go in the experiments, where a method=joint on the command line meets check_imta).
_BASE = {"method": "imta", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.nesterov": True, "optim.weight_decay": 1e-4, "optim.gamma": 0.1, "optim.schedule": "multistep"}
# CIFAR-100: 300 epochs (x0.1 at 150 / 225) then phase II 180 (x0.1 at 90 / 135), batch 64, 1 GPU
_CIFAR100 = {"data.name": "cifar100", "data.root": "${repro.cifar100_root}", "run.epochs": 300, "imta.phase2_epochs": 180, "optim.milestones": [0.5, 0.75], "data.batch_size": 64, "data.heldout": 5000, "run.num_workers": 1}
# ImageNet: 90 + 90 epochs (x0.1 at 30 / 60), batch 256 = 4 GPUs x 64; phase II set explicitly (0.6 x 90 is not the paper's)
_IMAGENET = {"data.name": "imagefolder", "data.root": "${repro.imagenet_root}", "run.epochs": 90, "imta.phase2_epochs": 90, "optim.milestones": [1 / 3, 2 / 3], "data.batch_size": 64, "run.num_workers": 4, "data.heldout": 50000}


def _paper() -> Scale:
    return Scale(
        "paper",
        "the paper's models and settings (CIFAR-100: 1 GPU per trial, 300 + 180 epochs; ImageNet: 4 GPUs x 64 per trial, 90 + 90 epochs), one seed",
        {**_BASE, "run.use_gpu": True, "sweep.repeats": 1},
        [
            Experiment("table1-cifar100", "Table 1: CIFAR-100, 7-exit MSDNet (lin_grow, 7 blocks), its baseline against IMTA", {**_CIFAR100, "preset": "msdnet-cifar100-lingrow7"}, TABLE1),
            Experiment("table2-cifar100-ablation", "Table 2: the ablation on CIFAR-100, 5-exit MSDNet with three scales", {**_CIFAR100, "preset": "msdnet-cifar100-lingrow5"}, ABLATION),
            Experiment("table3-imagenet-ablation", "Table 3: the ablation on ImageNet, 5-exit MSDNet with four scales (t = 4: our choice, see errata)", {**_IMAGENET, "preset": "msdnet-imagenet-s4"}, ABLATION),
        ],
    )


def _smoke() -> Scale:
    # the paper's CIFAR-100 architectures on synthetic 32x32 images of 100 classes: the report gets
    # the paper's exits and costs; the accuracies are noise (one epoch per phase on 64 images)
    data = {"data.name": "synthetic", "data.synthetic_classes": 100, "data.synthetic_train": 64, "data.synthetic_test": 64, "data.heldout": 16}
    return Scale(
        "smoke",
        "the whole DAG on synthetic data (the paper's CIFAR-100 models, 1 epoch per phase): checks the machinery, not the paper",
        {**_BASE, **data, "run.epochs": 1, "data.batch_size": 32, "sweep.repeats": 1, "eval.num_budgets": 2, "run.num_workers": 1},
        [
            Experiment("table1-cifar100", "Table 1: the 7-exit MSDNet", {"preset": "msdnet-cifar100-lingrow7", "imta.phase2_epochs": 1}, TABLE1),
            Experiment("table2-cifar100-ablation", "Table 2: the ablation, 5-exit MSDNet", {"preset": "msdnet-cifar100-lingrow5", "imta.phase2_epochs": 1}, ABLATION),
        ],
    )


def _laptop() -> Scale:
    # CIFAR-10 (the copy in ../shared/datasets) on the default 4-exit MSDNet: 6 phase-I and 12
    # phase-II trainings (3 seeds), sized from a phase-I epoch (42 s on one core) to about 35 minutes
    # on an idle 2-core CPU (71 measured beside another run: README); Table 1's comparison is the
    # ablation's none against GE+ISC+OFA (the 7-exit MSDNet costs 12 x as much per image)
    data = reproduce.laptop_cifar10(10000)
    return Scale(
        "laptop",
        "CIFAR-10 (10,000 training images, 2,000 held-out, the full 10,000-image test set), the default 4-exit MSDNet, 8 + 5 epochs, 3 seeds: the paper's directions at a reduced scale, not its numbers",
        {**_BASE, **data, "run.epochs": 8, "optim.milestones": [0.5, 0.75], "data.batch_size": 64, "sweep.repeats": 3},
        [Experiment("cifar10-ablation", "Tables 1 and 2 at laptop scale: CIFAR-10, 4-exit MSDNet", {"backbone": "msdnet", "imta.phase2_epochs": 5}, ABLATION, paper="table2-cifar100-ablation")],
    )


SCALES = {s.name: s for s in (_smoke(), _laptop(), _paper())}

_NO_CONTROL = "no control in the paper (our row)"


def _ablation_claims(e: str, table: str) -> list[Claim]:
    """Each technique against "none" (the paper's comparison) and against its proper control: GE
    and none are both phase I; ISC, OFA and the full method had a phase II, so the control has one."""
    return [
        Claim(f"GE+ISC+OFA >= none at every exit ({e})", e, "GE+ISC+OFA", "none", source=f"{table}, line 5 vs line 1 ('Our full model consistently improves the accuracy')"),
        Claim(f"GE >= none at every exit ({e})", e, "GE", "none", source=f"{table}, line 2 vs line 1"),
        Claim(f"ISC >= none at every exit ({e})", e, "ISC", "none", source=f"{table}, line 3 vs line 1 (ISC had a phase II, none did not)"),
        Claim(f"OFA >= none at every exit ({e})", e, "OFA", "none", source=f"{table}, line 4 vs line 1 (OFA had a phase II, none did not)"),
        Claim(f"ISC >= control at every exit ({e})", e, "ISC", "control", source="'All the strategies consistently improve the performance': ISC against the same phase II without it", paper_says=_NO_CONTROL),
        Claim(f"OFA >= control at every exit ({e})", e, "OFA", "control", source="OFA against the same phase II without it", paper_says=_NO_CONTROL),
        Claim(f"GE+ISC+OFA >= control at every exit ({e})", e, "GE+ISC+OFA", "control", source="the full method against a phase II without GE, ISC, OFA", paper_says=_NO_CONTROL),
    ]


CLAIMS = [
    Claim("IMTA >= baseline at every exit (table1-cifar100)", "table1-cifar100", "IMTA", "baseline", source="Table 1, Ours vs MSDNet"),
    *_ablation_claims("table2-cifar100-ablation", "Table 2"),
    *_ablation_claims("table3-imagenet-ablation", "Table 3"),
    *_ablation_claims("cifar10-ablation", "Table 2's direction (Table 1's: GE+ISC+OFA vs none)"),
]


def main(argv: list[str] | None = None) -> int:
    return reproduce.main(__doc__, EXPERIMENT, SCALES, CLAIMS, PUBLISHED, "IMTA reproduction", argv, two=imta_common.two_stages())


if __name__ == "__main__":
    sys.exit(main())
