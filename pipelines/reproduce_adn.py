"""Reproduce ADN (Kang et al., "Adaptive Depth Networks with Skippable Sub-Paths"; ../shared/papers/004_*.txt):
Table 1 (ImageNet: each ADN's super-net and base-net against the same network trained alone at each
depth: ResNet-50, MobileNetV2, ViT-B/16, Swin-T) and Table 4 (the ablation: skip-aware
self-distillation x skip-aware norms, on ResNet-50 and ViT-B/32), then the paper's numbers beside ours
and one verdict per claim: do the super-net and base-net beat their individually trained
counterparts, and does each component help (pipelines/published/adn.yaml holds the paper's numbers).

    python -m pipelines.reproduce_adn scale=smoke     # the whole DAG on digits, about half a minute on 2 cores
    python -m pipelines.reproduce_adn scale=laptop    # CIFAR-10 copy, 3 seeds, 2-core CPU: see README
    python -m pipelines.reproduce_adn scale=paper --plan repro.throughput=4e12   # the plan, no training
Paper scale, on a GPU cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.reproduce_adn scale=paper \\
        repro.imagenet_root=/data/imagenet sweep.cache_dir=/shared/cache

Rows: ``ADN`` (both components: Table 4's "both"), ``super`` / ``base`` (the same network trained
alone as its super-net or its base-net, with cross-entropy: ``adn.individual``), ``neither``,
``self-distillation`` and ``skip-aware norms`` (one component each), ``logit KD only`` (no feature
KD: Table 4's last row). Each row is scored at its base-net and its super-net. Scales: ``smoke``
trains the small ADN ResNet on digits for two epochs: the machinery, not the paper; ``laptop`` the
CIFAR presets on the CIFAR-10 copy, 3 seeds; ``paper`` the paper's networks with the authors'
recipes (each preset's ``recipe``), 8 GPUs per trial. ``repro.only=[...]`` runs some experiments;
any key (``epochs=``, ``adn.alpha=``, ...) overrides the scale's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynlab import registry, reproduce
from dynlab.reproduce import Claim, Experiment, Row, Scale

EXPERIMENT = "reproduce_adn"
PUBLISHED = Path(__file__).resolve().parent / "published" / "adn.yaml"

ADN = Row("ADN", {})
SUPER, BASE = Row("super", {"adn.individual": "super"}), Row("base", {"adn.individual": "base"})
NEITHER = Row("neither", {"adn.distill": False, "adn.skip_aware_norms": False})
DISTILL_ONLY = Row("self-distillation", {"adn.skip_aware_norms": False})
NORMS_ONLY = Row("skip-aware norms", {"adn.distill": False})
BOTH = Row("both", {})  # ADN: the same training as the ADN row, trained once
LOGITS_ONLY = Row("logit KD only", {"adn.feature_weight": 0.0})
TABLE1 = [ADN, SUPER, BASE]
TABLE4 = [NEITHER, DISTILL_ONLY, NORMS_ONLY, BOTH, SUPER, BASE]
EVERY = {"method": "adn", "adn.subnets": ["base", "super"]}  # the two sub-networks ADN trains (Table 1 and 4 print these)


def _imagenet(preset: str, batch: int) -> dict:
    """A paper experiment's keys: the preset, its authors' recipe and ImageNet on 8 GPUs."""
    return {"preset": preset, **registry.get_preset(preset).recipe, "data.name": "imagefolder", "data.root": "${repro.imagenet_root}", "data.heldout": 50000, "data.batch_size": batch}


def _paper() -> Scale:
    __import__("methods")  # the presets and their recipes
    return Scale(
        "paper",
        "the paper's networks with the authors' recipes (each preset's recipe: ResNet-50 150 epochs, MobileNetV2 300, the transformers 300 with DeiT's recipe) on ImageNet, 8 GPUs per trial, one seed",
        {**EVERY, "preset": "adn-resnet50", "run.use_gpu": True, "run.num_workers": 8, "sweep.repeats": 1},
        [
            # per-worker batches: 8 x 32 = 256 (the CNNs), 8 x 128 = 1024 (Swin-T), 8 x 64 = 512 (ViT-B)
            Experiment("table1-resnet50", "Table 1: ResNet50-ADN against ResNet50 and ResNet50-Base trained alone", _imagenet("adn-resnet50", 32), TABLE1),
            Experiment("table1-mobilenetv2", "Table 1: MV2-ADN (arXiv v1's split) against MV2 and MV2-Base trained alone", _imagenet("adn-mobilenetv2-v1", 32), TABLE1),
            Experiment("table1-vit-b16", "Table 1: ViT-b/16-ADN against ViT-b/16 and ViT-b/16-Base trained alone", _imagenet("adn-vit-b16", 64), TABLE1),
            Experiment("table1-swin-t", "Table 1: Swin-T-ADN (arXiv v1's split) against Swin-T and Swin-T-Base trained alone", _imagenet("adn-swin-t-v1", 128), TABLE1),
            Experiment("table4-resnet50", "Table 4: the ablation on ResNet50-ADN (self-distillation x skip-aware BNs, and KD of the logits only)", _imagenet("adn-resnet50", 32), [*TABLE4, LOGITS_ONLY]),
            Experiment("table4-vit-b32", "Table 4: the ablation on ViT-b/32-ADN (self-distillation x skip-aware LNs)", _imagenet("adn-vit-b32", 64), [NEITHER, DISTILL_ONLY, NORMS_ONLY, BOTH]),
        ],
    )


def _smoke() -> Scale:
    data = {"data.name": "digits", "data.augment": False, "data.heldout": 100, "data.train_subset": 320}
    return Scale(
        "smoke",
        "the whole DAG on digits (the small ADN ResNet, 2 epochs): checks the machinery, not the paper",
        {**EVERY, "backbone": "adn_resnet", **data, "run.epochs": 2, "data.batch_size": 32, "sweep.repeats": 1, "run.num_workers": 1},
        [
            Experiment("digits-table1", "Table 1's comparison on digits", {}, TABLE1, paper="table1-resnet50"),
            Experiment("digits-table4", "Table 4's ablation on digits (both components against neither)", {}, [NEITHER, BOTH], paper="table4-resnet50"),
        ],
    )


# The laptop recipes: the authors' SGD recipe for the CNN at 8 epochs (x0.1 at 4 and 6), and a short
# DeiT-style AdamW recipe for the ViT (MixUp / CutMix need far more epochs than 8 to pay off)
LAPTOP_SGD = {"optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.decay_norms": False, "optim.schedule": "multistep", "optim.milestones": [0.5, 0.75]}
LAPTOP_ADAMW = {"optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05, "optim.schedule": "cosine", "optim.warmup_epochs": 1, "optim.label_smoothing": 0.1, "run.grad_clip": 1.0}


def _laptop() -> Scale:
    # 27 trainings (the ADN row is Table 4's "both"): about an hour on 2 cores, two at a time
    return Scale(
        "laptop",
        "CIFAR-10 (6,000 training images, 2,000 held-out, the full 10,000-image test set), the CIFAR presets adn-resnet-cifar (SGD) and adn-vit-cifar (AdamW), 8 epochs, 3 seeds: the paper's directions at a reduced scale, not its numbers",
        {**EVERY, "preset": "adn-resnet-cifar", **reproduce.laptop_cifar10(6000), "run.epochs": 8, "data.batch_size": 64, "sweep.repeats": 3},
        [
            Experiment("cifar10-resnet", "Table 1's comparison at laptop scale: the small ADN ResNet against it trained alone as super-net and as base-net", {"preset": "adn-resnet-cifar", **LAPTOP_SGD}, TABLE1, paper="table1-resnet50"),
            Experiment("cifar10-resnet-ablation", "Table 4's ablation at laptop scale on the small ADN ResNet", {"preset": "adn-resnet-cifar", **LAPTOP_SGD}, TABLE4, paper="table4-resnet50"),
            Experiment("cifar10-vit", "Table 1's comparison at laptop scale: the small ADN ViT (AdamW) against it trained alone", {"preset": "adn-vit-cifar", **LAPTOP_ADAMW}, TABLE1, paper="table1-vit-b16"),
        ],
    )


SCALES = {s.name: s for s in (_smoke(), _laptop(), _paper())}

TABLE1_SOURCE = "Table 1: 'our adaptive depth networks outperform individual counterpart networks'"
TABLE4_SOURCE = "Table 4: with both components ADN beats the individual networks; with one or neither it does not"


def _table1(e: str) -> list[Claim]:
    return [
        Claim(f"ADN super-net >= super-net trained alone ({e})", e, "ADN", "super", source=TABLE1_SOURCE),
        Claim(f"ADN base-net >= base-net trained alone ({e})", e, "ADN", "base", source=TABLE1_SOURCE),
    ]


def _table4(e: str, both: str = "both") -> list[Claim]:
    """Both components beat neither and each alone (at the super-net and the base-net)."""
    return [Claim(f"both >= {r} ({e})", e, both, r, source=TABLE4_SOURCE) for r in ("neither", "self-distillation", "skip-aware norms")]


CLAIMS = [
    *(c for e in ("table1-resnet50", "table1-mobilenetv2", "table1-vit-b16", "table1-swin-t", "digits-table1", "cifar10-resnet", "cifar10-vit") for c in _table1(e)),
    *_table4("table4-resnet50"),
    Claim("both >= logit KD only at the base-net (table4-resnet50)", "table4-resnet50", "both", "logit KD only", at="first", source="Table 4's last row: 'Without explicit distillation of intermediate features, slightly lower performance is observed in the base-net'"),
    *_table4("table4-vit-b32"),
    *_table4("cifar10-resnet-ablation"),
    Claim("both >= neither (digits-table4)", "digits-table4", "both", "neither", source=TABLE4_SOURCE),
]


def main(argv: list[str] | None = None) -> int:
    return reproduce.main(__doc__, EXPERIMENT, SCALES, CLAIMS, PUBLISHED, "ADN reproduction", argv)


if __name__ == "__main__":
    sys.exit(main())
