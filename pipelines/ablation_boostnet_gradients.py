"""BoostNet gradient ablation (BoostNet paper, Fig. 6c): gradient rescaling on/off crossed with a
trainable F_{n-1} (no stop-gradient) or the default stop-gradient; four trials, each trained by
Ray Train inside a Ray Tune trial, then calibrated, evaluated and compared.

Laptop (digits, CPU; a few minutes on 2 cores):
    python -m pipelines.ablation_boostnet_gradients
Cluster:
    ray job submit --working-dir . -- python -m pipelines.ablation_boostnet_gradients \\
        preset=msdnet-cifar100-b10 dataset=cifar100 data.root=/data/cifar100 epochs=300 batch_size=64 \\
        run.use_gpu=true sweep.max_concurrent=4
"""

from __future__ import annotations

import sys

from dynlab import pipeline, sweeps

EXPERIMENT = "ablation_boostnet_gradients"
GRID = {"boostnet.gradient_rescale": [True, False], "boostnet.trainable_prev": [False, True]}


def trials(cfg) -> list[sweeps.Trial]:
    return sweeps.expand(cfg, grid=GRID)


def title(cfg) -> str:
    return f"BoostNet gradients on {cfg.backbone} / {cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    return pipeline.main(__doc__, EXPERIMENT, trials, title, argv)


if __name__ == "__main__":
    sys.exit(main())
