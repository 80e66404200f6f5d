"""ADN ablation (ADN paper, Table 4): skip-aware self-distillation on/off crossed with skip-aware
norms on/off, plus the individually trained super-size and base-size networks as baselines
(``sweep.baseline=false`` drops them). Every trial is trained by Ray Train inside a Ray Tune trial;
every sub-network of every trial is evaluated on test and drawn in one accuracy-vs-cost figure
(dots: sub-networks, line: each trial's Pareto front); the printed table adds the best sub-network
under each budget.

Laptop (digits, a small ADN ResNet for 32x32 inputs, CPU, 15 epochs unless epochs= is given; about
2 minutes on 2 cores):
    python -m pipelines.ablation_adn
Cluster (ImageNet recipe of the paper, ResNet-50):
    ray job submit --working-dir . -- python -m pipelines.ablation_adn preset=adn-resnet50 \\
        dataset=imagefolder data.root=/mnt/efs/dynlab/data/imagenet epochs=150 optim.milestones=[0.4,0.667,0.933] \\
        run.use_gpu=true workers=8 sweep.max_concurrent=1
Knobs: adn.kd_lambda, adn.temperature, adn.topk, adn.subnets=[TTTT,FFFF], eval.budgets=[...] (MMACs),
and every training key (see --help).
"""

from __future__ import annotations

import sys

from dynlab import sweeps
from pipelines import adn_common

EXPERIMENT = "ablation_adn"
GRID = {"adn.distill": [True, False], "adn.skip_aware_norms": [True, False]}
BASELINES = [{"adn.individual": "super"}, {"adn.individual": "base"}]


def trials(cfg) -> list[sweeps.Trial]:
    return sweeps.expand(cfg, grid=GRID, extra=BASELINES if cfg.sweep.baseline else [])


def title(cfg) -> str:
    return f"ADN ablation on {cfg.backbone} / {cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    return adn_common.main(__doc__, EXPERIMENT, trials, title, argv)


if __name__ == "__main__":
    sys.exit(main())
