"""Reproduce DMNN (Su et al., "Dynamic Multi-path Neural Network"; ../shared/papers/002_*.txt):
Table 1 (ImageNet: DMNN-50 at targets 0.4-0.7 and DMNN-101 against their dense ResNets), Table 3
(CIFAR-100: DMNN-50 at 0.5-0.7 against ResNet-50) and Table 4 (the controller ablation: previous
state, category loss), then the paper's numbers beside ours and one verdict per claim: does DMNN
match the dense network's accuracy at a lower cost, does a larger target buy accuracy, and do the
gates route by category (pipelines/published/dmnn.yaml holds the paper's numbers).

    python -m pipelines.reproduce_dmnn scale=smoke     # the whole DAG on digits, about half a minute on 2 cores
    python -m pipelines.reproduce_dmnn scale=laptop    # CIFAR-10 copy, 3 seeds, 2-core CPU: see README
    python -m pipelines.reproduce_dmnn scale=paper --plan repro.throughput=4e12   # the plan, no training
Paper scale, on a GPU cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.reproduce_dmnn scale=paper \\
        repro.cifar100_root=/data/cifar100 repro.imagenet_root=/data/imagenet sweep.cache_dir=/shared/cache

Scales: ``smoke`` trains the small DMNN ResNet on digits for two epochs (one with the
gates open, one gated): the machinery, not the paper; ``laptop`` trains it on the CIFAR-10
copy (CIFAR-10's four built-in categories supervise the controllers), 3 seeds; ``paper`` the
paper's networks and settings (sweep_dmnn_flops.PAPER_TRAINING). A "dense" row is the same ResNet
with one sub-block per block and no controllers. ``repro.only=[...]`` runs some experiments; any
key (``epochs=``, ``dmnn.resource_weight=``, ...) overrides the scale's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynlab import reproduce
from dynlab.reproduce import Claim, Experiment, Row, Scale
from pipelines.sweep_dmnn_flops import PAPER_TRAINING

EXPERIMENT = "reproduce_dmnn"
PUBLISHED = Path(__file__).resolve().parent / "published" / "dmnn.yaml"
SPREAD = 0.2  # the least category spread that counts as routing (issue 17's bar; 0 = a static network)


def dense(backbone: str = "dmnn_resnet") -> Row:
    return Row("dense", {f"{backbone}.gated": False, f"{backbone}.subblocks": 1})


def dmnn(t: float, **extra) -> Row:
    return Row(f"DMNN t={t:g}", {"dmnn.target_rate": t, **extra})


_NO_PREV, _NO_CAT = {"dmnn_resnet.controller_prev": False}, {"dmnn.categories": "none"}  # Table 4's switches


def _paper() -> Scale:
    cifar = {**PAPER_TRAINING["cifar100"], "data.root": "${repro.cifar100_root}", "data.heldout": 5000}
    imagenet = {**PAPER_TRAINING["imagenet"], "data.root": "${repro.imagenet_root}", "data.heldout": 50000, "data.batch_size": 32, "run.num_workers": 8}  # 8 x 32 = the paper's 256
    r101 = {**imagenet, "preset": "dmnn-resnet101-imagenet"}
    return Scale(
        "paper",
        "the paper's networks and settings (CIFAR-100: 1 GPU per trial, 200 epochs; ImageNet: 8 GPUs x 32 per trial, 120 epochs), one seed",
        {"method": "dmnn", "preset": "dmnn-resnet50", "run.use_gpu": True, "sweep.repeats": 1},
        [
            Experiment("table3-cifar100", "Table 3: CIFAR-100, DMNN-50 (n = 4) against ResNet-50", cifar, [dense(), *(dmnn(t) for t in (0.5, 0.6, 0.7))]),
            Experiment("table1-imagenet-resnet50", "Table 1: ImageNet, DMNN-50 (n = 4) against ResNet-50", imagenet, [dense(), *(dmnn(t) for t in (0.4, 0.5, 0.6, 0.7))]),
            Experiment("table1-imagenet-resnet101", "Table 1: ImageNet, DMNN-101 (n = 4) against ResNet-101", r101, [dense(), *(dmnn(t) for t in (0.3, 0.5, 0.7))]),
            Experiment(
                "table4-imagenet-controller",
                "Table 4: the controller ablation on DMNN-50 at t = 0.7 (previous state, category loss)",
                imagenet,
                [dense(), Row("neither", {"dmnn.target_rate": 0.7, **_NO_PREV, **_NO_CAT}), Row("PREV", {"dmnn.target_rate": 0.7, **_NO_CAT}), Row("CAT", {"dmnn.target_rate": 0.7, **_NO_PREV}), Row("PREV+CAT", {"dmnn.target_rate": 0.7})],
            ),
        ],
    )


def _smoke() -> Scale:
    # digits: small and fast, with built-in categories (closed loops, straight strokes, open curves)
    # for the controllers' category loss and the routing statistics
    data = {"data.name": "digits", "data.augment": False, "data.heldout": 100, "data.train_subset": 320}
    return Scale(
        "smoke",
        "the whole DAG on digits (the small DMNN ResNet, 2 epochs: one with the gates open, one gated): checks the machinery, not the paper",
        {"method": "dmnn", "preset": "dmnn-resnet-small", **data, "run.epochs": 2, "data.batch_size": 32, "sweep.repeats": 1, "run.num_workers": 1},
        [
            Experiment("digits-resnet", "Table 3's comparison on digits", {}, [dense(), dmnn(0.5), dmnn(0.7)], paper="table3-cifar100"),
            # PREV+CAT is the row above's t = 0.7: one training serves both experiments
            Experiment("digits-controller", "Table 4's ablation on digits", {}, [Row("neither", {"dmnn.target_rate": 0.7, **_NO_PREV, **_NO_CAT}), Row("PREV+CAT", {"dmnn.target_rate": 0.7})], paper="table4-imagenet-controller"),
        ],
    )


def _laptop() -> Scale:
    # CIFAR-10 (the copy in ../shared/datasets) on a DMNN ResNet small enough for a 2-core CPU: 12
    # trainings in 66 min with another run sharing the cores; 3 seeds so that each comparison carries its spread
    data = reproduce.laptop_cifar10(6000)
    sgd = {"optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.schedule": "multistep", "optim.milestones": [0.5, 0.75], "optim.gamma": 0.1}
    return Scale(
        "laptop",
        "CIFAR-10 (6,000 training images, 2,000 held-out, the full 10,000-image test set), the small DMNN ResNet (n = 2), 10 epochs (x0.1 at 5 and 7), 3 seeds: the paper's directions at a reduced scale, not its numbers",
        {"method": "dmnn", "preset": "dmnn-resnet-small", **data, **sgd, "run.epochs": 10, "data.batch_size": 64, "sweep.repeats": 3},
        [Experiment("cifar10-resnet", "Table 3's comparison at laptop scale: CIFAR-10, small DMNN ResNet against its dense network", {}, [dense(), *(dmnn(t) for t in (0.5, 0.6, 0.7))], paper="table3-cifar100")],
    )


SCALES = {s.name: s for s in (_smoke(), _laptop(), _paper())}


def _claims(e: str, targets: tuple[float, ...], matched: tuple[float, ...], src: str) -> list[Claim]:
    """At every target: DMNN matches dense at a lower cost (``matched``) and its gates route by
    category; the largest target at least as accurate as the smallest."""
    lo, hi = f"DMNN t={min(targets):g}", f"DMNN t={max(targets):g}"
    return [
        *(Claim(f"DMNN t={t:g} matches dense at lower cost ({e})", e, f"DMNN t={t:g}", "dense", source=src, kind="matches") for t in matched),
        Claim(f"t={max(targets):g} >= t={min(targets):g} ({e})", e, hi, lo, source="section 4.3: 'The model with larger FLOPs rate gains higher performance'"),
        *(Claim(f"DMNN t={t:g} routes by category ({e})", e, f"DMNN t={t:g}", "", source="Fig. 7: execution rates 'vary from categories'", kind="routes", threshold=SPREAD) for t in targets),
    ]


CLAIMS = [
    *_claims("table3-cifar100", (0.5, 0.6, 0.7), (0.5, 0.6, 0.7), "Table 3: 'DMNN-50 ... can even outperform ResNet-50 by 1.4% ... with only 78.7% FLOPs'"),
    *_claims("digits-resnet", (0.5, 0.7), (0.5, 0.7), "Table 3's direction"),
    *_claims("cifar10-resnet", (0.5, 0.6, 0.7), (0.5, 0.6, 0.7), "Table 3's direction"),
    *_claims("table1-imagenet-resnet50", (0.4, 0.5, 0.6, 0.7), (0.5, 0.6, 0.7), "Table 1: 'DMNN-50 achieves similar performance with ResNet-50 but saves more than 42.4% FLOPs'"),
    Claim("DMNN t=0.5 matches dense at lower cost (table1-imagenet-resnet101)", "table1-imagenet-resnet101", "DMNN t=0.5", "dense", source="Table 1: 'DMNN-101 outperforms ResNet-101 and save 45.1% FLOPs'", kind="matches"),
    *(
        Claim(f"{r} >= neither (table4-imagenet-controller)", "table4-imagenet-controller", r, "neither", source="Table 4: each of previous state and category supervision helps, both most")
        for r in ("PREV", "CAT", "PREV+CAT")
    ),
    Claim("PREV+CAT >= neither (digits-controller)", "digits-controller", "PREV+CAT", "neither", source="Table 4's direction"),
]


def main(argv: list[str] | None = None) -> int:
    return reproduce.main(__doc__, EXPERIMENT, SCALES, CLAIMS, PUBLISHED, "DMNN reproduction", argv)


if __name__ == "__main__":
    sys.exit(main())
