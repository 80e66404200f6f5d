"""Reproduce BoostNet (Yu et al., "Boosted Dynamic Neural Networks"; ../shared/papers/000_*.txt):
Table 1 (CIFAR-100, anytime: 10-exit MSDNet, RANet), Table 2 (ImageNet: MSDNet, RANet), the
budgeted-batch comparison of Fig. 4 and the temperature ablation of Fig. 6a, each BoostNet
(t = 0.5) against its baseline: joint training *with* gradient rescaling, as the paper's baselines
("we also apply gradient rescaling to the baseline models"). Then the paper's numbers beside ours
and one verdict per claim (pipelines/published/boostnet.yaml holds the paper's numbers).

    python -m pipelines.reproduce_boostnet scale=smoke     # the whole DAG on synthetic data, under a minute on 2 cores
    python -m pipelines.reproduce_boostnet scale=laptop    # CIFAR-10 copy, 3 seeds, 2-core CPU: see README
    python -m pipelines.reproduce_boostnet scale=paper --plan repro.throughput=4e12   # the plan, no training
Paper scale, on a GPU cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.reproduce_boostnet scale=paper \\
        repro.cifar100_root=/data/cifar100 repro.imagenet_root=/data/imagenet sweep.cache_dir=/shared/cache

Scales: ``smoke`` trains the paper's CIFAR-100 architectures (10-exit MSDNet, RANet) on synthetic
32x32 images of 100 classes for one epoch, so the report has the paper's exits and costs (its
numbers are noise); ``laptop`` trains the default 4-exit MSDNet and RANet on the CIFAR-10 copy,
3 seeds; ``paper`` the paper's models and settings. ``repro.only=[cifar100-msdnet]`` runs some
experiments; any key (``epochs=``, ``sweep.repeats=``, ``data.train_subset=``) overrides the scale's.
t = 0 is not trained separately: F_n = 0 * F_{n-1} + f_n is joint training, so the baseline is Fig.
6a's t = 0 (tests/test_reproduce_boostnet.py checks the two losses are equal).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynlab import reproduce
from dynlab.reproduce import Claim, Experiment, Row, Scale

EXPERIMENT = "reproduce_boostnet"
PUBLISHED = Path(__file__).resolve().parent / "published" / "boostnet.yaml"

BOOSTNET = Row("BoostNet", {"method": "boostnet", "boostnet.temperature": 0.5})
BASELINE_GR = Row("baseline", {"method": "joint", "joint.gradient_rescale": True})  # the paper's baselines: with gradient rescaling
BASELINE = Row("baseline", {"method": "joint"})  # RANet: no gradient rescaling in the reference (nor in our RANet)
T1 = Row("t=1", {"method": "boostnet", "boostnet.temperature": 1.0})

# The paper's settings (the reference code's where the paper is silent: weight decay, the x0.1 decay,
# augmentation, plain momentum; see published/boostnet.yaml "settings").
_SGD = {"optim.lr": 0.1, "optim.momentum": 0.9, "optim.nesterov": False, "optim.weight_decay": 1e-4, "optim.gamma": 0.1, "optim.schedule": "multistep"}
_CIFAR100 = {"data.name": "cifar100", "run.epochs": 300, "optim.milestones": [0.5, 0.75], "data.batch_size": 64, "data.heldout": 5000, "run.num_workers": 1}
_IMAGENET = {"data.name": "imagefolder", "run.epochs": 90, "optim.milestones": [1 / 3, 2 / 3], "data.batch_size": 64, "run.num_workers": 4, "data.heldout": 50000}


def _paper() -> Scale:
    cifar = {**_CIFAR100, "data.root": "${repro.cifar100_root}"}
    imagenet = {**_IMAGENET, "data.root": "${repro.imagenet_root}"}
    return Scale(
        "paper",
        "the paper's models and settings (CIFAR-100: 1 GPU per trial, 300 epochs; ImageNet: 4 GPUs x 64 per trial, 90 epochs), one seed",
        {**_SGD, "run.use_gpu": True, "sweep.repeats": 1},
        [
            Experiment("cifar100-msdnet", "Table 1 and Fig. 4a: CIFAR-100, 10-exit MSDNet", {**cifar, "preset": "msdnet-cifar100-b10"}, [BASELINE_GR, BOOSTNET]),
            Experiment("cifar100-ranet", "Table 1 and Fig. 4b: CIFAR-100, RANet", {**cifar, "preset": "ranet-cifar100-anytime"}, [BASELINE, BOOSTNET]),
            Experiment("imagenet-msdnet", "Table 2 (printed as 'RANet'), Fig. 4c and Fig. 6a: ImageNet, MSDNet", {**imagenet, "preset": "msdnet-imagenet-s7"}, [BASELINE_GR, BOOSTNET, T1]),
            Experiment("imagenet-ranet", "Table 2 (printed as 'MSDNet') and Fig. 4d: ImageNet, RANet", {**imagenet, "preset": "ranet-imagenet-c64"}, [BASELINE, BOOSTNET]),
        ],
    )


def _smoke() -> Scale:
    # the paper's CIFAR-100 architectures on synthetic 32x32 images of 100 classes: the report gets
    # the paper's exits and costs; the accuracies are noise (one epoch on 96 images)
    data = {"data.name": "synthetic", "data.synthetic_classes": 100, "data.synthetic_train": 96, "data.synthetic_test": 100, "data.heldout": 16}
    return Scale(
        "smoke",
        "the whole DAG on synthetic data (the paper's CIFAR-100 models, 1 epoch): checks the machinery, not the paper",
        {**_SGD, **data, "run.epochs": 1, "data.batch_size": 32, "sweep.repeats": 1, "eval.num_budgets": 3, "run.num_workers": 1},
        [
            Experiment("cifar100-msdnet", "Table 1 and Fig. 6a's temperatures: the 10-exit MSDNet", {"preset": "msdnet-cifar100-b10"}, [BASELINE_GR, BOOSTNET, T1]),
            Experiment("cifar100-ranet", "Table 1: RANet", {"preset": "ranet-cifar100-anytime"}, [BASELINE, BOOSTNET]),
        ],
    )


def _laptop() -> Scale:
    # CIFAR-10 (the copy in ../shared/datasets) on the default 4-exit MSDNet and RANet: a 2-core CPU
    # finishes 15 trainings in under an hour; 3 seeds so that each direction carries its spread
    data = reproduce.laptop_cifar10(10000)
    return Scale(
        "laptop",
        "CIFAR-10 (10,000 training images, 2,000 held-out, the full 10,000-image test set), the default 4-exit MSDNet and RANet, 8 epochs, 3 seeds: the paper's directions at a reduced scale, not its numbers",
        {**_SGD, **data, "run.epochs": 8, "optim.milestones": [0.5, 0.75], "data.batch_size": 64, "sweep.repeats": 3},
        [
            Experiment("cifar10-msdnet", "Table 1's comparison and Fig. 6a's temperatures at laptop scale: CIFAR-10, 4-exit MSDNet", {"backbone": "msdnet"}, [BASELINE_GR, BOOSTNET, T1], paper="cifar100-msdnet"),
            Experiment("cifar10-ranet", "Table 1's RANet comparison at laptop scale: CIFAR-10, 4-exit RANet", {"backbone": "ranet"}, [BASELINE, BOOSTNET], paper="cifar100-ranet"),
        ],
    )


SCALES = {s.name: s for s in (_smoke(), _laptop(), _paper())}

# What the paper claims, per experiment (each checked where the scale runs it; the laptop's CIFAR-10
# experiments check the CIFAR-100 claims' directions).
CLAIMS = [
    *(
        Claim(f"BoostNet >= baseline at every exit ({e})", e, "BoostNet", "baseline", "exits", "all", src)
        for e, src in (
            ("cifar100-msdnet", "Table 1"), ("cifar100-ranet", "Table 1"), ("imagenet-msdnet", "Table 2"), ("imagenet-ranet", "Table 2"),
            ("cifar10-msdnet", "Table 1's direction"), ("cifar10-ranet", "Table 1's direction"),
        )
    ),
    *(
        Claim(f"BoostNet >= baseline at every budget ({e})", e, "BoostNet", "baseline", "budgets", "all", "Fig. 4: 'Under the same budget, our method gets superior results'")
        for e in ("cifar100-msdnet", "cifar100-ranet", "imagenet-msdnet", "imagenet-ranet", "cifar10-msdnet", "cifar10-ranet")
    ),
    *(
        c
        for e in ("imagenet-msdnet", "cifar10-msdnet", "cifar100-msdnet")
        for c in (
            Claim(f"t=0.5 >= t=0 at every exit ({e})", e, "BoostNet", "baseline", "exits", "all", "Fig. 6a: t = 0 'basically becomes an MSDNet, which also performs inferior to the case of t = 0.5'"),
            Claim(f"t=0.5 >= t=1 at the last exit ({e})", e, "BoostNet", "t=1", "exits", "last", "Fig. 6a: 'the deeper classifiers cannot learn well ... when t is 1'"),
            Claim(f"t=1 >= t=0.5 at the first exit ({e})", e, "t=1", "BoostNet", "exits", "first", "Fig. 6a: 'the shallower classifiers achieve better performance than the other t values'"),
        )
    ),
]


def main(argv: list[str] | None = None) -> int:
    return reproduce.main(__doc__, EXPERIMENT, SCALES, CLAIMS, PUBLISHED, "BoostNet reproduction", argv)


if __name__ == "__main__":
    sys.exit(main())
